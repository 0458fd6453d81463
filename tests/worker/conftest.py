from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session

from server import migrate, queue
from server.db import make_engine
from tests.worker.support import make_settings, seed_run


class Env:
    """One data dir: settings, migrated SQLite DB, embedded broker, a seeded run."""

    def __init__(self, root: Path, **overrides):
        self.root = root
        self.settings = make_settings(root / "data", **overrides)
        self.settings.ensure_dirs()
        migrate.upgrade(self.settings)
        self.engine = make_engine(self.settings.db_url)
        self.session = Session(self.engine, expire_on_commit=False)
        self.run = seed_run(self.session, root)

    def close(self) -> None:
        self.session.close()
        self.engine.dispose()
        queue.reset()


@pytest.fixture
def make_env(tmp_path_factory) -> Iterator:
    envs: list[Env] = []

    def factory(name: str = "env", **overrides) -> Env:
        env = Env(tmp_path_factory.mktemp(name), **overrides)
        envs.append(env)
        return env

    yield factory
    for env in envs:
        env.close()

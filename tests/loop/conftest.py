"""Fixtures for the online-loop tests: the real app (TestClient) on a temp data dir, a tiny real
model, and `work(job_id)` = what a worker does with a job (`worker.tasks.execute`: claim, lease,
supervised subprocess, finish) in this process, so sampling/labelling/training run for real."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from server.app import create_app
from server.db import get_engine
from server.services.keys import create_api_key
from server.settings import Settings


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Where the tiny model lives: listed in the settings' model roots, as an operator lists theirs."""
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_dir(tiny_root: Path) -> Path:
    path = tiny_root / "sft"
    subprocess.run([sys.executable, "-m", "halos_core.tiny", str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


@pytest.fixture
def settings(tmp_path: Path, tiny_root: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'halos.db'}",
        model_roots=[tiny_root],
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        rate_limit_per_minute=0,
        use_cpu=True,
        heartbeat_interval_s=0.5,
        lease_ttl_s=30,
        kill_grace_s=5,
        max_attempts=2,
        retry_backoff_s=0.5,
        max_samples_per_job=300,
    )


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[TestClient, TestClient]]:
    """(client of project alpha, client of project beta)."""
    engine = get_engine(settings)
    SQLModel.metadata.create_all(engine)
    from sqlmodel import Session

    with Session(engine) as session:
        _, a = create_api_key(session, "alpha")
        _, b = create_api_key(session, "beta")
    app = create_app(settings)
    with (
        TestClient(app, headers={"Authorization": f"Bearer {a}"}) as ca,
        TestClient(app, headers={"Authorization": f"Bearer {b}"}) as cb,
    ):
        yield ca, cb
    from server import queue

    queue.reset()
    engine.dispose()


@pytest.fixture
def work(settings: Settings) -> Callable[[str], str]:
    from worker import tasks

    def run(job_id: str) -> str:
        return tasks.execute(job_id, settings)

    return run


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def post_file(client: TestClient, path: str, records: list[dict[str, Any]], **params: Any) -> Any:
    return client.post(path, content=jsonl(records), headers={"Content-Type": "application/x-ndjson"}, params=params)

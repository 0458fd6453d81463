"""Alembic: `upgrade head` on an empty SQLite file and an empty Postgres database, and the
migrations describe exactly server/models.py (autogenerate finds nothing to add)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlmodel import SQLModel

import server.models  # noqa: F401 - registers the tables
from server import migrate
from server.db import make_engine
from server.settings import Settings
from tests.worker.support import REPO, fresh_pg_database, pg_available


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(ctx, SQLModel.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_one_linear_history():
    script = ScriptDirectory.from_config(migrate.alembic_config(Settings(data_dir=Path("/nonexistent"))))
    assert len(script.get_heads()) == 1
    assert script.get_base() is not None


def test_upgrade_empty_sqlite_and_no_drift(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data")
    migrate.upgrade(settings)
    head = ScriptDirectory.from_config(migrate.alembic_config(settings)).get_current_head()
    assert migrate.current(settings) == head
    assert set(SQLModel.metadata.tables) <= _tables(settings.db_url)
    assert _diff(settings.db_url) == []
    migrate.upgrade(settings)  # idempotent
    # downgrade to nothing and back
    command.downgrade(migrate.alembic_config(settings), "base")
    assert _tables(settings.db_url) <= {"alembic_version"}
    migrate.upgrade(settings)
    assert _diff(settings.db_url) == []


def test_alembic_command_line_uses_settings(tmp_path: Path):
    """What the docker-compose `migrate` service runs: `alembic upgrade head` with HALOS_* env."""
    env = {**os.environ, "HALOS_DATA_DIR": str(tmp_path / "d")}
    env.pop("HALOS_DATABASE_URL", None)
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert "job" in _tables(f"sqlite:///{tmp_path / 'd' / 'halos.db'}")


@pytest.mark.postgres
def test_upgrade_fresh_postgres_and_no_drift():
    if not pg_available():
        pytest.skip("PostgreSQL not reachable")
    with fresh_pg_database() as url:
        settings = Settings(database_url=url)
        migrate.upgrade(settings)
        assert set(SQLModel.metadata.tables) <= _tables(url)
        assert _diff(url) == []
        command.downgrade(migrate.alembic_config(settings), "base")
        assert _tables(url) <= {"alembic_version"}
        migrate.upgrade(settings)
        assert _diff(url) == []

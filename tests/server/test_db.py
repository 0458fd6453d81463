"""server/db.py: Postgres connections never block forever (connect timeout, TCP keepalives, TCP
user timeout, statement_timeout well under the lease TTL)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from server.db import make_engine, postgres_connect_args, statement_timeout_for
from server.settings import Settings
from tests.worker.support import fresh_pg_database, pg_available


def test_statement_timeout_is_well_under_the_lease(tmp_path: Path) -> None:
    assert statement_timeout_for(Settings(data_dir=tmp_path)) == 15.0  # lease 60 s
    assert statement_timeout_for(Settings(data_dir=tmp_path, lease_ttl_s=20)) == 5.0
    assert statement_timeout_for(Settings(data_dir=tmp_path, lease_ttl_s=2)) == 1.0
    assert statement_timeout_for(Settings(data_dir=tmp_path, db_statement_timeout_s=0)) is None
    args = postgres_connect_args(2.5)
    assert args["connect_timeout"] > 0 and args["keepalives"] == 1 and args["tcp_user_timeout"] > 0
    assert args["options"] == "-c statement_timeout=2500"
    assert "options" not in postgres_connect_args(None)


@pytest.mark.skipif(not pg_available(), reason="no Postgres")
def test_postgres_engine_bounds_statements_and_sets_keepalives() -> None:
    with fresh_pg_database() as url:
        engine = make_engine(url, statement_timeout_s=1.0)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SHOW statement_timeout")).scalar() == "1s"
                params = conn.connection.dbapi_connection.info.get_parameters()
                assert params.get("keepalives") == "1" and params.get("connect_timeout")
                t0 = time.monotonic()
                with pytest.raises(OperationalError, match="statement timeout"):
                    conn.execute(text("SELECT pg_sleep(10)"))
                assert time.monotonic() - t0 < 5
        finally:
            engine.dispose()
        plain = make_engine(url, statement_timeout_s=None)  # migrations
        try:
            with plain.connect() as conn:
                assert conn.execute(text("SHOW statement_timeout")).scalar() == "0"
        finally:
            plain.dispose()

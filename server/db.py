"""Engine and sessions for SQLite (embedded) and Postgres.

SQLite: WAL so readers never block the writer, a busy timeout, and every transaction opened with
`BEGIN IMMEDIATE` so a read-then-write transaction takes the write lock up front instead of
failing with SQLITE_BUSY half-way (docs/RELIABILITY.md trap 8).

Postgres: `connect_timeout`, TCP keepalives, `tcp_user_timeout` and a `statement_timeout` (the
application's engines: `Settings.db_statement_timeout_s`, capped at a quarter of the lease TTL), so
no database call blocks a heartbeat or a request forever.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from server.settings import Settings, get_settings


def _normalise_url(url: str) -> str:
    # Users write postgresql://; SQLAlchemy's default driver for that is psycopg2, we ship psycopg 3.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


# Postgres: a database that stops answering must not block a caller forever (the worker's lease
# keeper, the API's threads): bounded connects, TCP keepalives and a user timeout detect a dead
# peer, and a statement timeout bounds a statement stuck on locks or I/O.
PG_CONNECT_TIMEOUT_S = 10
PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
PG_TCP_USER_TIMEOUT_MS = 30_000
DEFAULT_STATEMENT_TIMEOUT_S = 15.0


def postgres_connect_args(statement_timeout_s: float | None = DEFAULT_STATEMENT_TIMEOUT_S) -> dict:
    args: dict = {"connect_timeout": PG_CONNECT_TIMEOUT_S, **PG_KEEPALIVES, "tcp_user_timeout": PG_TCP_USER_TIMEOUT_MS}
    if statement_timeout_s:
        args["options"] = f"-c statement_timeout={max(1, int(statement_timeout_s * 1000))}"
    return args


def statement_timeout_for(settings: Settings) -> float | None:
    """The statement timeout of the application's engines: `db_statement_timeout_s`, but well under
    the lease TTL (at most a quarter of it, at least 1 s); 0 disables it."""
    if not settings.db_statement_timeout_s:
        return None
    return max(1.0, min(float(settings.db_statement_timeout_s), float(settings.lease_ttl_s) / 4))


def make_engine(url: str, *, statement_timeout_s: float | None = DEFAULT_STATEMENT_TIMEOUT_S) -> Engine:
    """An engine for `url`. Postgres: connect timeout, TCP keepalives, TCP user timeout and
    `statement_timeout` (None: no statement timeout, e.g. for migrations)."""
    url = _normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event issue BEGIN itself
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args = postgres_connect_args(statement_timeout_s) if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


@lru_cache
def _engine_for(url: str, statement_timeout_s: float | None = DEFAULT_STATEMENT_TIMEOUT_S) -> Engine:
    return make_engine(url, statement_timeout_s=statement_timeout_s)


def get_engine(settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    return _engine_for(settings.db_url, statement_timeout_for(settings))


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    with Session(get_engine(settings), expire_on_commit=False) as session:
        yield session

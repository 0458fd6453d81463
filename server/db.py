"""Engine and sessions for SQLite (embedded) and Postgres.

Two kinds of transaction, chosen by the engine a session is bound to:

- writers (`get_engine`, the default everywhere: the job state machine, the worker, the CLI, the
  API's writing routes). SQLite: `BEGIN IMMEDIATE`, so a read-then-write transaction takes the write
  lock up front instead of failing with SQLITE_BUSY half-way (docs/RELIABILITY.md trap 8).
- readers (`read_engine(engine)`, the API's GET routes). SQLite: a deferred `BEGIN` on a
  `query_only` connection: a WAL snapshot that never takes (or waits for) the write lock, so reads
  neither queue behind writers nor block them, and a read route that tried to write would fail
  loudly instead of upgrading its lock. Postgres: `BEGIN READ ONLY`.

SQLite: WAL so readers never block the writer, and a busy timeout for writers.

Postgres: `connect_timeout`, TCP keepalives, `tcp_user_timeout` and a `statement_timeout` (the
application's engines: `Settings.db_statement_timeout_s`, capped at a quarter of the lease TTL), so
no database call blocks a heartbeat or a request forever. No ping per checkout (a round trip per
request): a pooled connection whose server end has gone away (Postgres restarted, the backend was
terminated) has a readable socket (the server's goodbye or EOF), which a zero-timeout poll sees
without a round trip; the pool then replaces it. A connection that breaks mid-query raises, and
SQLAlchemy invalidates it and the rest of the pool so the next request reconnects.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import event, exc, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from server.models import utcnow
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


# The largest INTEGER on Postgres (4 bytes): ids, steps. A cursor or filter above it reaches the
# database as an out-of-range parameter (an error, a 500), so callers refuse or ignore it first.
MAX_DB_INT = 2**31 - 1

# Connections an engine's pool may hold (pool_size + max_overflow). The API admits at most this many
# requests to the database at once (`server.api.deps.get_read_session`), so no checkout waits on it.
POOL_CAPACITY = 40


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
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=POOL_CAPACITY // 2,
            max_overflow=POOL_CAPACITY - POOL_CAPACITY // 2,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event issue BEGIN itself
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            reader = bool(conn.get_execution_options().get(READ_OPTION))
            info = conn.connection.info
            if info.get("query_only", False) != reader:  # flip the guard only when the role changes
                conn.exec_driver_sql(f"PRAGMA query_only={int(reader)}")
                info["query_only"] = reader
            if reader:
                # straight to the driver: every GET runs this, and a statement through the Connection
                # costs several times the driver's own call. A deferred BEGIN waits for no lock.
                conn.connection.driver_connection.execute("BEGIN")
            else:
                # through SQLAlchemy: "database is locked" after the busy timeout must arrive as its
                # OperationalError, which callers treat as transient (worker/monitor.py)
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql"):
        engine = create_engine(
            url, pool_size=10, max_overflow=POOL_CAPACITY - 10, connect_args=postgres_connect_args(statement_timeout_s)
        )
        event.listen(engine, "checkout", _drop_if_closed_by_server)
        return engine
    return create_engine(url)


READ_OPTION = "halos_read_only"


def _drop_if_closed_by_server(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """An idle pooled connection has nothing to read unless its server end said goodbye (backend
    terminated, server restarted) or closed: poll its socket without waiting and, if so, make the
    pool replace it (DisconnectionError). No round trip, unlike a ping."""
    if dbapi_conn.closed:
        raise exc.DisconnectionError("connection closed")
    try:
        fd = dbapi_conn.pgconn.socket
    except Exception as error:
        raise exc.DisconnectionError(str(error)) from error
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        raise exc.DisconnectionError("the server closed this pooled connection")


def read_engine(engine: Engine) -> Engine:
    """`engine` for read-only transactions (same pool): SQLite deferred BEGIN on a query_only
    connection, Postgres BEGIN READ ONLY."""
    options: dict[str, Any] = {READ_OPTION: True}
    if engine.dialect.name == "postgresql":
        options["postgresql_readonly"] = True
    return engine.execution_options(**options)


@lru_cache
def _engine_for(url: str, statement_timeout_s: float | None = DEFAULT_STATEMENT_TIMEOUT_S) -> Engine:
    return make_engine(url, statement_timeout_s=statement_timeout_s)


def get_engine(settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    return _engine_for(settings.db_url, statement_timeout_for(settings))


@lru_cache
def _read_engine_for(engine: Engine) -> Engine:
    return read_engine(engine)


def get_read_engine(settings: Settings | None = None) -> Engine:
    """The application's engine for read-only transactions (shares `get_engine`'s pool)."""
    return _read_engine_for(get_engine(settings))


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    with Session(get_engine(settings), expire_on_commit=False) as session:
        yield session


def db_now(session: Session) -> datetime:
    """The time every lease is stamped and judged by (jobs, gang members, webhook deliveries).

    On Postgres it is the database server's clock, so workers, sweepers and dispatchers on other
    machines agree: a worker whose clock is behind would otherwise write a lease that has already
    expired in the sweeper's eyes (its live job re-queued and run twice), and one whose clock is
    ahead would keep a dead worker's job held for that much longer (docs/RELIABILITY.md, clock skew).
    `clock_timestamp()`, not `now()`: the latter is frozen at the start of the transaction. SQLite
    lives on one host, whose clock every process sharing the file already reads."""
    if session.get_bind().dialect.name == "postgresql":
        with session.no_autoflush:  # a caller's pending rows are flushed in its own order, not here
            value = session.execute(text("SELECT clock_timestamp()")).scalar_one()
        return value.astimezone(UTC)
    return utcnow()

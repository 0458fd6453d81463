"""Dependencies of the API routers, as `Annotated` aliases: SettingsDep, ReadSessionDep,
WriteSessionDep, ProjectDep.

A route says what it does to the database by the session it asks for:

- `ReadSessionDep` (every GET but the polled job status and the metric series, which use
  `read_view`: the same read-only transaction without dependencies): one read-only transaction for the whole request,
  authentication included; on SQLite a WAL snapshot that never takes the write lock
  (`server.db.read_engine`).
- `WriteSessionDep` (routes that change something): the writers' engine (`BEGIN IMMEDIATE` on
  SQLite). It depends on `ProjectDep`, so a caller is authenticated (in a short read transaction,
  ended before the write session exists) before the route can take the write lock.

`ProjectDep` authenticates the bearer key in the request's read transaction (`KeyCache`: no key
lookup while the key generation is unchanged; unknown or revoked ⇒ 401), applies the per-key rate
limit (429 + Retry-After) and yields the caller's `Principal`; every service call is scoped to
`principal.project_id`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Annotated, Any

import anyio
from fastapi import Depends, Header, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel
from sqlalchemy import Connection
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from halos_client.models import ErrorResponse
from server.db import get_engine, get_read_engine, session_scope
from server.errors import PayloadTooLarge, RateLimited, Unauthorized
from server.services.keys import Principal, get_or_create_project
from server.services.ratelimit import retry_after_header
from server.settings import Settings

MAX_JSON_BODY_BYTES = 1024 * 1024  # request bodies of the JSON endpoints are small pydantic models
DEFAULT_PROJECT = "default"  # the project everything belongs to when auth is disabled


async def get_app_settings(request: Request) -> Settings:  # async: no thread-pool hop for an attribute
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def in_process_database(settings: Settings) -> bool:
    """SQLite: a read statement is a local call that never waits for a lock (WAL snapshot), cheaper
    than handing it to a thread. A networked database's statements always go to a thread."""
    return settings.db_url.startswith("sqlite")


async def run_blocking_db(settings: Settings, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` here on SQLite (see `in_process_database`), in the thread pool otherwise."""
    if in_process_database(settings):
        return fn(*args)
    return await run_in_threadpool(fn, *args)


async def take_database_slot(slots: anyio.Semaphore) -> None:
    """One of the pool's slots: a free one at once, without yielding to the loop (anyio's `acquire`
    always yields, a trip to the back of the loop's queue for every request), else wait for one."""
    try:
        slots.acquire_nowait()
    except anyio.WouldBlock:
        await slots.acquire()


async def get_read_session(request: Request) -> AsyncIterator[Session]:
    """The request's read-only session. Async: making a Session does no I/O; only its close, the
    ROLLBACK that ends the read transaction, may (run_blocking_db).

    A request holds one pooled connection from its first query until this session closes, across
    thread-pool hops (dependencies, handler), so requests first wait here, on the event loop, for
    one of `POOL_CAPACITY` slots (`app.state.database_slots`): more in flight than the pool holds
    would leave threads blocked on checkout while the requests holding the connections wait for a
    thread, until the pool timeout (seconds of nothing, then 500s)."""
    settings = request.app.state.settings
    slots = request.app.state.database_slots
    await take_database_slot(slots)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            slots.release()

    try:
        session = Session(get_read_engine(settings), expire_on_commit=False, autoflush=False)
        session.info[_RELEASE_SLOT] = release
        try:
            yield session
        finally:
            if session.in_transaction():
                await run_blocking_db(settings, session.close)
            else:
                session.close()
    finally:
        release()


_RELEASE_SLOT = "halos_release_database_slot"


def end_reads(session: Session) -> None:
    """For a long response that needs no more of this request's session (a live event stream: it
    opens short sessions of its own): close it and give its database slot back now, not when the
    response ends."""
    session.close()
    release = session.info.pop(_RELEASE_SLOT, None)
    if release is not None:
        release()


ReadSessionDep = Annotated[Session, Depends(get_read_session)]

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer <key>`; keys are created with `halos keys create --project NAME`.",
)


def _default_project_id(settings: Settings) -> str:
    """Auth disabled: everything belongs to DEFAULT_PROJECT (created once, by a writer)."""
    with session_scope(settings) as session:
        return get_or_create_project(session, DEFAULT_PROJECT).id


async def ensure_default_project(request: Request) -> None:
    """Auth disabled: learn DEFAULT_PROJECT's id once per process. It may write (the first request
    of a new database), so never on the event loop."""
    state = request.app.state
    if not state.settings.auth_enabled and not getattr(state, "default_project_id", None):
        state.default_project_id = await run_in_threadpool(_default_project_id, state.settings)


def authenticate(request: Request, conn: Connection | None, secret: str | None) -> Principal:
    """The caller's `Principal`, checked in `conn`'s transaction (the one the request keeps; unused,
    may be None, with auth disabled):
    401 for a missing, unknown or revoked key, then the per-key rate limit (429 + Retry-After).
    With auth disabled (`ensure_default_project` first) everyone is DEFAULT_PROJECT, limited per
    client address. A plain function: the `ProjectDep` dependency and `read_view` both call it."""
    state = request.app.state
    if not state.settings.auth_enabled:
        principal = Principal(project_id=state.default_project_id, key_id=None)
        limiter_key = f"anon:{request.client.host if request.client else 'local'}"
    else:
        found = state.key_cache.authenticate(conn, secret) if conn is not None and secret else None
        if found is None:
            raise Unauthorized(
                "missing, unknown or revoked API key"
                if secret
                else "a valid API key is required (Authorization: Bearer <key>)"
            )
        principal = found
        limiter_key = f"key:{principal.key_id}"
    wait = state.rate_limiter.hit(limiter_key)
    if wait is not None:
        raise RateLimited(retry_after_header(wait), state.rate_limiter.limit)
    return principal


async def get_principal(
    request: Request,
    settings: SettingsDep,
    session: ReadSessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    await ensure_default_project(request)
    if not settings.auth_enabled:  # no database read
        return authenticate(request, None, None)
    secret = credentials.credentials if credentials else None
    # on SQLite the key check runs here: a request then costs one thread-pool hop (the handler), not three
    return await run_blocking_db(settings, lambda: authenticate(request, session.connection(), secret))


ProjectDep = Annotated[Principal, Depends(get_principal)]

# What `ProjectDep` puts in a route's OpenAPI operation, for a route that authenticates without it (read_view).
API_KEY_SECURITY: dict[str, Any] = {"security": [{bearer_scheme.scheme_name: []}]}


def bearer_secret(request: Request) -> str | None:
    """The key of `Authorization: Bearer <key>`, as `bearer_scheme` reads it (None if absent)."""
    scheme, secret = get_authorization_scheme_param(request.headers.get("authorization"))
    return secret if scheme.lower() == "bearer" and secret else None


def _authenticated_view(request: Request, view: Callable[..., BaseModel], args: tuple[Any, ...]) -> bytes:
    # a Core connection, not a Session: the view reads plain rows, and a Session's own transaction
    # bookkeeping cost ~12% of this request's CPU (0.42 -> 0.37 ms, bench/README)
    with get_read_engine(request.app.state.settings).connect() as conn:
        conn.begin()  # before the first read (on SQLite the key check's goes to the driver, which begins none)
        principal = authenticate(request, conn, bearer_secret(request))
        return view(conn, principal, *args).model_dump_json().encode()


async def read_view(request: Request, view: Callable[..., BaseModel], *args: Any, large: bool = False) -> Response:
    """`view(conn, principal, *args)` as the JSON response of a GET, authentication included,
    in one read transaction: what `ReadSessionDep` + `ProjectDep` give a route, without FastAPI's
    dependency resolution, about a quarter of that request's CPU (0.16 of ~0.6 ms; bench/README,
    "Job reads: no dependencies, a Core connection, asyncio's loop"). For the routes that clients poll
    and for `large` reads (a metric series: always in the thread pool, never on the loop); the route
    declares `response_model` (the contract `view` returns) and `openapi_extra=API_KEY_SECURITY`."""
    await ensure_default_project(request)
    # one of the pool's slots first, on SQLite too (see get_read_session): with every connection
    # held by requests waiting for the loop, a checkout here would block the loop until the pool's
    # timeout (tests/server/test_api_read_path.py)
    slots = request.app.state.database_slots
    await take_database_slot(slots)
    try:
        if in_process_database(request.app.state.settings) and not large:
            body = _authenticated_view(request, view, args)
        else:  # a networked database, or a large read: in a thread
            body = await run_in_threadpool(_authenticated_view, request, view, args)
    finally:
        slots.release()
    return Response(body, media_type="application/json")


def get_write_session(settings: SettingsDep, _principal: ProjectDep, read: ReadSessionDep) -> Iterator[Session]:
    # The authentication's read transaction ends here: a writer may run long (an upload streams
    # for seconds) and an open snapshot would hold back SQLite's WAL checkpoints / Postgres' vacuum.
    read.rollback()
    with Session(get_engine(settings), expire_on_commit=False) as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise


WriteSessionDep = Annotated[Session, Depends(get_write_session)]


def get_keyless_write_session(settings: SettingsDep) -> Iterator[Session]:
    """A writer's session for routes that an API key does not authenticate (a labelling tool's
    webhook proves itself with the integration's secret or signature, checked by the service)."""
    with Session(get_engine(settings), expire_on_commit=False) as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise


KeylessWriteSessionDep = Annotated[Session, Depends(get_keyless_write_session)]

IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="retries with the same key and the same request return the same resource (kept "
        "at least `idempotency_ttl_hours`); the same key with a different request is a 422",
    ),
]


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed request",
        401: "Missing, unknown or revoked API key",
        404: "No such object in the caller's project",
        409: "Conflict with the current state",
        413: "Request body too large",
        415: "Unsupported Content-Type",
        422: "Validation failed",
        429: "Rate limit exceeded (see Retry-After)",
        503: "Not ready",
        507: "Insufficient storage: the estimated output does not fit the data dir's free space minus its reserve",
    }
    return {s: {"model": ErrorResponse, "description": descriptions.get(s, "Error")} for s in statuses}


class JsonBodyLimitRoute(APIRoute):
    """An APIRoute that refuses request bodies over MAX_JSON_BODY_BYTES with a JSON 413.

    Checked up front from Content-Length and counted while reading (chunked bodies), before
    FastAPI parses the JSON, so a huge body never sits in memory."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        limit = MAX_JSON_BODY_BYTES

        async def limited(request: Request) -> Response:
            declared = request.headers.get("content-length")
            if declared is not None:
                try:
                    too_big = int(declared) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    raise PayloadTooLarge(f"request body over {limit} bytes", details={"max_bytes": limit})
            receive = request.receive
            seen = 0

            async def counting_receive() -> Any:
                nonlocal seen
                message = await receive()
                if message.get("type") == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        # FastAPI re-raises HTTPExceptions from body reading (anything else becomes a 400)
                        raise StarletteHTTPException(413, f"request body over {limit} bytes")
                return message

            return await handler(Request(request.scope, counting_receive))

        return limited

"""Dependencies of the API routers, as `Annotated` aliases: SettingsDep, SessionDep, ProjectDep.

`ProjectDep` authenticates the bearer key (sha256 lookup; unknown or revoked ⇒ 401), applies the
per-key rate limit (429 + Retry-After) and yields the caller's `Principal`; every service call
is scoped to `principal.project_id`.
"""

from __future__ import annotations

from typing import Annotated, Any, Awaitable, Callable, Iterator

from fastapi import Depends, Header, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.db import get_engine
from server.errors import PayloadTooLarge, RateLimited, Unauthorized
from halos_client.models import ErrorResponse
from server.services.keys import Principal, authenticate, get_or_create_project
from server.services.ratelimit import retry_after_header
from server.settings import Settings

MAX_JSON_BODY_BYTES = 1024 * 1024  # request bodies of the JSON endpoints are small pydantic models
DEFAULT_PROJECT = "default"  # the project everything belongs to when auth is disabled


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with Session(get_engine(settings), expire_on_commit=False) as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise


SessionDep = Annotated[Session, Depends(get_session)]

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer <key>`; keys are created with `halos keys create --project NAME`.",
)


def get_principal(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    if not settings.auth_enabled:
        project = get_or_create_project(session, DEFAULT_PROJECT)
        principal = Principal(project_id=project.id, key_id=None)
        client = request.client.host if request.client else "local"
        limiter_key = f"anon:{client}"
    else:
        principal_or_none = authenticate(session, credentials.credentials) if credentials else None
        if principal_or_none is None:
            session.rollback()
            raise Unauthorized("missing, unknown or revoked API key" if credentials else
                               "a valid API key is required (Authorization: Bearer <key>)")
        principal = principal_or_none
        limiter_key = f"key:{principal.key_id}"
    # End the read transaction now: on SQLite every transaction is BEGIN IMMEDIATE, and an upload
    # that keeps one open while streaming would lock every writer (worker heartbeats!) out.
    session.commit()
    wait = request.app.state.rate_limiter.hit(limiter_key)
    if wait is not None:
        raise RateLimited(retry_after_header(wait), request.app.state.rate_limiter.limit)
    return principal


ProjectDep = Annotated[Principal, Depends(get_principal)]

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
    }
    return {s: {"model": ErrorResponse, "description": descriptions.get(s, "Error")} for s in statuses}


class JsonBodyLimitRoute(APIRoute):
    """An APIRoute that refuses request bodies over MAX_JSON_BODY_BYTES with a JSON 413.

    Checked up front from Content-Length and counted while reading (chunked bodies), before
    FastAPI parses the JSON, so a huge body never sits in memory."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
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

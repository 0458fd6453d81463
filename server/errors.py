"""API errors: one JSON shape for every failure, `{"error": {"code", "message", "details"}}`.

Services raise `ApiError` subclasses (plain exceptions, no FastAPI needed to raise them); the
handlers installed by `install_exception_handlers` turn those, FastAPI's request validation
errors, Starlette's HTTP exceptions (404 route, 405, 413 from the body limit) and — as a last
resort — any unhandled exception into that shape. A 500 is a bug: bad input must never reach it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("halos.api")


class ApiError(Exception):
    """An error the client can act on. `status` is the HTTP status, `code` a stable machine code."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details: dict[str, Any] = details or {}
        self.headers: dict[str, str] = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str = "a valid API key is required (Authorization: Bearer <key>)", **kw: Any):
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ApiError):
    status, code = 422, "unprocessable"


class RateLimited(ApiError):
    status, code = 429, "rate_limited"

    def __init__(self, retry_after_s: int, limit: int) -> None:
        super().__init__(
            f"rate limit of {limit} requests per minute exceeded; retry in {retry_after_s} s",
            details={"limit_per_minute": limit, "retry_after_s": retry_after_s},
            headers={"Retry-After": str(retry_after_s)},
        )


class ServiceUnavailable(ApiError):
    status, code = 503, "not_ready"


class InsufficientStorage(ApiError):
    """507: what was asked for would not fit on the data dir's disk (server/storage_lifecycle/usage.py)."""

    status, code = 507, "insufficient_storage"


def not_found(kind: str, object_id: str, field: str | None = None) -> NotFound:
    """A 404 for an id that does not exist *in the caller's project* (other projects look the same)."""
    details: dict[str, Any] = {"id": str(object_id)[:200]}
    if field is not None:
        details["field"] = field
    return NotFound(f"{kind} {str(object_id)[:200]!r} not found", code=f"{kind}_not_found", details=details)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


# --------------------------------------------------------------------------- FastAPI glue

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    503: "not_ready",
}


def _jsonable_loc(loc: Any) -> list[str | int]:
    out: list[str | int] = []
    for part in loc or ():
        out.append(part if isinstance(part, (str, int)) and not isinstance(part, bool) else str(part))
    return out


def validation_details(errors: Any) -> dict[str, Any]:
    """FastAPI/pydantic errors without the echoed input (it can be huge or hostile)."""
    items = []
    for err in list(errors)[:100]:
        loc = _jsonable_loc(err.get("loc"))
        items.append(
            {
                "loc": loc,
                "field": ".".join(str(p) for p in loc[1:])
                if loc and loc[0] in ("body", "query", "path", "header")
                else ".".join(map(str, loc)),
                "code": str(err.get("type", "invalid")),
                "message": str(err.get("msg", ""))[:1000],
            }
        )
    return {"errors": items}


def _allowed_methods(request: Any) -> list[str]:
    """Every method served on this path, from the OpenAPI paths (public, and covers all routers)."""
    import re

    app = request.app
    table = getattr(app.state, "allowed_methods", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            regex = re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$")
            methods = {m.upper() for m in operations}
            if "GET" in methods:
                methods.add("HEAD")
            table.append((regex, methods))
        app.state.allowed_methods = table
    path = request.scope.get("path", "")
    found: set[str] = set()
    for regex, methods in table:
        if regex.match(path):
            found |= methods
    return sorted(found)


def install_exception_handlers(app: Any) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)

    async def request_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc.errors())
        first = details["errors"][0] if details["errors"] else None
        message = "request validation failed"
        if first:
            where = first["field"] or "body"
            message = f"request validation failed: {where}: {first['message']}"
        return JSONResponse(error_body("validation_error", message, details), status_code=422)

    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if status == 413:
            message = "request body too large"
        headers = dict(exc.headers or {})
        if status == 405:  # Starlette lists only the first matching route's methods
            headers["Allow"] = ", ".join(_allowed_methods(_request))
        return JSONResponse(error_body(code, message), status_code=status, headers=headers or None)

    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled)

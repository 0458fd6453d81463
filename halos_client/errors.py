"""What the client raises: one base class, one subclass per HTTP error status the API answers.

Every API error carries the server's `{"error": {"code", "message", "details"}}` as `code`,
`message` and `details` (and the parsed `ErrorInfo` as `info`), plus the HTTP `status`; catch
by class (`NotFoundError`) or switch on `code` (`"run_not_found"`), which is stable.

    HalosError
    ├── APIConnectionError        the server could not be reached (after the retries)
    ├── APIError                  the server answered an error status
    │   ├── BadRequestError (400)  AuthenticationError (401)  PermissionDeniedError (403)
    │   ├── NotFoundError (404)    ConflictError (409)        PayloadTooLargeError (413)
    │   ├── UnsupportedMediaTypeError (415)
    │   ├── UnprocessableError (422) ── InvalidFeedbackError (422 `invalid_feedback`: `.records`)
    │   ├── RateLimitError (429)   ServiceUnavailableError (503)   (both: `.retry_after`)
    │   └── ServerError (5xx)
    ├── JobFailed                 `jobs.wait()`: the job ended failed or cancelled (`.job`, `.reason`)
    └── WaitTimeout               `jobs.wait()`: still not finished after `timeout` (`.job`)
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from pydantic import ValidationError

from halos_client.models import ErrorInfo, FeedbackRecordError, JobOut


class HalosError(Exception):
    """Base class of every error the client raises on purpose."""


class APIConnectionError(HalosError):
    """No HTTP answer: connection refused, reset, timed out (the httpx error is `__cause__`)."""

    def __init__(self, message: str, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APIError(HalosError):
    """The server answered with an error status."""

    def __init__(self, status: int, info: ErrorInfo, response: httpx.Response | None = None) -> None:
        where = f"{response.request.method} {response.request.url.path}: " if response is not None else ""
        super().__init__(f"{where}{status} {info.code}: {info.message}")
        self.status = status
        self.info = info
        self.response = response

    @property
    def code(self) -> str:
        return self.info.code

    @property
    def message(self) -> str:
        return self.info.message

    @property
    def details(self) -> dict[str, Any]:
        return self.info.details

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked the client to wait (its Retry-After header; 429 and 503), if it said."""
        return retry_after_seconds(self.response) if self.response is not None else None


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class PayloadTooLargeError(APIError):
    pass


class UnsupportedMediaTypeError(APIError):
    pass


class UnprocessableError(APIError):
    """422: the request was understood and refused (`details.errors` names the fields)."""


class InvalidFeedbackError(UnprocessableError):
    """422 `invalid_feedback`: the uploaded file has bad records; nothing was stored."""

    @property
    def records(self) -> list[FeedbackRecordError]:
        """Every bad record the server reported (line, field, code, message, hint)."""
        out = []
        for item in self.details.get("errors") or []:
            try:
                out.append(FeedbackRecordError.model_validate(item))
            except ValidationError:
                continue  # a newer server's shape: still in `details`
        return out

    @property
    def truncated(self) -> bool:
        return bool(self.details.get("truncated"))


class RateLimitError(APIError):
    pass


class ServiceUnavailableError(APIError):
    pass


class ServerError(APIError):
    """5xx other than 503: a server bug or a broken proxy; the server logged it."""


class JobFailed(HalosError):
    """The job a `wait()` watched ended `failed` or `cancelled`."""

    def __init__(self, job: JobOut) -> None:
        self.job = job
        self.reason = job.error or ("cancelled on request" if job.status == "cancelled" else "no reason recorded")
        super().__init__(f"job {job.id} {job.status}: {self.reason}")


class WaitTimeout(HalosError, TimeoutError):
    """`wait()` gave up before the job finished; the job itself goes on."""

    def __init__(self, job: JobOut, timeout: float) -> None:
        self.job = job
        super().__init__(f"job {job.id} still {job.status} after {timeout:g} s")


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: UnprocessableError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3); None if absent or garbled."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error for an error response; a body that is not the API's error shape (a proxy's
    HTML page, say) still gives one, with code `http_<status>` and the start of the body."""
    status = response.status_code
    try:
        info = ErrorInfo.model_validate(response.json()["error"])
    except (ValueError, KeyError, TypeError, ValidationError):
        info = ErrorInfo(code=f"http_{status}", message=(response.text or response.reason_phrase)[:500])
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    if cls is UnprocessableError and info.code == "invalid_feedback":
        cls = InvalidFeedbackError
    return cls(status, info, response)

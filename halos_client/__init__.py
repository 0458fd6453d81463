"""Python client of the halos-server HTTP API: `Client` (sync) and `AsyncClient` (asyncio).

It sits on the public HTTP API only (it imports nothing of `server` or `worker`, and no torch),
so it works against any deployment. Its models are the API's own (`halos_client.models`, which
the server generates its OpenAPI spec from), its errors are in `halos_client.errors`, and the
`halos` command's client commands (`halos jobs list`, `halos rounds create --wait`, …) are built
on it (`halos_client.cli`).
"""

from halos_client.async_client import AsyncClient
from halos_client.bodies import UNSET
from halos_client.client import Client
from halos_client.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    HalosError,
    InvalidFeedbackError,
    JobFailed,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    UnprocessableError,
    UnsupportedMediaTypeError,
    WaitTimeout,
)
from halos_client.retry import NO_RETRIES, RetryPolicy

__all__ = [
    "APIConnectionError",
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "HalosError",
    "InvalidFeedbackError",
    "JobFailed",
    "NO_RETRIES",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailableError",
    "UNSET",
    "UnprocessableError",
    "UnsupportedMediaTypeError",
    "WaitTimeout",
]

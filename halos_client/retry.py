"""When the client sends a request again, and how long it waits first (tenacity).

Safe to resend, for any request:
- a connection that never got through (refused, connect timeout, no free pooled connection):
  the server saw nothing;
- 429 and 503: the server refuses these before doing anything (rate limit, model-hashing slots
  busy, not ready), and says when to come back in Retry-After.
Safe to resend only for an *idempotent* request (a GET, or a POST the server deduplicates by its
`Idempotency-Key`: feedback upload, run, round): a connection that broke after the request was
sent (reset, read timeout, the server closed without answering) and a proxy's 502/504. For
those the first try may have done its work, and only the key makes the retry return that
same object instead of a second one.

Waits: Retry-After when the server gave one (plus up to `retry_after_jitter_s` at random, so
clients told the same moment do not all come back at once; a Retry-After beyond
`max_retry_after_s` is not waited for: the error is raised with `.retry_after` set), else
exponential backoff with jitter (`backoff_s` · 2ⁿ + up to `backoff_s` at random, at most
`max_backoff_s`). At most `max_attempts` tries in all.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import RetryCallState, retry_if_exception, retry_if_result, stop_after_attempt, wait_exponential_jitter
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from halos_client.errors import retry_after_seconds

log = logging.getLogger("halos_client")

ALWAYS_RETRIED_STATUSES = frozenset({429, 503})
IDEMPOTENT_RETRIED_STATUSES = frozenset({502, 504})
# The request never reached the server: resending cannot do anything twice.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have reached the server (reset, read/write timeout, closed without an answer).
MAYBE_SENT_ERRORS = (
    httpx.ReadError,
    httpx.WriteError,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6  # the first try included; 1 turns retries off
    backoff_s: float = 0.5  # 0.5, 1, 2, 4, 8 s (+ jitter): about 16 s of outage ridden out by default
    max_backoff_s: float = 10.0
    max_retry_after_s: float = 120.0
    retry_after_jitter_s: float = 1.0


NO_RETRIES = RetryPolicy(max_attempts=1)


def retryable_exception(exc: BaseException, idempotent: bool) -> bool:
    return isinstance(exc, NOT_SENT_ERRORS) or (idempotent and isinstance(exc, MAYBE_SENT_ERRORS))


def retryable_response(response: httpx.Response, idempotent: bool) -> bool:
    status = response.status_code
    return status in ALWAYS_RETRIED_STATUSES or (idempotent and status in IDEMPOTENT_RETRIED_STATUSES)


class _WaitRetryAfterOrBackoff(wait_base):
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.backoff = wait_exponential_jitter(
            initial=policy.backoff_s, max=policy.max_backoff_s, jitter=policy.backoff_s
        )

    def __call__(self, state: RetryCallState) -> float:
        after = _retry_after(state)
        if after is not None:
            return after + random.uniform(0, self.policy.retry_after_jitter_s)
        return self.backoff(state)


class _StopIfRetryAfterTooLong(stop_base):
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, state: RetryCallState) -> bool:
        after = _retry_after(state)
        return after is not None and after > self.policy.max_retry_after_s


def _retry_after(state: RetryCallState) -> float | None:
    outcome = state.outcome
    if outcome is None or outcome.failed:
        return None
    return retry_after_seconds(outcome.result())


def _describe(state: RetryCallState) -> str:
    outcome = state.outcome
    if outcome is None:
        return "?"
    if outcome.failed:
        exc = outcome.exception()
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    response = outcome.result()
    return f"HTTP {response.status_code}"


def retrying_options(policy: RetryPolicy, idempotent: bool, what: str) -> dict[str, Any]:
    """Arguments for `tenacity.Retrying` / `AsyncRetrying` around one request. After the last try
    the last answer is handed back (an error response is then raised as the typed error) or
    the last connection error re-raised."""

    def before_sleep(state: RetryCallState) -> None:
        sleep = state.next_action.sleep if state.next_action else 0.0
        log.info(
            "%s: %s; retry %d/%d in %.1f s",
            what,
            _describe(state),
            state.attempt_number,
            policy.max_attempts - 1,
            sleep,
        )

    return {
        "stop": stop_after_attempt(max(1, policy.max_attempts)) | _StopIfRetryAfterTooLong(policy),
        "wait": _WaitRetryAfterOrBackoff(policy),
        "retry": (
            retry_if_exception(lambda exc: retryable_exception(exc, idempotent))
            | retry_if_result(lambda response: retryable_response(response, idempotent))
        ),
        "retry_error_callback": lambda state: state.outcome.result() if state.outcome else None,
        "before_sleep": before_sleep,
        "reraise": True,
    }

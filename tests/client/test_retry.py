"""The client's retry rules and error mapping, on scripted answers (httpx.MockTransport).

These pin down the decision table of `halos_client.retry` (what is resent, how long it waits,
that a POST keeps its Idempotency-Key across resends). The same behaviour against a real server
— a real 429, a real restart, a real lost response replayed by key — is in tests/e2e/test_sdk.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from tenacity import RetryCallState, Retrying

from halos_client import (
    APIConnectionError,
    AsyncClient,
    Client,
    InvalidFeedbackError,
    JobFailed,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    WaitTimeout,
)
from halos_client.calls import new_log_text
from halos_client.retry import retrying_options

FAST = RetryPolicy(max_attempts=4, backoff_s=0.01, max_backoff_s=0.05, retry_after_jitter_s=0.0)
FEEDBACK = {
    "id": "fb_1",
    "kind": "pairwise",
    "format": "halos_jsonl",
    "n_records": 1,
    "n_prompts": 1,
    "n_train": 1,
    "n_test": 0,
    "sha256": "0" * 64,
    "size_bytes": 10,
    "filename": "x.jsonl",
    "created_at": "2030-01-01T00:00:00Z",
}
MODEL = {"id": "mdl_1", "name": "m", "path": "/m", "sha256": "0" * 64, "created_at": "2030-01-01T00:00:00Z"}


def scripted(*answers: Callable[[httpx.Request], httpx.Response] | httpx.Response | type[Exception]):
    """A transport answering each request with the next scripted answer; records the requests."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, type) and issubclass(answer, Exception):
            raise answer("scripted", request=request)
        return answer(request) if callable(answer) else answer

    return httpx.MockTransport(handler), seen


def error(status: int, code: str, headers: dict | None = None, **details) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": code, "details": details}}, headers=headers)


def test_post_keeps_its_idempotency_key_across_retries_and_a_new_call_gets_a_new_one(tmp_path) -> None:
    transport, seen = scripted(
        httpx.ConnectError,
        error(503, "busy", {"Retry-After": "0"}),
        httpx.RemoteProtocolError,
        httpx.Response(201, json=FEEDBACK),
    )
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    with Client("http://halos", "k", transport=transport, retry=FAST) as client:
        assert client.feedback.upload(path).id == "fb_1"
        keys = {r.headers["Idempotency-Key"] for r in seen}
        assert len(seen) == 4 and len(keys) == 1
        assert all(b'{"a": 1}' in r.content for r in seen)  # the file is sent whole on every try
        assert seen[0].headers["Authorization"] == "Bearer k"
        client.feedback.upload(b"{}", idempotency_key="mine")
        assert seen[-1].headers["Idempotency-Key"] == "mine"


def test_a_post_the_server_does_not_deduplicate_is_not_resent_after_an_ambiguous_failure() -> None:
    transport, seen = scripted(httpx.ReadError, httpx.Response(201, json=MODEL))
    with Client("http://halos", transport=transport, retry=FAST) as client:
        with pytest.raises(APIConnectionError):
            client.models.register("m", "/m")  # the first try may have registered it
        assert len(seen) == 1
    transport, seen = scripted(
        httpx.ConnectError, error(429, "rate_limited", {"Retry-After": "0"}), httpx.Response(201, json=MODEL)
    )
    with Client("http://halos", transport=transport, retry=FAST) as client:
        assert client.models.register("m", "/m").id == "mdl_1"  # never reached / refused up front: safe
        assert len(seen) == 3


def test_gets_are_resent_after_any_transport_error_and_502() -> None:
    transport, seen = scripted(httpx.ReadTimeout, error(502, "bad_gateway"), httpx.Response(200, json=MODEL))
    with Client("http://halos", transport=transport, retry=FAST) as client:
        assert client.models.get("mdl_1").id == "mdl_1"
        assert len(seen) == 3


def test_retry_after_is_honoured() -> None:
    transport, seen = scripted(error(429, "rate_limited", {"Retry-After": "1"}), httpx.Response(200, json=MODEL))
    with Client("http://halos", transport=transport, retry=FAST) as client:
        t0 = time.monotonic()
        client.models.get("mdl_1")
        assert time.monotonic() - t0 >= 1.0 and len(seen) == 2


def test_a_retry_after_beyond_the_limit_is_not_waited_for() -> None:
    transport, seen = scripted(error(429, "rate_limited", {"Retry-After": "600"}), httpx.Response(200, json=MODEL))
    with Client("http://halos", transport=transport, retry=FAST) as client:
        t0 = time.monotonic()
        with pytest.raises(RateLimitError) as caught:
            client.models.get("mdl_1")
        assert time.monotonic() - t0 < 1.0 and len(seen) == 1
        assert caught.value.retry_after == 600 and caught.value.code == "rate_limited"


def test_attempts_are_bounded_and_the_last_answer_is_raised() -> None:
    transport, seen = scripted(error(503, "not_ready"))
    with Client("http://halos", transport=transport, retry=FAST) as client:
        with pytest.raises(Exception) as caught:
            client.models.get("mdl_1")
        assert len(seen) == FAST.max_attempts and caught.value.status == 503  # type: ignore[attr-defined]  # an APIStatusError
    transport, seen = scripted(httpx.ConnectError)
    with Client("http://halos", transport=transport, retry=FAST) as client:
        with pytest.raises(APIConnectionError):
            client.models.get("mdl_1")
        assert len(seen) == FAST.max_attempts


def test_backoff_is_exponential_jittered_and_capped() -> None:
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=10.0)
    wait = retrying_options(policy, True, "GET /x")["wait"]
    state = RetryCallState(Retrying(), None, (), {})
    state.set_exception((httpx.ConnectError, httpx.ConnectError("x"), None))
    for attempt, low in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 10.0)):
        state.attempt_number = attempt
        samples = [wait(state) for _ in range(200)]
        assert min(samples) >= min(low, 10.0) and max(samples) <= min(low + 0.5, 10.0)
        if low < 10.0:
            assert max(samples) - min(samples) > 0.05  # jittered: clients do not come back in step


def test_errors_are_typed_with_the_servers_code_and_details() -> None:
    report = [
        {
            "index": 2,
            "line": 3,
            "field": "label",
            "code": "invalid_label",
            "message": "label must be 0 or 1",
            "hint": "1 means output_A is preferred",
        }
    ]
    transport, _ = scripted(
        error(404, "run_not_found", id="run_x"),
        error(422, "invalid_feedback", errors=report, truncated=False, records_checked=3),
        httpx.Response(500, text="<html>oops</html>"),
    )
    with Client("http://halos", transport=transport, retry=FAST) as client:
        with pytest.raises(NotFoundError) as missing:
            client.runs.get("run_x")
        assert missing.value.code == "run_not_found" and missing.value.details == {"id": "run_x"}
        with pytest.raises(InvalidFeedbackError) as bad:
            client.feedback.upload(b"[]")
        assert [(r.line, r.field, r.hint) for r in bad.value.records] == [(3, "label", "1 means output_A is preferred")]
        with pytest.raises(ServerError) as broken:
            client.models.get("m")
        assert broken.value.code == "http_500" and "oops" in broken.value.message


def test_async_client_retries_the_same_way() -> None:
    transport, seen = scripted(
        httpx.ConnectError, error(503, "busy", {"Retry-After": "0"}), httpx.Response(201, json=FEEDBACK)
    )

    async def go() -> str:
        async with AsyncClient("http://halos", transport=transport, retry=FAST) as client:
            return (await client.feedback.upload(b"{}")).id

    assert asyncio.run(go()) == "fb_1"
    assert len(seen) == 3 and len({r.headers["Idempotency-Key"] for r in seen}) == 1


def test_new_log_text() -> None:
    assert new_log_text("", "a\nb\n") == "a\nb\n"
    assert new_log_text("a\nb\n", "a\nb\nc\n") == "c\n"
    window = "".join(f"step {i}\n" for i in range(400))
    assert new_log_text(window, window[800:] + "step 400\n") == "step 400\n"  # the tail window moved on
    assert new_log_text("a\nb\n", "a\nb\n") == ""
    assert new_log_text("old\n", "x\ny\n") == "x\ny\n"  # more than a window written: all of it is new


def _job(status: str, error: str | None = None) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "job_1",
            "kind": "round",
            "status": status,
            "attempt": 1,
            "max_attempts": 3,
            "cancel_requested": False,
            "progress": {"step": 1, "round_step": 1, "total_steps": 4, "examples": 4},
            "error": error,
            "created_at": "2030-01-01T00:00:00Z",
        },
    )


def test_wait_rides_out_an_outage_once_it_has_seen_the_job_and_times_out() -> None:
    outage = [httpx.ConnectError] * FAST.max_attempts  # one whole get() fails
    transport, seen = scripted(_job("running"), *outage, _job("succeeded"))
    progress: list[str] = []
    with Client("http://halos", transport=transport, retry=FAST) as client:
        job = client.jobs.wait("job_1", poll_interval=0.01, timeout=30, on_progress=lambda j: progress.append(j.status))
    assert job.status == "succeeded" and progress == ["running", "succeeded"] and len(seen) == 2 + len(outage)

    transport, _ = scripted(_job("failed", "worker error: boom"))
    with Client("http://halos", transport=transport, retry=FAST) as client:
        with pytest.raises(JobFailed) as failed:
            client.jobs.wait("job_1")
        assert failed.value.reason == "worker error: boom" and "job_1 failed" in str(failed.value)
        assert client.jobs.wait("job_1", raise_on_failure=False).status == "failed"

    transport, _ = scripted(_job("running"))
    with Client("http://halos", transport=transport, retry=FAST) as client:
        t0 = time.monotonic()
        with pytest.raises(WaitTimeout) as late:
            client.jobs.wait("job_1", poll_interval=0.05, timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 2 and late.value.job.status == "running"

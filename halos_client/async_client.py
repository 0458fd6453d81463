"""`AsyncClient`: `Client`'s surface for asyncio (httpx.AsyncClient), same calls, same retries.

async with AsyncClient() as client:
    rnd = await client.rounds.create(run_id, [fb.id])
    job = await client.jobs.wait(rnd.job_id, timeout=3600)
    async for job in client.jobs.list(status="running"):
        ...
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying

from halos_client import calls
from halos_client import models as m
from halos_client.bodies import UNSET, round_body, run_body
from halos_client.calls import TERMINAL_STATUSES, Call, FileSource, Upload, user_agent
from halos_client.errors import (
    APIConnectionError,
    JobFailed,
    RateLimitError,
    ServiceUnavailableError,
    WaitTimeout,
    error_from_response,
)
from halos_client.events import StreamMessage, aiter_events
from halos_client.retry import NO_RETRIES, RetryPolicy, retrying_options

T = TypeVar("T")
log = logging.getLogger("halos_client")

ProgressCallback = Callable[[m.JobOut], None | Awaitable[None]]


class AsyncClient:
    """See `halos_client.Client` for the arguments."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = calls.resolve_base_url(base_url)
        key = calls.resolve_api_key(api_key)
        default_headers = {
            "User-Agent": user_agent(),
            **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {}),
        }
        self.retry = retry
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=default_headers, transport=transport
        )
        self.models = AsyncModels(self)
        self.feedback = AsyncFeedback(self)
        self.runs = AsyncRuns(self)
        self.rounds = AsyncRounds(self)
        self.jobs = AsyncJobs(self)
        self.checkpoints = AsyncCheckpoints(self)
        self.losses = AsyncLosses(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, call: Call[T], *, retry: RetryPolicy | None = None) -> T:
        retrying = AsyncRetrying(**retrying_options(retry or self.retry, call.idempotent, call.what))
        try:
            response: httpx.Response = await retrying(self._send_once, call)
        except httpx.TransportError as exc:
            raise APIConnectionError(
                f"{call.what} on {self.base_url}: {type(exc).__name__}: {exc}", getattr(exc, "_request", None)
            ) from exc
        if response.is_error:
            raise error_from_response(response)
        return call.parse(response)

    async def _send_once(self, call: Call[Any]) -> httpx.Response:
        with call.upload.files() if call.upload else nullcontext(None) as files:
            return await self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                files=files,
                headers=dict(call.headers),
                timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )

    async def usage(self) -> m.UsageOut:
        return await self.request(calls.get_usage())

    async def ready(self) -> m.ReadyOut:
        return await self.request(calls.readyz(), retry=NO_RETRIES)

    async def wait_ready(self, timeout: float = 60.0, poll_interval: float = 0.5) -> m.ReadyOut:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.ready()
            except (APIConnectionError, ServiceUnavailableError):
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(poll_interval)

    async def _pages(self, make: Callable[[str | None], Call[Any]]) -> AsyncIterator[Any]:
        cursor: str | None = None
        while True:
            page = await self.request(make(cursor))
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            cursor = page.next_cursor


class _Resource:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client


class AsyncModels(_Resource):
    async def register(self, name: str, path: str, *, idempotency_key: str | None = None) -> m.ModelOut:
        return await self._client.request(calls.register_model(m.ModelCreate(name=name, path=path), idempotency_key))

    async def get(self, model_id: str) -> m.ModelOut:
        return await self._client.request(calls.get_model(model_id))

    def list(self, *, page_size: int = 50) -> AsyncIterator[m.ModelOut]:
        return self._client._pages(lambda cursor: calls.list_models(cursor, page_size))

    async def delete(self, model_id: str) -> None:
        await self._client.request(calls.delete_model(model_id))


class AsyncFeedback(_Resource):
    async def upload(
        self, file: FileSource, *, filename: str | None = None, idempotency_key: str | None = None
    ) -> m.FeedbackOut:
        return await self._client.request(calls.upload_feedback(Upload(file, filename), idempotency_key))

    async def get(self, feedback_id: str) -> m.FeedbackOut:
        return await self._client.request(calls.get_feedback(feedback_id))

    def list(self, *, page_size: int = 50) -> AsyncIterator[m.FeedbackOut]:
        return self._client._pages(lambda cursor: calls.list_feedback(cursor, page_size))

    async def delete(self, feedback_id: str) -> None:
        await self._client.request(calls.delete_feedback(feedback_id))


class AsyncRuns(_Resource):
    async def create(
        self,
        model_id: str,
        loss: Any,
        *,
        name: str | None = None,
        hyperparams: Any = None,
        conversion: Any = None,
        lora: Any = None,
        idempotency_key: str | None = None,
    ) -> m.RunOut:
        body = run_body(model_id, loss, name=name, hyperparams=hyperparams, conversion=conversion, lora=lora)
        return await self._client.request(calls.create_run(body, idempotency_key))

    async def get(self, run_id: str) -> m.RunOut:
        return await self._client.request(calls.get_run(run_id))

    def list(self, *, page_size: int = 50) -> AsyncIterator[m.RunSummary]:
        return self._client._pages(lambda cursor: calls.list_runs(cursor, page_size))

    async def delete(self, run_id: str) -> None:
        await self._client.request(calls.delete_run(run_id))

    async def retention(self, run_id: str) -> m.RetentionPlan:
        return await self._client.request(calls.retention_plan(run_id))

    async def set_retention(
        self, run_id: str, *, keep_rounds: int | None = None, keep_weights_rounds: int | None = None
    ) -> m.RetentionPlan:
        body = m.RetentionPolicy(keep_rounds=keep_rounds, keep_weights_rounds=keep_weights_rounds)
        return await self._client.request(calls.set_retention(run_id, body))

    async def apply_retention(self, run_id: str) -> m.RetentionPlan:
        return await self._client.request(calls.apply_retention(run_id))


class AsyncRounds(_Resource):
    async def create(
        self,
        run_id: str,
        feedback_ids: Sequence[str],
        *,
        loss: Any = None,
        hyperparams: Any = None,
        conversion: Any = UNSET,
        parent_checkpoint_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> m.RoundOut:
        body = round_body(
            feedback_ids,
            loss=loss,
            hyperparams=hyperparams,
            conversion=conversion,
            parent_checkpoint_id=parent_checkpoint_id,
        )
        return await self._client.request(calls.create_round(run_id, body, idempotency_key))

    async def list(self, run_id: str) -> list[m.RoundOut]:
        return (await self._client.runs.get(run_id)).rounds


class AsyncJobs(_Resource):
    async def get(self, job_id: str) -> m.JobOut:
        return await self._client.request(calls.get_job(job_id))

    def list(self, *, status: str | None = None, page_size: int = 50) -> AsyncIterator[m.JobOut]:
        return self._client._pages(lambda cursor: calls.list_jobs(cursor, page_size, status))

    async def metrics(
        self, job_id: str, *, split: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[m.MetricPointOut]:
        after: int | None = None
        while True:
            page = await self._client.request(calls.job_metrics(job_id, after, page_size, split))
            for point in page.items:
                yield point
            if page.next_after_step is None:
                return
            after = page.next_after_step

    async def logs(self, job_id: str, *, tail_bytes: int | None = None) -> str:
        return await self._client.request(calls.job_logs(job_id, tail_bytes))

    async def follow_logs(self, job_id: str, *, poll_interval: float = 1.0) -> AsyncIterator[str]:
        previous = ""
        while True:
            finished = (await self.get(job_id)).status in TERMINAL_STATUSES
            current = await self.logs(job_id)
            new = calls.new_log_text(previous, current)
            if new:
                yield new
            previous = current
            if finished:
                return
            await asyncio.sleep(poll_interval)

    def events(
        self, job_id: str, *, last_event_id: str | None = None, metrics: bool = True
    ) -> AsyncIterator[StreamMessage]:
        """The job's events (and metric points) as they happen until it has finished; see `Jobs.events`."""
        return aiter_events(self._client._http, job_id, last_event_id=last_event_id, metrics=metrics)

    async def cancel(self, job_id: str) -> m.JobOut:
        return await self._client.request(calls.cancel_job(job_id))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        on_progress: ProgressCallback | None = None,
        raise_on_failure: bool = True,
    ) -> m.JobOut:
        """See `Client.jobs.wait`; `on_progress` may be a plain function or a coroutine function."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job: m.JobOut | None = None
        while True:
            try:
                job = await self.get(job_id)
            except (APIConnectionError, ServiceUnavailableError, RateLimitError) as exc:
                if job is None and deadline is None:
                    raise
                log.warning("waiting for %s: %s", job_id, exc)
            else:
                if on_progress is not None:
                    outcome = on_progress(job)
                    if asyncio.iscoroutine(outcome):
                        await outcome
                if job.status in TERMINAL_STATUSES:
                    if raise_on_failure and job.status != "succeeded":
                        raise JobFailed(job)
                    return job
            if deadline is not None and time.monotonic() >= deadline:
                if job is None:
                    raise APIConnectionError(f"GET /v1/jobs/{job_id}: the server did not answer within {timeout:g} s")
                raise WaitTimeout(job, timeout or 0.0)
            pause = poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - time.monotonic()))
            await asyncio.sleep(pause)


class AsyncLosses(_Resource):
    async def list(self) -> list[m.LossInfo]:
        return (await self._client.request(calls.list_losses())).losses


class AsyncCheckpoints(_Resource):
    async def get(self, checkpoint_id: str) -> m.CheckpointOut:
        return await self._client.request(calls.get_checkpoint(checkpoint_id))

    async def lineage(self, checkpoint_id: str) -> m.LineageOut:
        return await self._client.request(calls.checkpoint_lineage(checkpoint_id))

    async def pin(self, checkpoint_id: str) -> m.CheckpointOut:
        return await self._client.request(calls.pin_checkpoint(checkpoint_id, True))

    async def unpin(self, checkpoint_id: str) -> m.CheckpointOut:
        return await self._client.request(calls.pin_checkpoint(checkpoint_id, False))

"""`Client`: the synchronous Python client of the halos-server HTTP API (httpx).

    from halos_client import Client

    with Client() as client:                      # HALOS_BASE_URL, HALOS_API_KEY (or arguments)
        model = client.models.register("sft", "/models/my-sft")
        fb = client.feedback.upload("pairs.jsonl")
        run = client.runs.create(model.id, loss={"name": "dpo", "beta": 0.1})
        rnd = client.rounds.create(run.id, [fb.id])
        job = client.jobs.wait(rnd.job_id, on_progress=lambda j: print(j.progress.round_step, j.eta_s))
        for point in client.jobs.metrics(job.id):  # every page, lazily
            ...

Lists are iterators that fetch the next page when the current one is used up. Every call is
retried where that is safe (see `halos_client.retry`); errors are `halos_client.errors` classes.
`AsyncClient` (halos_client.async_client) has the same surface with `await` / `async for`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

import httpx
from tenacity import Retrying

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
from halos_client.events import StreamMessage, iter_events
from halos_client.retry import NO_RETRIES, RetryPolicy, retrying_options

T = TypeVar("T")
log = logging.getLogger("halos_client")


class Client:
    """A connection to one halos server. `base_url` defaults to `HALOS_BASE_URL` (else
    http://127.0.0.1:8000), `api_key` to `HALOS_API_KEY`. `timeout`: seconds per request
    (model registration gets an hour: it hashes the directory in the request). `retry`: see
    `RetryPolicy`; `NO_RETRIES` turns retries off. `transport`: an httpx transport (tests)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.BaseTransport | None = None,
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
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=default_headers, transport=transport)
        self.models = Models(self)
        self.feedback = Feedback(self)
        self.runs = Runs(self)
        self.rounds = Rounds(self)
        self.jobs = Jobs(self)
        self.checkpoints = Checkpoints(self)
        self.losses = Losses(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, call: Call[T], *, retry: RetryPolicy | None = None) -> T:
        """Send one API call (retried per `retry`, default the client's) and parse its answer."""
        retrying = Retrying(**retrying_options(retry or self.retry, call.idempotent, call.what))
        try:
            response = retrying(self._send_once, call)
        except httpx.TransportError as exc:
            raise APIConnectionError(
                f"{call.what} on {self.base_url}: {type(exc).__name__}: {exc}", getattr(exc, "_request", None)
            ) from exc
        if response.is_error:
            raise error_from_response(response)
        return call.parse(response)

    def _send_once(self, call: Call[Any]) -> httpx.Response:
        with call.upload.files() if call.upload else nullcontext(None) as files:
            return self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                files=files,
                headers=dict(call.headers),
                timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )

    def usage(self) -> m.UsageOut:
        """GET /v1/usage: the project's bytes on disk by kind, and the data dir's free space."""
        return self.request(calls.get_usage())

    def ready(self) -> m.ReadyOut:
        """GET /readyz once: the database and the broker answer (else `ServiceUnavailableError`)."""
        return self.request(calls.readyz(), retry=NO_RETRIES)

    def wait_ready(self, timeout: float = 60.0, poll_interval: float = 0.5) -> m.ReadyOut:
        """Poll /readyz until the server is up and ready (a server that is starting refuses connections)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ready()
            except (APIConnectionError, ServiceUnavailableError):
                if time.monotonic() >= deadline:
                    raise
            time.sleep(poll_interval)

    def _pages(self, make: Callable[[str | None], Call[Any]]) -> Iterator[Any]:
        cursor: str | None = None
        while True:
            page = self.request(make(cursor))
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client


class Models(_Resource):
    def register(self, name: str, path: str, *, idempotency_key: str | None = None) -> m.ModelOut:
        """Register a server-side SFT model directory (absolute path); its content hash is recorded."""
        return self._client.request(calls.register_model(m.ModelCreate(name=name, path=path), idempotency_key))

    def get(self, model_id: str) -> m.ModelOut:
        return self._client.request(calls.get_model(model_id))

    def list(self, *, page_size: int = 50) -> Iterator[m.ModelOut]:
        return self._client._pages(lambda cursor: calls.list_models(cursor, page_size))

    def delete(self, model_id: str) -> None:
        """End the registration (the directory stays); 409 `ConflictError` while a run uses it."""
        self._client.request(calls.delete_model(model_id))


class Feedback(_Resource):
    def upload(
        self, file: FileSource, *, filename: str | None = None, idempotency_key: str | None = None
    ) -> m.FeedbackOut:
        """Upload a feedback file (a path, streamed, or bytes). A bad file raises
        `InvalidFeedbackError` whose `.records` lists every bad record; nothing is stored."""
        return self._client.request(calls.upload_feedback(Upload(file, filename), idempotency_key))

    def get(self, feedback_id: str) -> m.FeedbackOut:
        return self._client.request(calls.get_feedback(feedback_id))

    def list(self, *, page_size: int = 50) -> Iterator[m.FeedbackOut]:
        return self._client._pages(lambda cursor: calls.list_feedback(cursor, page_size))

    def delete(self, feedback_id: str) -> None:
        """Delete the file's bytes (a tombstone row stays); 409 while an unfinished job uses it."""
        self._client.request(calls.delete_feedback(feedback_id))


class Runs(_Resource):
    def create(
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
        """A run on a registered model. `loss`: a name (`"dpo"`), a dict or a LossConfig model."""
        body = run_body(model_id, loss, name=name, hyperparams=hyperparams, conversion=conversion, lora=lora)
        return self._client.request(calls.create_run(body, idempotency_key))

    def get(self, run_id: str) -> m.RunOut:
        return self._client.request(calls.get_run(run_id))

    def list(self, *, page_size: int = 50) -> Iterator[m.RunSummary]:
        return self._client._pages(lambda cursor: calls.list_runs(cursor, page_size))

    def delete(self, run_id: str) -> None:
        """Delete the run's checkpoints and run directories; 409 while a job of the run is unfinished."""
        self._client.request(calls.delete_run(run_id))

    def retention(self, run_id: str) -> m.RetentionPlan:
        """Dry run: what the run's retention would remove now, and what it keeps and why."""
        return self._client.request(calls.retention_plan(run_id))

    def set_retention(
        self, run_id: str, *, keep_rounds: int | None = None, keep_weights_rounds: int | None = None
    ) -> m.RetentionPlan:
        body = m.RetentionPolicy(keep_rounds=keep_rounds, keep_weights_rounds=keep_weights_rounds)
        return self._client.request(calls.set_retention(run_id, body))

    def apply_retention(self, run_id: str) -> m.RetentionPlan:
        return self._client.request(calls.apply_retention(run_id))


class Rounds(_Resource):
    def create(
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
        """Queue a round. `hyperparams`: a partial override of the run's; `conversion`: left out =
        the run's, None = no conversion for this round. Wait for it with `client.jobs.wait(r.job_id)`."""
        body = round_body(
            feedback_ids,
            loss=loss,
            hyperparams=hyperparams,
            conversion=conversion,
            parent_checkpoint_id=parent_checkpoint_id,
        )
        return self._client.request(calls.create_round(run_id, body, idempotency_key))

    def list(self, run_id: str) -> list[m.RoundOut]:
        """The run's rounds in order."""
        return self._client.runs.get(run_id).rounds


class Jobs(_Resource):
    def get(self, job_id: str) -> m.JobOut:
        return self._client.request(calls.get_job(job_id))

    def list(self, *, status: str | None = None, page_size: int = 50) -> Iterator[m.JobOut]:
        """Newest first, every page; `status` filters (`running`, `failed`, …)."""
        return self._client._pages(lambda cursor: calls.list_jobs(cursor, page_size, status))

    def metrics(self, job_id: str, *, split: str | None = None, page_size: int = 1000) -> Iterator[m.MetricPointOut]:
        """The per-step series, ascending (one point per step and split), every page."""
        after: int | None = None
        while True:
            page = self._client.request(calls.job_metrics(job_id, after, page_size, split))
            yield from page.items
            if page.next_after_step is None:
                return
            after = page.next_after_step

    def logs(self, job_id: str, *, tail_bytes: int | None = None) -> str:
        """The tail of the job's training log (the server's default size unless `tail_bytes`)."""
        return self._client.request(calls.job_logs(job_id, tail_bytes))

    def follow_logs(self, job_id: str, *, poll_interval: float = 1.0) -> Iterator[str]:
        """New log text as it is written, until the job has finished (then the rest, once)."""
        previous = ""
        while True:
            finished = self.get(job_id).status in TERMINAL_STATUSES
            current = self.logs(job_id)
            new = calls.new_log_text(previous, current)
            if new:
                yield new
            previous = current
            if finished:
                return
            time.sleep(poll_interval)

    def events(self, job_id: str, *, last_event_id: str | None = None, metrics: bool = True) -> Iterator[StreamMessage]:
        """The job's events (and metric points) as they happen, from the start or after
        `last_event_id`, until the job has finished (the `end` message); a dropped connection is
        resumed where it stopped (Server-Sent Events, `halos_client.events`)."""
        return iter_events(self._client._http, job_id, last_event_id=last_event_id, metrics=metrics)

    def cancel(self, job_id: str) -> m.JobOut:
        """Queued/waiting: cancelled at once; running: `cancelling` until the training processes are gone."""
        return self._client.request(calls.cancel_job(job_id))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        on_progress: Callable[[m.JobOut], None] | None = None,
        raise_on_failure: bool = True,
    ) -> m.JobOut:
        """Poll until the job has finished and return its final state.

        `on_progress(job)` is called on every poll (status, progress, percent_done, eta_s,
        latest_metrics). A failed or cancelled job raises `JobFailed` (its `.reason` is the
        server's error) unless `raise_on_failure=False`; still unfinished after `timeout`
        seconds raises `WaitTimeout`. Once the job has been seen, an unreachable server (a
        restart, a 503, a 429 past its retries) is waited out, up to `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job: m.JobOut | None = None
        while True:
            try:
                job = self.get(job_id)
            except (APIConnectionError, ServiceUnavailableError, RateLimitError) as exc:
                if job is None and deadline is None:
                    raise
                log.warning("waiting for %s: %s", job_id, exc)
            else:
                if on_progress is not None:
                    on_progress(job)
                if job.status in TERMINAL_STATUSES:
                    if raise_on_failure and job.status != "succeeded":
                        raise JobFailed(job)
                    return job
            if deadline is not None and time.monotonic() >= deadline:
                if job is None:
                    raise APIConnectionError(f"GET /v1/jobs/{job_id}: the server did not answer within {timeout:g} s")
                raise WaitTimeout(job, timeout or 0.0)
            pause = poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - time.monotonic()))
            time.sleep(pause)


class Losses(_Resource):
    def list(self) -> list[m.LossInfo]:
        """The losses this server trains, with their parameters (from its loss registry)."""
        return self._client.request(calls.list_losses()).losses


class Checkpoints(_Resource):
    def get(self, checkpoint_id: str) -> m.CheckpointOut:
        return self._client.request(calls.get_checkpoint(checkpoint_id))

    def lineage(self, checkpoint_id: str) -> m.LineageOut:
        """This checkpoint, its parents back to round 1, and the SFT model at the root."""
        return self._client.request(calls.checkpoint_lineage(checkpoint_id))

    def pin(self, checkpoint_id: str) -> m.CheckpointOut:
        """Keep it whole whatever the run's retention says."""
        return self._client.request(calls.pin_checkpoint(checkpoint_id, True))

    def unpin(self, checkpoint_id: str) -> m.CheckpointOut:
        return self._client.request(calls.pin_checkpoint(checkpoint_id, False))

"""Every API operation as a description of one HTTP call (`Call`), shared by `Client` and
`AsyncClient`: the two differ only in how they send it.

A `Call` is built once per logical call, so its `Idempotency-Key` (every POST gets one) is the
same on each retry of that call, and the server answers a retry of a POST that did its work with
that same object (`Idempotent-Replayed: true`) instead of creating a second one.
"""

from __future__ import annotations

import importlib.metadata
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from halos_client import models as m

T = TypeVar("T")
ModelT = TypeVar("ModelT", bound=BaseModel)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Registering a model hashes the whole directory inside the request (seconds per GB).
MODEL_REGISTRATION_TIMEOUT = httpx.Timeout(3600.0, connect=10.0)

FileSource = Union[str, "os.PathLike[str]", bytes]


def user_agent() -> str:
    try:
        version = importlib.metadata.version("halos-server")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"halos-client/{version} httpx/{httpx.__version__}"


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("HALOS_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("HALOS_API_KEY") or None


@dataclass(frozen=True)
class Upload:
    """A file for a multipart upload, opened afresh for each try (a retry resends it whole)."""

    source: FileSource
    filename: str | None = None

    @property
    def name(self) -> str:
        if self.filename:
            return self.filename
        return "feedback.jsonl" if isinstance(self.source, bytes) else Path(self.source).name

    @contextmanager
    def files(self) -> Iterator[dict[str, tuple[str, bytes | IO[bytes], str]]]:
        if isinstance(self.source, bytes):
            yield {"file": (self.name, self.source, "application/octet-stream")}
            return
        with open(self.source, "rb") as fh:  # streamed by httpx in chunks, never read whole
            yield {"file": (self.name, fh, "application/octet-stream")}


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    idempotent: bool  # a resend after an ambiguous failure cannot do the work twice (see retry.py)
    params: Mapping[str, Any] | None = None
    json: Any = None
    upload: Upload | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: httpx.Timeout | None = None

    @property
    def what(self) -> str:
        return f"{self.method} {self.path}"


def _model(cls: type[ModelT]) -> Callable[[httpx.Response], ModelT]:
    return lambda response: cls.model_validate(response.json())


def _text(response: httpx.Response) -> str:
    return response.text


def _none(response: httpx.Response) -> None:
    return None


def _body(model: BaseModel) -> Any:
    # exclude_unset keeps "absent" and "null" apart (a round's `conversion`: absent = the run's, null = none)
    return model.model_dump(mode="json", exclude_unset=True)


def _post(
    path: str, parse: Callable[[httpx.Response], T], *, deduplicated: bool, idempotency_key: str | None, **kw: Any
) -> Call[T]:
    """A POST carrying an Idempotency-Key. `deduplicated`: the server honours the key for this
    route, so a resend after an ambiguous failure is safe; elsewhere it is only sent along."""
    key = idempotency_key or str(uuid.uuid4())
    return Call("POST", path, parse, idempotent=deduplicated, headers={"Idempotency-Key": key}, **kw)


def _page(cursor: str | None, limit: int, **extra: Any) -> dict[str, Any]:
    params = {"limit": limit, **{k: v for k, v in extra.items() if v is not None}}
    if cursor:
        params["cursor"] = cursor
    return params


# --------------------------------------------------------------------------- models


def register_model(body: m.ModelCreate, idempotency_key: str | None = None) -> Call[m.ModelOut]:
    # Not deduplicated by the server (a second registration is a second model): resent only when
    # the first try provably did nothing (connection refused, 429, 503 busy).
    return _post(
        "/v1/models",
        _model(m.ModelOut),
        deduplicated=False,
        idempotency_key=idempotency_key,
        json=_body(body),
        timeout=MODEL_REGISTRATION_TIMEOUT,
    )


def get_model(model_id: str) -> Call[m.ModelOut]:
    return Call("GET", f"/v1/models/{_seg(model_id)}", _model(m.ModelOut), idempotent=True)


def list_models(cursor: str | None, limit: int) -> Call[m.ModelList]:
    return Call("GET", "/v1/models", _model(m.ModelList), idempotent=True, params=_page(cursor, limit))


# --------------------------------------------------------------------------- feedback


def upload_feedback(upload: Upload, idempotency_key: str | None = None) -> Call[m.FeedbackOut]:
    return _post(
        "/v1/feedback", _model(m.FeedbackOut), deduplicated=True, idempotency_key=idempotency_key, upload=upload
    )


def get_feedback(feedback_id: str) -> Call[m.FeedbackOut]:
    return Call("GET", f"/v1/feedback/{_seg(feedback_id)}", _model(m.FeedbackOut), idempotent=True)


def list_feedback(cursor: str | None, limit: int) -> Call[m.FeedbackList]:
    return Call("GET", "/v1/feedback", _model(m.FeedbackList), idempotent=True, params=_page(cursor, limit))


# --------------------------------------------------------------------------- runs and rounds


def create_run(body: m.RunCreate, idempotency_key: str | None = None) -> Call[m.RunOut]:
    return _post("/v1/runs", _model(m.RunOut), deduplicated=True, idempotency_key=idempotency_key, json=_body(body))


def get_run(run_id: str) -> Call[m.RunOut]:
    return Call("GET", f"/v1/runs/{_seg(run_id)}", _model(m.RunOut), idempotent=True)


def list_runs(cursor: str | None, limit: int) -> Call[m.RunList]:
    return Call("GET", "/v1/runs", _model(m.RunList), idempotent=True, params=_page(cursor, limit))


def create_round(run_id: str, body: m.RoundCreate, idempotency_key: str | None = None) -> Call[m.RoundOut]:
    return _post(
        f"/v1/runs/{_seg(run_id)}/rounds",
        _model(m.RoundOut),
        deduplicated=True,
        idempotency_key=idempotency_key,
        json=_body(body),
    )


# --------------------------------------------------------------------------- jobs


def get_job(job_id: str) -> Call[m.JobOut]:
    return Call("GET", f"/v1/jobs/{_seg(job_id)}", _model(m.JobOut), idempotent=True)


def list_jobs(cursor: str | None, limit: int, status: str | None) -> Call[m.JobList]:
    return Call("GET", "/v1/jobs", _model(m.JobList), idempotent=True, params=_page(cursor, limit, status=status))


def job_metrics(job_id: str, after_step: int | None, limit: int, split: str | None) -> Call[m.MetricSeries]:
    params: dict[str, Any] = {"limit": limit}
    if after_step is not None:
        params["after_step"] = after_step
    if split:
        params["split"] = split
    return Call("GET", f"/v1/jobs/{_seg(job_id)}/metrics", _model(m.MetricSeries), idempotent=True, params=params)


def job_logs(job_id: str, tail_bytes: int | None) -> Call[str]:
    params = {"tail_bytes": tail_bytes} if tail_bytes else None
    return Call("GET", f"/v1/jobs/{_seg(job_id)}/logs", _text, idempotent=True, params=params)


def cancel_job(job_id: str, idempotency_key: str | None = None) -> Call[m.JobOut]:
    # A resend after an ambiguous failure could answer 409 `job_finished` for a cancel that worked.
    return _post(
        f"/v1/jobs/{_seg(job_id)}/cancel", _model(m.JobOut), deduplicated=False, idempotency_key=idempotency_key
    )


# --------------------------------------------------------------------------- checkpoints and health


def get_checkpoint(checkpoint_id: str) -> Call[m.CheckpointOut]:
    return Call("GET", f"/v1/checkpoints/{_seg(checkpoint_id)}", _model(m.CheckpointOut), idempotent=True)


def checkpoint_lineage(checkpoint_id: str) -> Call[m.LineageOut]:
    return Call("GET", f"/v1/checkpoints/{_seg(checkpoint_id)}/lineage", _model(m.LineageOut), idempotent=True)


def list_losses() -> Call[m.LossList]:
    return Call("GET", "/v1/losses", _model(m.LossList), idempotent=True)


# --------------------------------------------------------------------------- storage
# Deletions, pins and retention are idempotent on the server (a repeat changes nothing more):
# a resend after an ambiguous failure is safe.


def _delete(path: str) -> Call[None]:
    return Call("DELETE", path, _none, idempotent=True)


def delete_feedback(feedback_id: str) -> Call[None]:
    return _delete(f"/v1/feedback/{_seg(feedback_id)}")


def delete_run(run_id: str) -> Call[None]:
    return _delete(f"/v1/runs/{_seg(run_id)}")


def delete_model(model_id: str) -> Call[None]:
    return _delete(f"/v1/models/{_seg(model_id)}")


def pin_checkpoint(checkpoint_id: str, pinned: bool) -> Call[m.CheckpointOut]:
    method = "PUT" if pinned else "DELETE"
    return Call(method, f"/v1/checkpoints/{_seg(checkpoint_id)}/pin", _model(m.CheckpointOut), idempotent=True)


def retention_plan(run_id: str) -> Call[m.RetentionPlan]:
    return Call("GET", f"/v1/runs/{_seg(run_id)}/retention", _model(m.RetentionPlan), idempotent=True)


def set_retention(run_id: str, body: m.RetentionPolicy) -> Call[m.RetentionPlan]:
    return Call("PUT", f"/v1/runs/{_seg(run_id)}/retention", _model(m.RetentionPlan), idempotent=True, json=_body(body))


def apply_retention(run_id: str) -> Call[m.RetentionPlan]:
    return Call("POST", f"/v1/runs/{_seg(run_id)}/retention/apply", _model(m.RetentionPlan), idempotent=True)


def get_usage() -> Call[m.UsageOut]:
    return Call("GET", "/v1/usage", _model(m.UsageOut), idempotent=True)


def readyz() -> Call[m.ReadyOut]:
    return Call("GET", "/readyz", _model(m.ReadyOut), idempotent=True)


def _seg(value: str) -> str:
    """An id as one path segment: a `/` or `?` in it cannot reach another route."""
    return quote(str(value), safe="")


# --------------------------------------------------------------------------- helpers of the wait / follow loops


def new_log_text(previous: str, current: str) -> str:
    """What `current` (the log's tail now) adds to `previous` (its tail at the last poll).

    The API serves the last N bytes, cut at a line start; both tails end at the file's end, so
    the end of `previous` reappears in `current` unless more than N bytes were written between
    the polls, in which case all of `current` is new (and some lines were missed)."""
    if not previous:
        return current
    if current == previous:
        return ""
    marker = previous[-1024:]
    at = current.rfind(marker)
    if at < 0:
        return current
    return current[at + len(marker) :]

"""Wire models of events, webhooks and tracking (`/v1/jobs/{id}/events`, the SSE stream, `/v1/webhooks`,
`RunCreate.tracking`).

Pydantic only (no server imports), so the client package can share these classes with the server
instead of copying them (the SDK keeps its wire models server-free for the same reason).
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator


class EventType(str, Enum):
    """Every event the server writes. `job.*` events are written by the job state machine in the
    transaction that changes the job; the others with the object they describe."""

    job_queued = "job.queued"  # submitted, promoted after its parent succeeded, or released by a stopping worker
    job_waiting_for_parent = "job.waiting_for_parent"
    job_started = "job.started"  # an attempt claimed the job (data: attempt, host)
    job_checkpoint_saved = "job.checkpoint_saved"  # an intermediate checkpoint is complete (data: step, name)
    job_eval_done = "job.eval_done"  # an eval pass finished (data: step, metrics)
    job_attempt_crashed = "job.attempt_crashed"  # data: attempt, reason
    job_retry_scheduled = "job.retry_scheduled"  # data: at, delay_s, retry, max_attempts
    job_released = "job.released"  # a worker shut down: back to queued without using a retry (data: reason)
    job_cancelling = "job.cancelling"
    job_succeeded = "job.succeeded"  # data: checkpoint_id, step, examples, round_step
    job_failed = "job.failed"  # data: error
    job_cancelled = "job.cancelled"  # data: error
    checkpoint_created = "checkpoint.created"  # a round's final checkpoint was registered
    feedback_stored = "feedback.stored"  # a feedback file was validated and stored


TERMINAL_EVENT_TYPES = frozenset({EventType.job_succeeded, EventType.job_failed, EventType.job_cancelled})

# What a webhook endpoint may subscribe to: an event type, `job.finished` (succeeded, failed or
# cancelled) or `*` (everything).
SUBSCRIPTION_ALIASES: dict[str, frozenset[str]] = {
    "job.finished": frozenset(t.value for t in TERMINAL_EVENT_TYPES),
    "*": frozenset(t.value for t in EventType),
}


# What `event_types` accepts, spelled out so the OpenAPI spec says it (kept equal to the above by a test)
Subscription = Literal[
    "*",
    "job.finished",
    "job.queued",
    "job.waiting_for_parent",
    "job.started",
    "job.checkpoint_saved",
    "job.eval_done",
    "job.attempt_crashed",
    "job.retry_scheduled",
    "job.released",
    "job.cancelling",
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "checkpoint.created",
    "feedback.stored",
]


def subscription_matches(subscriptions: list[str], event_type: str) -> bool:
    return any(event_type == s or event_type in SUBSCRIPTION_ALIASES.get(s, ()) for s in subscriptions)


class EventOut(BaseModel):
    """One event. `id` increases; pass the last one seen as `after` (or `Last-Event-ID`) to go on."""

    id: int
    type: EventType
    job_id: str | None = None
    run_id: str | None = None
    subject_id: str | None = Field(None, description="the object the event is about (job, checkpoint, feedback)")
    attempt: int | None = None
    status: str | None = Field(None, description="the job's status right after the event")
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class EventList(BaseModel):
    items: list[EventOut]
    next_cursor: int | None = Field(None, description="pass as `after` for the next page; null: no more now")


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(description="http(s) URL that receives POSTs signed per Standard Webhooks")
    event_types: list[Subscription] = Field(
        min_length=1,
        max_length=64,
        description=("event types to deliver (see EventType), `job.finished` (succeeded, failed or cancelled) or `*`"),
    )
    description: str | None = Field(None, max_length=500)

    @field_validator("url")
    @classmethod
    def _url_length(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        if len(str(value)) > 2048:
            raise ValueError("URL longer than 2048 characters")
        return value

    @field_validator("event_types")
    @classmethod
    def _unique(cls, value: list[Subscription]) -> list[Subscription]:
        return sorted(set(value))


class WebhookOut(BaseModel):
    id: str
    url: str
    event_types: list[str]
    description: str | None = None
    created_at: datetime
    secret_rotated_at: datetime | None = Field(
        None,
        description="when the secret was last rotated; the previous one signs too until previous_secret_expires_at",
    )
    previous_secret_expires_at: datetime | None = None


class WebhookWithSecret(WebhookOut):
    """Returned by create and rotate only: the signing secret (`whsec_…`), shown once."""

    secret: str


class WebhookList(BaseModel):
    items: list[WebhookOut]
    next_cursor: str | None = None


class DeliveryAttemptOut(BaseModel):
    attempt: int
    started_at: datetime
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    ok: bool


class DeliveryOut(BaseModel):
    id: str = Field(description="the `webhook-id` header of every attempt of this delivery")
    endpoint_id: str
    event_id: int
    type: str
    status: str = Field(description="pending | delivered | failed (gave up after webhook_max_age_s)")
    attempts: int
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime
    finished_at: datetime | None = None
    log: list[DeliveryAttemptOut] = Field(default_factory=list)


class DeliveryList(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None = None


# --------------------------------------------------------------------------- experiment tracking


class MlflowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("halos", min_length=1, max_length=200, description="MLflow experiment name")
    tracking_uri: str | None = Field(
        None,
        max_length=1000,
        description="default: the server's HALOS_MLFLOW_TRACKING_URI, else sqlite:///<data_dir>/mlflow.db",
    )


class WandbOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field("halos", min_length=1, max_length=200)
    entity: str | None = Field(None, max_length=200)
    mode: Literal["online", "offline"] = Field("online", description="offline: files only, `wandb sync` later")


class TrackingOptions(BaseModel):
    """Where a run's metrics also go: one MLflow run / one W&B run per server run, across all its
    rounds and retries; per-step metrics at the run's cumulative step; lineage ids as tags."""

    model_config = ConfigDict(extra="forbid")

    mlflow: MlflowOptions | None = None
    wandb: WandbOptions | None = None


class TrackingLinkOut(BaseModel):
    backend: str
    tracking_run_id: str | None = Field(
        None, description="the MLflow run id / W&B run id (null until the first export)"
    )
    exported_steps: dict[str, int] = Field(default_factory=dict, description="job id -> last step exported")
    last_error: str | None = None

"""Database tables (SQLModel). The database is the system of record for every job.

Times are timezone-aware UTC (`utcnow()`); SQLModel stores and returns them with their zone
on SQLite and Postgres alike. Ids are prefixed random
strings (`job_…`, `fb_…`) so a user can tell from an id what it names.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from sqlalchemy import DDL, JSON, Column, Index, UniqueConstraint, event
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _json_column() -> Any:
    return Field(default=None, sa_column=Column(JSON, nullable=True))


class JobStatus(str, Enum):
    """Where a job is (the transitions: server/jobs/state.py). A crashed attempt is not a status:
    the job goes back to `queued` (retry with backoff, the reason in `error`) or to `failed`."""

    waiting = "waiting"  # its parent round has not finished yet
    queued = "queued"
    running = "running"
    cancelling = "cancelling"  # cancel requested while running: the worker is stopping the training
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


# Which statuses count as what, defined once (the state machine, the API filters, the views and
# the checks on a round's parent all read these).
PENDING_STATUSES = frozenset({JobStatus.waiting, JobStatus.queued})  # no attempt yet: a cancel ends it at once
LIVE_STATUSES = frozenset({JobStatus.running, JobStatus.cancelling})  # an attempt holds the lease
UNFINISHED_STATUSES = PENDING_STATUSES | LIVE_STATUSES
TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
FAILED_STATUSES = frozenset({JobStatus.failed, JobStatus.cancelled})  # ended without a checkpoint to continue
assert UNFINISHED_STATUSES | TERMINAL_STATUSES == set(JobStatus), "classify every JobStatus above"


class Project(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("prj"), primary_key=True)
    name: str = Field(index=True, unique=True, max_length=200)
    created_at: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("key"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    prefix: str = Field(index=True, max_length=32)  # shown to humans to tell keys apart
    key_hash: str = Field(unique=True, max_length=128)  # sha256 of the secret; the secret is never stored
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class AuthState(SQLModel, table=True):
    """Generation counters of cached authentication state; one row today, `scope='api_keys'`:
    its `generation` goes up, in the same transaction, whenever an API key stops being valid
    (`keys.revoke_api_key`). API processes cache key lookups and read this integer in each
    request's own transaction: a change empties their cache, so a revoked key is refused on the
    very next request in every API process, without a key lookup per request."""

    scope: str = Field(primary_key=True, max_length=40)
    generation: int = 0


# The row exists from the start (create_all in tests; migration 0002 inserts it too).
event.listen(
    AuthState.__table__,  # type: ignore[attr-defined]  # set by SQLModel on table models; its stubs do not declare it
    "after_create",
    DDL("INSERT INTO authstate (scope, generation) VALUES ('api_keys', 0)"),
)


class Model(SQLModel, table=True):
    """A registered SFT checkpoint directory (immutable; its content hash is recorded)."""

    id: str = Field(default_factory=lambda: new_id("mdl"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    name: str = Field(max_length=200)
    path: str
    sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    # DELETE /v1/models/{id}: the registration ends (the directory is the operator's, never removed);
    # the row stays for the lineage of the runs that used it
    deleted_at: datetime | None = None


class FeedbackFile(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("fb"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    kind: str = Field(max_length=20)  # binary | pairwise | scalar | sampled
    format: str = Field(max_length=40)
    sha256: str = Field(max_length=64, index=True)
    size_bytes: int
    n_records: int
    n_prompts: int
    n_train: int
    n_test: int
    storage_path: str  # under the data dir, named by server id / content hash, never by client name
    original_filename: str | None = Field(default=None, max_length=1024)  # metadata only
    # where it came from: upload | sampling | labelling | label_studio | label_studio_webhook | argilla_webhook
    source: str = Field(default="upload", max_length=40)
    job_id: str | None = Field(default=None, foreign_key="job.id", index=True)  # the job that generated it
    provenance: dict | None = _json_column()  # generator / reward model / inputs (server/services/artefacts.py)
    findings: dict | None = _json_column()  # data-quality warnings of the upload (halos_core.feedback.quality)
    created_at: datetime = Field(default_factory=utcnow)
    # a tombstone: the bytes are gone (DELETE /v1/feedback/{id}), the row keeps sha256 for the lineage
    deleted_at: datetime | None = None


class PromptSet(SQLModel, table=True):
    """An uploaded set of prompts to sample from (stored content-addressed like feedback)."""

    id: str = Field(default_factory=lambda: new_id("ps"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    format: str = Field(max_length=40)  # prompts | a feedback format whose prompt part was taken
    sha256: str = Field(max_length=64, index=True)
    size_bytes: int
    n_prompts: int
    n_train: int
    n_test: int
    storage_path: str
    original_filename: str | None = Field(default=None, max_length=1024)
    findings: dict | None = _json_column()
    created_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None  # a tombstone, like FeedbackFile.deleted_at


class Run(SQLModel, table=True):
    """An online training run: rounds sharing one pinned reference (the SFT model)."""

    id: str = Field(default_factory=lambda: new_id("run"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    name: str | None = Field(default=None, max_length=200)
    model_id: str = Field(foreign_key="model.id")
    loss: dict = _json_column()  # default LossConfig
    hyperparams: dict = _json_column()  # default Hyperparams
    conversion: dict | None = _json_column()
    lora: dict | None = _json_column()
    # the checkpoint the next round continues from and sampling uses (None: the SFT model); moved
    # by promotion (server/jobs/head.py) and rollback (server/services/head.py), each move a HeadMove
    head_checkpoint_id: str | None = Field(default=None, max_length=64)
    retention: dict | None = _json_column()  # halos_client RetentionPolicy overrides; None: the settings'
    created_at: datetime = Field(default_factory=utcnow)
    # DELETE /v1/runs/{id}: its checkpoints and run directories are removed, the rows stay (lineage)
    deleted_at: datetime | None = None


class HeadMove(SQLModel, table=True):
    """Append-only history of a run's head: promotions of rounds and rollbacks."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    from_checkpoint_id: str | None = Field(default=None, max_length=64)  # None: the SFT model
    to_checkpoint_id: str | None = Field(default=None, max_length=64)
    reason: str = Field(max_length=20)  # promoted | rollback
    round_id: str | None = Field(default=None, max_length=64)  # the promoted round
    created_at: datetime = Field(default_factory=utcnow)


class Round(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("run_id", "index", name="uq_round_run_index"),)

    id: str = Field(default_factory=lambda: new_id("rnd"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    index: int  # 1, 2, … within the run
    job_id: str = Field(foreign_key="job.id", unique=True)
    parent_round_id: str | None = Field(default=None, foreign_key="round.id")
    # Round <-> Checkpoint would be a foreign-key cycle; Checkpoint.round_id is the enforced direction.
    parent_checkpoint_id: str | None = Field(default=None, max_length=64)  # None: the SFT model
    feedback_ids: list = _json_column()
    loss: dict = _json_column()
    hyperparams: dict = _json_column()
    conversion: dict | None = _json_column()
    checkpoint_id: str | None = Field(default=None, max_length=64)  # the round's output
    gate: list | None = _json_column()  # halos_core.gate.GateRule list; None: always promoted
    promoted: bool | None = None  # set when the round succeeds
    promotion: dict | None = _json_column()  # why (not) promoted: the gate's verdict, the head it started from
    created_at: datetime = Field(default_factory=utcnow)


class Job(SQLModel, table=True):
    """The unit a worker executes. Only server/jobs.py writes `status`."""

    __table_args__ = (Index("ix_job_status_not_before", "status", "not_before"),)

    id: str = Field(default_factory=lambda: new_id("job"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    kind: str = Field(default="round", max_length=20)
    status: JobStatus = Field(default=JobStatus.queued)
    attempt: int = 0  # number of attempts started
    max_attempts: int = 3
    lease_token: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = None
    not_before: datetime | None = None  # retry backoff
    cancel_requested: bool = False
    parent_job_id: str | None = Field(default=None, foreign_key="job.id", index=True)  # waits for it
    spec: dict = _json_column()  # what the runner turns into a halos_core RunConfig
    run_dir: str | None = None
    step: int = 0
    round_step: int = 0
    total_steps: int | None = None
    examples: int = 0
    latest_metrics: dict | None = _json_column()
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    queued_at: datetime | None = None
    published_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class Attempt(SQLModel, table=True):
    """Append-only: one row per attempt; attempts of a job never overlap in time (I2)."""

    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_attempt_job_attempt"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="job.id", index=True)
    attempt: int
    lease_token: str = Field(max_length=64)
    host: str = Field(max_length=255)
    pid: int | None = None
    started_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None
    outcome: str | None = Field(default=None, max_length=20)
    error: str | None = None
    resumed_from_step: int | None = None


class GangMember(SQLModel, table=True):
    """One worker of a multi-node attempt (a round with `hyperparams.nodes` > 1; server/jobs/gang.py).

    The attempt's workers share the job's lease token (the attempt's); each member also holds its
    own `token` and lease, renewed by its heartbeats: a member whose lease expires fails the attempt
    for all. A new attempt of the job starts only when every member of the previous one has ended
    or its lease has expired (no two attempts' trainers overlap, I2). Rank 0's row holds the gang's
    rendezvous address, when the gang became full (`formed_at`) and what it resumes from.
    """

    __table_args__ = (UniqueConstraint("job_id", "attempt", "rank", name="uq_gangmember_job_attempt_rank"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="job.id", index=True)
    attempt: int
    rank: int  # the worker's machine rank: 0 opened the gang and prepares the run directory
    size: int  # the gang's number of nodes
    token: str = Field(max_length=64, unique=True)
    host: str = Field(max_length=255)
    pid: int | None = None
    lease_expires_at: datetime
    joined_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None
    outcome: str | None = Field(default=None, max_length=20)  # done | crashed | failed | released | lost | ...
    # rank 0 only
    address: str | None = Field(default=None, max_length=255)  # c10d rendezvous endpoint host
    port: int | None = None
    formed_at: datetime | None = None  # every member has joined
    ready_at: datetime | None = None  # rank 0 prepared the run directory and launched
    resume_from: str | None = None  # the checkpoint every node resumes from (None: the round's start)


class Checkpoint(SQLModel, table=True):
    id: str = Field(default_factory=lambda: new_id("ckpt"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    round_id: str = Field(foreign_key="round.id")
    job_id: str = Field(foreign_key="job.id")
    model_id: str = Field(foreign_key="model.id")  # the SFT root of the lineage
    parent_id: str | None = Field(default=None, foreign_key="checkpoint.id")  # None: parent is the SFT model
    path: str
    manifest_sha256: str = Field(max_length=64)
    step: int
    examples: int
    created_at: datetime = Field(default_factory=utcnow)
    # storage lifecycle (server/storage_lifecycle): whole | optimizer_pruned (weights loadable, no
    # round continues from it) | pruned (no files; the row and its hashes stay)
    state: str = Field(default="whole", max_length=20)
    pinned: bool = False  # never pruned by retention
    pruned_at: datetime | None = None


class DeletionIntent(SQLModel, table=True):
    """Bytes the database already stopped pointing at, still to be removed from disk. Written in the
    transaction that tombstones / prunes the rows; the storage lifecycle removes the paths and sets
    `finished_at`; the sweeper finishes intents a killed process left behind (removal is idempotent)."""

    __table_args__ = (Index("ix_deletionintent_open", "finished_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    project_id: str | None = Field(default=None, max_length=64)
    kind: str = Field(max_length=40)  # feedback | prompt_set | run | checkpoint_optimizer | checkpoint_weights
    subject_id: str = Field(max_length=64)
    # [{"op": "rmtree"|"unlink"|"drop_optimizer", "path": absolute path}]
    actions: list = _json_column()
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class MetricPoint(SQLModel, table=True):
    __table_args__ = (Index("ix_metricpoint_job_step", "job_id", "step"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="job.id")
    attempt: int
    step: int
    split: str = Field(default="train", max_length=10)
    data: dict = _json_column()
    created_at: datetime = Field(default_factory=utcnow)


class IdempotencyRecord(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("project_id", "endpoint", "key", name="uq_idempotency"),)

    id: int | None = Field(default=None, primary_key=True)
    project_id: str = Field(foreign_key="project.id")
    endpoint: str = Field(max_length=200)
    key: str = Field(max_length=255)
    request_hash: str = Field(max_length=64)
    resource_id: str | None = Field(default=None, max_length=64)
    status_code: int | None = None
    response: dict | None = _json_column()
    created_at: datetime = Field(default_factory=utcnow)


class Integration(SQLModel, table=True):
    """A labelling tool (Label Studio project, Argilla dataset) that posts webhooks to its own endpoint."""

    id: str = Field(default_factory=lambda: new_id("intg"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    tool: str = Field(max_length=20)  # label_studio | argilla
    label_config: str = Field(max_length=20)  # pairwise | rating: what an annotation means
    name: str | None = Field(default=None, max_length=200)
    secret: str = Field(max_length=255)  # shared secret (Label Studio header) / Standard Webhooks key (Argilla)
    created_at: datetime = Field(default_factory=utcnow)


class DraftAnnotation(SQLModel, table=True):
    """One annotation as the tool last sent it: replaced by newer updates, tombstoned by deletes,
    sealed into a feedback file on request (then kept, so replays of it stay no-ops)."""

    __table_args__ = (UniqueConstraint("integration_id", "external_id", name="uq_draft_annotation"),)

    id: int | None = Field(default=None, primary_key=True)
    integration_id: str = Field(foreign_key="integration.id", index=True)
    external_id: str = Field(max_length=200)  # the tool's annotation / response id
    version: str = Field(default="", max_length=64)  # the tool's updated_at: older deliveries are ignored
    deleted: bool = False
    record: dict | None = _json_column()  # a HALOs feedback record (pairwise_feedback / scalar_feedback)
    sealed_into: str | None = Field(default=None, max_length=64)  # the feedback file it went into
    updated_at: datetime = Field(default_factory=utcnow)


class WebhookDelivery(SQLModel, table=True):
    """Delivery ids already processed (Standard Webhooks `webhook-id`): a redelivery is a no-op."""

    __table_args__ = (UniqueConstraint("integration_id", "delivery_id", name="uq_webhook_delivery"),)

    id: int | None = Field(default=None, primary_key=True)
    integration_id: str = Field(foreign_key="integration.id", index=True)
    delivery_id: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utcnow)


# --------------------------------------------------------------------------- events and webhooks
# Written only inside the transactions that change what they describe (server/events.py is the one
# writer; docs/ARCHITECTURE.md "Events and the webhook outbox").


class Event(SQLModel, table=True):
    """Append-only. `id` is the cursor of `GET /v1/jobs/{id}/events` and of the SSE stream: events of
    one job are written under that job's row lock, so their ids commit in increasing order."""

    __table_args__ = (Index("ix_event_job_id", "job_id", "id"), Index("ix_event_project_id", "project_id", "id"))

    id: int | None = Field(default=None, primary_key=True)
    project_id: str = Field(foreign_key="project.id")
    type: str = Field(max_length=40)  # job.started, job.succeeded, checkpoint.created, feedback.stored, …
    job_id: str | None = Field(default=None, foreign_key="job.id")
    run_id: str | None = Field(default=None, max_length=64)
    subject_id: str | None = Field(default=None, max_length=64)  # the object the event is about
    attempt: int | None = None
    status: str | None = Field(default=None, max_length=20)  # the job's status after the event
    data: dict = _json_column()
    created_at: datetime = Field(default_factory=utcnow)


class WebhookEndpoint(SQLModel, table=True):
    """A project's webhook receiver. The signing secret is stored as is: the server needs it to sign
    (Standard Webhooks symmetric `whsec_…`); after a rotation the previous secret also signs until
    `previous_secret_expires_at`."""

    id: str = Field(default_factory=lambda: new_id("whk"), primary_key=True)
    project_id: str = Field(foreign_key="project.id", index=True)
    url: str = Field(max_length=2048)
    event_types: list = _json_column()
    description: str | None = Field(default=None, max_length=500)
    secret: str = Field(max_length=200)
    secret_rotated_at: datetime | None = None
    previous_secret: str | None = Field(default=None, max_length=200)
    previous_secret_expires_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None  # deleted endpoints keep their delivery log, get nothing new


class OutboundDelivery(SQLModel, table=True):
    """The transactional outbox: one row per (event, endpoint), inserted with the event. Its id is the
    `webhook-id` of every attempt (receivers deduplicate on it); `body` is fixed at insert so every
    retry sends (and signs) the same bytes."""

    __table_args__ = (
        Index("ix_outbounddelivery_due", "status", "next_attempt_at"),
        Index("ix_outbounddelivery_endpoint", "endpoint_id", "created_at"),
    )

    id: str = Field(default_factory=lambda: new_id("msg"), primary_key=True)
    project_id: str = Field(foreign_key="project.id")
    endpoint_id: str = Field(foreign_key="webhookendpoint.id")
    event_id: int = Field(foreign_key="event.id")
    type: str = Field(max_length=40)
    body: str
    status: str = Field(default="pending", max_length=20)  # pending | delivered | failed
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_expires_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class WebhookAttempt(SQLModel, table=True):
    """Append-only log of every HTTP attempt of a delivery (the delivery log of the API)."""

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(foreign_key="outbounddelivery.id", index=True)
    attempt: int
    started_at: datetime = Field(default_factory=utcnow)
    duration_ms: int = 0
    status_code: int | None = None
    error: str | None = None
    ok: bool = False


class TrackingLink(SQLModel, table=True):
    """A run's MLflow / W&B run: one per (run, backend), reused by every round and retry; `exported`
    maps job id → the last step already sent (so no point is sent twice)."""

    __table_args__ = (UniqueConstraint("run_id", "backend", name="uq_trackinglink_run_backend"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="run.id", index=True)
    backend: str = Field(max_length=20)  # mlflow | wandb
    config: dict = _json_column()  # the run's options for this backend (RunCreate.tracking)
    tracking_run_id: str | None = Field(default=None, max_length=200)
    exported: dict = _json_column()
    last_error: str | None = None
    updated_at: datetime = Field(default_factory=utcnow)

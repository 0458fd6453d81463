"""Request and response models of the HTTP API, shared by both ends: the server generates its
OpenAPI spec from them and validates requests with them; the client (`halos_client`) builds its
requests and parses every response with the same classes, so the two cannot drift apart.

Torch-free and server-free on purpose (an import-linter contract): this module imports pydantic
and torch-free halos_core modules only (`config`, `loss_registry`), so `pip install halos-server` on a laptop gives a
client that imports nothing of the server, the database or the trainer.

Request models forbid unknown fields and reject, before field validation, anything the database
or the JSON encoder would choke on later: non-finite numbers (`NaN`, `Infinity` — Python's JSON
parser accepts them), integers beyond 64 bits, NUL characters in strings (Postgres rejects
them), and nesting deeper than `MAX_REQUEST_DEPTH`.
Stored configurations (loss, hyperparameters, …) are returned as plain objects so that a row
written by an older version never turns a read into a 500.
"""

from __future__ import annotations

import math
from copy import copy
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from halos_client.event_models import TrackingLinkOut, TrackingOptions
from halos_core.artefact_spec import LabelRule, SamplingParams, ScalarLabels
from halos_core.config import Conversion, Hyperparams, LoraSettings
from halos_core.gate import GateRule
from halos_core.loss_registry import LossConfig

MAX_REQUEST_DEPTH = 32
MAX_INT = 2**63 - 1
ID_FIELD = Field(min_length=1, max_length=64)


def check_json_value(value: Any, max_depth: int = MAX_REQUEST_DEPTH) -> None:
    """Raise ValueError for NaN/±Infinity, integers beyond 64 bits, NUL characters, or nesting
    deeper than `max_depth`.

    Iterative, so a hostile document cannot exhaust the interpreter's recursion limit here.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth} levels")
            for key, sub in item.items():
                if isinstance(key, str) and "\x00" in key:
                    raise ValueError("NUL characters are not allowed")
                stack.append((sub, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth} levels")
            stack.extend((sub, depth + 1) for sub in item)
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not -MAX_INT <= item <= MAX_INT:
                raise ValueError("integers must fit in 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("non-finite numbers (NaN, Infinity) are not allowed")
        elif isinstance(item, str):
            if "\x00" in item:
                raise ValueError("NUL characters are not allowed")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _sane_json(cls, data: Any) -> Any:
        check_json_value(data)
        return data


class _Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. `invalid_feedback`, `run_not_found`")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --------------------------------------------------------------------------- feedback


class FeedbackRecordError(BaseModel):
    index: int
    line: int | None = None
    field: str
    code: str
    message: str
    hint: str | None = None


class FeedbackOut(_Response):
    id: str
    kind: str = Field(description="binary | pairwise | scalar | sampled")
    format: str
    n_records: int
    n_prompts: int
    n_train: int
    n_test: int
    sha256: str
    size_bytes: int
    filename: str | None = Field(None, description="the client's file name, metadata only (escaped, truncated)")
    source: str = Field(
        "upload", description="upload | sampling | labelling | label_studio | label_studio_webhook | argilla_webhook"
    )
    job_id: str | None = Field(None, description="the sampling / labelling job that generated it")
    provenance: dict[str, Any] | None = Field(None, description="generator / reward model / inputs it came from")
    findings: dict[str, Any] | None = Field(
        None,
        description="data-quality warnings of an upload: counts per code and the first records (index, line, "
        "code, message); pairs with identical outputs are left out of training",
    )
    created_at: datetime
    deleted_at: datetime | None = Field(
        None, description="set once deleted: the bytes are gone, the row stays (a tombstone with its sha256)"
    )


class FeedbackList(BaseModel):
    items: list[FeedbackOut]
    next_cursor: str | None = None


# --------------------------------------------------------------------------- prompt sets, sampling, labelling


class PromptSetOut(_Response):
    id: str
    format: str = Field(description="prompts, or the feedback format whose prompt part was taken")
    n_prompts: int
    n_train: int
    n_test: int
    sha256: str
    size_bytes: int
    filename: str | None = None
    findings: dict[str, Any] | None = None
    created_at: datetime
    deleted_at: datetime | None = Field(None, description="set once deleted (a tombstone: the bytes are gone)")


class PromptSetList(BaseModel):
    items: list[PromptSetOut]
    next_cursor: str | None = None


class SamplingJobCreate(_Request):
    """Sample `n` completions per prompt of a prompt set. The generator is exactly one of a checkpoint,
    a registered model, or a run (= its head, resolved now and recorded)."""

    prompt_set_id: str = ID_FIELD
    checkpoint_id: str | None = Field(None, max_length=64)
    model_id: str | None = Field(None, max_length=64)
    run_id: str | None = Field(None, max_length=64)
    params: SamplingParams = Field(default_factory=SamplingParams)


class LabellingJobCreate(_Request):
    """Label a samples file with a reward model (a `bradley_terry` checkpoint's reward head)."""

    samples_id: str = Field(min_length=1, max_length=64, description="a feedback file of kind `sampled`")
    reward_model_checkpoint_id: str = ID_FIELD
    label: LabelRule = Field(default_factory=ScalarLabels)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    batch_size: int = Field(16, ge=1, le=1024)


# --------------------------------------------------------------------------- models


class ModelCreate(_Request):
    name: str = Field(min_length=1, max_length=200)
    path: str = Field(
        min_length=1,
        max_length=4096,
        pattern=r"^/",
        description="absolute path of a directory loadable by `from_pretrained` (config.json, weights, tokenizer)",
    )


class ModelOut(_Response):
    id: str
    name: str
    path: str
    sha256: str
    created_at: datetime


class ModelList(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None = None


# --------------------------------------------------------------------------- runs and rounds


def _partial(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional (same types and bounds); use `model_dump(exclude_unset=True)`."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        f = copy(info)
        f.default = None
        f.default_factory = None
        fields[field_name] = (info.annotation, f)

    def _no_defaults(schema: dict[str, Any]) -> None:
        for prop in schema.get("properties", {}).values():
            prop.pop("default", None)

    # No NaN/NUL/depth walk needed here: the enclosing request model has already walked the body.
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=_no_defaults),
        __doc__=f"Partial {model.__name__}: only the fields given override the run's values.",
        **fields,
    )


HyperparamsPatch = _partial(Hyperparams, "HyperparamsPatch")


class RetentionPolicy(_Request):
    """Which checkpoints of a run stay whole (server settings `HALOS_RETENTION_*` are the defaults)."""

    keep_rounds: int | None = Field(
        None, ge=1, le=10_000, description="the newest K rounds' checkpoints stay whole (weights + optimizer)"
    )
    keep_weights_rounds: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="older checkpoints up to this many rounds back keep their weights (optimizer state "
        "dropped); older still are pruned entirely (the lineage row stays)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> RetentionPolicy:
        if self.keep_rounds is not None and self.keep_weights_rounds is not None:
            if self.keep_weights_rounds < self.keep_rounds:
                raise ValueError("keep_weights_rounds must be >= keep_rounds")
        return self


class RetentionAction(BaseModel):
    checkpoint_id: str
    round_index: int | None = None
    from_state: Literal["whole", "optimizer_pruned", "pruned"]
    to_state: Literal["optimizer_pruned", "pruned"]
    bytes: int = Field(description="bytes this removes")


class RetentionKept(BaseModel):
    checkpoint_id: str
    round_index: int | None = None
    state: Literal["whole", "optimizer_pruned", "pruned"]
    reasons: list[str] = Field(description="head | pinned | needed_by_job:<id> | recent | outside_data_dir")


class RetentionPlan(BaseModel):
    run_id: str
    dry_run: bool
    policy: RetentionPolicy = Field(description="the policy in effect (the run's overrides over the defaults)")
    actions: list[RetentionAction]
    bytes: int = Field(description="bytes the actions remove (dry run: would remove)")
    kept: list[RetentionKept] = Field(default_factory=list, description="checkpoints kept whole, and why")


class UsageOut(BaseModel):
    project_id: str
    bytes: dict[str, int] = Field(
        description="feedback, prompt_sets, checkpoints_whole, checkpoints_optimizer_pruned, intermediate_checkpoints, "
        "run_logs (everything else in this project's run directories); reference_cache is shared by all projects"
    )
    counts: dict[str, int] = Field(description="feedback, feedback_deleted, checkpoints by state, pinned")
    total_bytes: int = Field(description="sum of this project's bytes (without the shared reference cache)")
    data_dir_free_bytes: int
    reserve_bytes: int = Field(description="free space a new round must leave (HALOS_STORAGE_RESERVE_BYTES)")


class RunCreate(_Request):
    name: str | None = Field(None, max_length=200)
    model_id: str = ID_FIELD
    loss: LossConfig
    hyperparams: Hyperparams = Field(default_factory=Hyperparams)
    conversion: Conversion | None = None
    lora: LoraSettings | None = None
    tracking: TrackingOptions | None = Field(None, description="also log this run to MLflow and/or W&B")
    retention: RetentionPolicy | None = Field(None, description="overrides of the server's retention defaults")


class RoundCreate(_Request):
    feedback_ids: list[str] = Field(min_length=1, max_length=64)
    loss: LossConfig | None = Field(None, description="override of the run's loss for this round")
    hyperparams: HyperparamsPatch | None = Field(  # type: ignore[valid-type]  # a class built at import (_partial)
        None, description="partial override merged over the run's hyperparameters"
    )
    conversion: Conversion | None = Field(
        None, description="absent: the run's conversion; null: no conversion for this round"
    )
    parent_checkpoint_id: str | None = Field(
        None, max_length=64, description="default: the run's head (after the run's latest round, if it is unfinished)"
    )
    gate: list[GateRule] | None = Field(
        None,
        max_length=8,
        description="promotion gate: eval metrics that may not drop below the head's (on this "
        "round's eval set, scored by both); a round failing it succeeds but does not become the head",
    )


class RoundOut(BaseModel):
    index: int
    round_id: str
    run_id: str
    job_id: str
    status: str
    parent_checkpoint_id: str | None = None
    parent_job_id: str | None = None
    checkpoint_id: str | None = None
    feedback_ids: list[str]
    loss: dict[str, Any]
    hyperparams: dict[str, Any]
    conversion: dict[str, Any] | None = None
    gate: list[dict[str, Any]] | None = None
    promoted: bool | None = Field(None, description="set when the round succeeded: did it become the run's head")
    promotion: dict[str, Any] | None = Field(None, description="the gate's verdict and the reason if not promoted")
    created_at: datetime


class HeadMoveOut(BaseModel):
    from_checkpoint_id: str | None = None
    to_checkpoint_id: str | None = None
    reason: str = Field(description="promoted | rollback")
    round_id: str | None = None
    created_at: datetime


class RunOut(BaseModel):
    id: str
    name: str | None = None
    model_id: str
    loss: dict[str, Any]
    hyperparams: dict[str, Any]
    conversion: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    head_checkpoint_id: str | None = Field(
        None, description="what the next round continues from and sampling uses (null: the SFT model)"
    )
    head_history: list[HeadMoveOut] = Field(default_factory=list)
    created_at: datetime
    rounds: list[RoundOut] = Field(default_factory=list)
    tracking: list[TrackingLinkOut] = Field(default_factory=list, description="its MLflow / W&B runs")
    retention: RetentionPolicy | None = Field(None, description="the run's own retention overrides (null: defaults)")


class Rollback(_Request):
    checkpoint_id: str | None = Field(
        ..., max_length=64, description="a checkpoint of this run; null: back to the SFT model"
    )


class LossInfo(BaseModel):
    """One loss a run or round may use (from halos_core.loss_registry)."""

    name: str
    summary: str = Field(description="what it is, with the paper's link")
    data: str = Field(description="paired | unpaired | grouped | sft: the batches it trains on")
    feedback_kinds: list[str] = Field(description="feedback kinds it can use without a conversion")
    needs_reference: bool
    head: str | None = Field(None, description="reward | value: a head it trains on the policy")
    min_microbatch_size: int
    parameters: dict[str, Any] = Field(description="JSON schema of its parameters (with defaults)")


class LossList(BaseModel):
    """The server's catalogue of losses (the same for every project; not paginated)."""

    losses: list[LossInfo]


class RunSummary(BaseModel):
    id: str
    name: str | None = None
    model_id: str
    loss: dict[str, Any]
    created_at: datetime


class RunList(BaseModel):
    items: list[RunSummary]
    next_cursor: str | None = None


# --------------------------------------------------------------------------- jobs


class JobProgress(BaseModel):
    step: int = Field(description="optimizer steps, cumulative across rounds")
    round_step: int = Field(description="optimizer steps within this round")
    total_steps: int | None = None
    examples: int


class JobOut(BaseModel):
    id: str
    kind: str
    status: str
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: JobProgress
    percent_done: float | None = Field(
        None, description="round_step / total_steps × 100 (100 once succeeded); null while total_steps is unknown"
    )
    elapsed_s: float | None = Field(
        None,
        description="seconds since the first attempt started, until the job finished (or now); "
        "includes retries and their backoff; null before the job has started",
    )
    eta_s: float | None = Field(
        None,
        description="estimated seconds until the round's last training step (0 once succeeded), from "
        "the pace of the current attempt's recent steps; null when not running or not yet measurable "
        "(fewer than two steps timed in this attempt)",
    )
    latest_metrics: dict[str, Any] | None = None
    error: str | None = None
    created_at: datetime
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    parent_job_id: str | None = None
    run_id: str | None = None
    round_id: str | None = None
    round_index: int | None = None
    checkpoint_id: str | None = None
    output_feedback_id: str | None = Field(None, description="sampling / labelling job: the feedback file it made")


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = None


class MetricPointOut(BaseModel):
    step: int
    split: str
    attempt: int
    data: dict[str, Any]
    created_at: datetime


class MetricSeries(BaseModel):
    job_id: str
    items: list[MetricPointOut]
    next_after_step: int | None = Field(
        None, description="pass as `after_step` to get the next page; null when this page is the last"
    )


# --------------------------------------------------------------------------- checkpoints


class CheckpointOut(BaseModel):
    id: str
    run_id: str
    round_id: str
    round_index: int | None = None
    job_id: str
    model_id: str
    parent_id: str | None = None
    path: str
    manifest_sha256: str
    step: int
    examples: int
    created_at: datetime
    state: Literal["whole", "optimizer_pruned", "pruned"] = Field(
        "whole",
        description="whole; optimizer_pruned: weights loadable and evaluable, no round can continue from it; "
        "pruned: no files left (the row and its hashes stay)",
    )
    pinned: bool = Field(False, description="kept whole by retention (PUT/DELETE /v1/checkpoints/{id}/pin)")
    can_continue: bool = Field(True, description="a round may continue from it (its optimizer state is there)")
    pruned_at: datetime | None = None


class LineageItem(BaseModel):
    checkpoint_id: str
    round_id: str
    round_index: int | None = None
    job_id: str
    step: int
    examples: int
    manifest_sha256: str
    feedback_ids: list[str]
    loss: dict[str, Any] | None = None
    hyperparams: dict[str, Any] | None = None
    conversion: dict[str, Any] | None = None
    state: Literal["whole", "optimizer_pruned", "pruned"] = "whole"


class ModelRef(BaseModel):
    id: str
    name: str
    path: str
    sha256: str


class LineageOut(BaseModel):
    checkpoint_id: str
    items: list[LineageItem] = Field(description="this checkpoint first, then its parents, back to round 1")
    model: ModelRef = Field(description="the SFT model at the root of the lineage (the pinned reference)")


# --------------------------------------------------------------------------- health


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
    data_dir_free_bytes: int | None = Field(None, description="free space of the data dir's filesystem")


# --------------------------------------------------------------------------- labelling tools


class IntegrationCreate(_Request):
    tool: Literal["label_studio", "argilla"]
    label_config: Literal["pairwise", "rating"] = Field(
        description="pairwise: one answer of two preferred → pairwise feedback; rating: a score → scalar feedback"
    )
    name: str | None = Field(None, max_length=200)
    secret: str | None = Field(
        None,
        min_length=8,
        max_length=255,
        description="Argilla: the webhook's signing secret (whsec_…); Label Studio: generated",
    )


class IntegrationOut(BaseModel):
    id: str
    tool: str
    label_config: str
    name: str | None = None
    webhook_path: str = Field(description="where the tool posts its webhooks (no API key; the secret authenticates)")
    secret: str | None = Field(
        None, description="Label Studio: send it as header X-Halos-Webhook-Secret; shown once, at creation"
    )
    draft: dict[str, int] = Field(default_factory=dict, description="annotations: open (to seal), deleted, sealed")
    created_at: datetime


class WebhookResult(BaseModel):
    status: Literal["ok", "duplicate"]
    changes: dict[str, int] = Field(default_factory=dict, description="added | replaced | deleted | unchanged counts")

"""All configuration, from HALOS_* environment variables (pydantic-settings).

With nothing set, everything lives under `HALOS_DATA_DIR` (default `./halos-data`): a SQLite
database and an embedded SQLite-backed Celery broker, so `halos serve` needs no Postgres and no
Redis. Set `HALOS_DATABASE_URL=postgresql://…` and `HALOS_BROKER_URL=redis://…` to run the API
and any number of `halos worker` processes separately.

Model registration is confined: `POST /v1/models` registers only directories under
`<HALOS_DATA_DIR>/models` (created at startup) or under one of the directories an operator lists
in `HALOS_MODEL_ROOTS` (`:`-separated or a JSON list), judged after resolving symlinks, of the
directory and of every file in it; else 422 `model_path_not_allowed`. Unset or empty, only the
data dir's `models/` folder is allowed: an API key never makes the server read and hash an
arbitrary directory. docker-compose.yml adds `/models` (the mounted model directory); listing
`/` opens the whole filesystem again and the API logs a warning at startup.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HALOS_", extra="ignore")

    data_dir: Path = Field(Path("halos-data"), description="feedback files, run directories, SQLite files")
    database_url: str | None = Field(None, description="default: sqlite:///<data_dir>/halos.db")
    broker_url: str | None = Field(None, description="default: sqla+sqlite:///<data_dir>/broker.db (embedded)")
    redis_visibility_timeout_s: int = 3600  # redelivery of unacked tasks; harmless thanks to the DB claim

    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    auth_enabled: bool = True
    max_upload_bytes: int = 256 * 1024 * 1024
    max_json_depth: int = 32
    max_record_bytes: int = 1024 * 1024
    max_records_per_file: int = 1_000_000
    max_validation_errors: int = 100
    validation_workers: int = Field(2, ge=1)  # processes that validate uploaded feedback (off the API's interpreter)
    max_samples_per_job: int = Field(100_000, ge=1)  # n x prompts of one sampling job; more ⇒ 422
    rate_limit_per_minute: int = 600  # requests per API key per minute; 0 disables
    idempotency_ttl_hours: int = 48
    log_tail_bytes: int = 64 * 1024

    # model registration (POST /v1/models reads and sha256-hashes a server-side directory)
    model_roots: Annotated[list[Path] | None, NoDecode] = Field(
        None, description="directories models may be registered from, besides <data_dir>/models (module docstring)"
    )
    max_concurrent_model_hashes: int = Field(2, ge=1)  # more registrations hashing at once ⇒ 503 + Retry-After
    max_model_files: int = Field(10_000, ge=1)  # a model directory with more files ⇒ 422 model_too_large

    # training workers
    num_processes: int = 1  # accelerate processes per job (GPUs per job)
    mixed_precision: Literal["no", "bf16"] = "no"  # fp16 is refused: its loss-scaler state is not checkpointed
    use_cpu: bool = False  # force accelerate onto the CPU even when CUDA is present
    fsdp: bool = False
    worker_concurrency: int = 1  # jobs one worker runs at once
    python_executable: str | None = None  # interpreter of the trainer (or of `accelerate launch`); default: this one
    trainer_module: str = (
        "halos_core.train"  # `[accelerate launch] -m <this> --config run.json` (tests: a fake trainer)
    )
    main_process_port: int | None = None  # multi-process rendezvous port; default: a free port per job
    # multi-node rounds (`hyperparams.nodes` > 1; server/jobs/gang.py, README "Multi-node rounds")
    max_nodes: int = Field(1, ge=1)  # the most worker machines one round may ask for (1: multi-node off)
    node_address: str | None = None  # where the other nodes reach this worker's rendezvous; default: its FQDN
    gang_form_timeout_s: float = Field(300.0, gt=0)  # a gang not complete by then is released (re-queued)

    # Postgres statement_timeout of the API's and workers' connections (capped at lease_ttl_s / 4,
    # at least 1 s; 0 disables; migrations run without one)
    db_statement_timeout_s: float = Field(15.0, ge=0)

    # leases and recovery
    lease_ttl_s: float = 60.0
    heartbeat_interval_s: float = 5.0
    sweep_interval_s: float = 10.0
    republish_after_s: float = 30.0  # a queued job not claimed for this long is published again
    max_attempts: int = 3
    retry_backoff_s: float = 5.0  # doubled per attempt
    kill_grace_s: float = 30.0  # SIGTERM → SIGKILL of a training process group
    # an attempt whose trainer writes nothing for this long (no output line, metric or checkpoint:
    # hung, e.g. in a collective whose peer is gone) is stopped and retried as crashed; 0: never.
    # The trainer's phases without steps (reference pass, evaluation) log progress every minute
    # (halos_core/training/alive.py); loading a large model or one step must fit in it too.
    stall_timeout_s: float = Field(1800.0, ge=0)

    # job events (GET /v1/jobs/{id}/events and its SSE stream)
    events_poll_interval_s: float = Field(1.0, gt=0, description="how often an open event stream reads the database")
    events_heartbeat_s: float = Field(15.0, gt=0, description="SSE comment sent while a stream has nothing new")
    events_stream_max_s: float = Field(
        3600.0, gt=0, description="an open stream ends after this long (the client reconnects with Last-Event-ID)"
    )

    # storage lifecycle (server/storage_lifecycle; README "Storage")
    retention_keep_rounds: int = Field(
        3, ge=1, description="the newest K rounds' checkpoints of a run stay whole (a run may override it)"
    )
    retention_keep_weights_rounds: int = Field(
        10, ge=1, description="checkpoints up to this many rounds back keep their weights (optimizer state dropped)"
    )
    retention_interval_s: float = Field(
        300.0,
        ge=0,
        description="how often the sweeper applies every run's retention (0: only after rounds / on request)",
    )
    storage_reserve_bytes: int = Field(
        1 << 30, ge=0, description="free space a round's estimated output must leave on the data dir's filesystem"
    )
    storage_admission: bool = Field(True, description="refuse rounds (507) whose estimated output does not fit")
    reference_cache_max_bytes: int = Field(
        10 << 30, ge=0, description="cap of the reference log-prob cache, least recently used shards evicted (0: none)"
    )

    # Prometheus
    metrics_enabled: bool = Field(True, description="serve GET /metrics (Prometheus text format, no API key)")

    # webhooks (the outbox dispatcher runs in `halos serve` and `halos worker`)
    webhooks_enabled: bool = Field(True, description="run the webhook dispatcher loop in this process")
    webhook_dispatch_interval_s: float = Field(
        1.0, gt=0, description="how often the dispatcher looks for due deliveries"
    )
    webhook_batch_size: int = Field(20, ge=1, description="deliveries one dispatcher claims per pass")
    webhook_timeout_s: float = Field(10.0, gt=0, le=60, description="connect + read timeout of one delivery attempt")
    webhook_lease_s: float = Field(
        120.0, gt=0, description="a claimed delivery not finished within this is claimed again (a dispatcher died)"
    )
    webhook_backoff_s: float = Field(5.0, gt=0, description="wait before the first retry; doubled per failed attempt")
    webhook_backoff_max_s: float = Field(3600.0, gt=0, description="longest wait between two attempts")
    webhook_max_age_s: float = Field(
        3 * 24 * 3600.0, gt=0, description="a delivery still failing this long after its event is given up (failed)"
    )
    webhook_secret_grace_s: float = Field(
        24 * 3600.0, ge=0, description="after a secret rotation, the previous secret also signs for this long"
    )
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs webhooks may reach although private/loopback/link-local (e.g. 10.0.0.0/8); "
        "comma-separated or a JSON list; empty: only public addresses",
    )

    # experiment tracking (MLflow / Weights & Biases; per run, `tracking` in POST /v1/runs)
    tracking_enabled: bool = Field(True, description="run the tracking exporter loop in this process")
    tracking_interval_s: float = Field(5.0, gt=0, description="how often new metric points are exported")
    mlflow_tracking_uri: str | None = Field(None, description="default MLflow tracking URI (a run may name its own)")
    wandb_dir: Path | None = Field(None, description="directory of W&B run files; default <data_dir>/wandb")

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return json.loads(value) if value.startswith("[") else [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for net in value:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_model_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return json.loads(value) if value.startswith("[") else [p for p in value.split(os.pathsep) if p.strip()]
        return value

    @field_validator("model_roots")
    @classmethod
    def _absolute_model_roots(cls, value: list[Path] | None) -> list[Path] | None:
        for root in value or []:
            if not root.is_absolute():
                raise ValueError(f"model root {str(root)!r} must be an absolute path")
        return value

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'halos.db').resolve()}"

    @property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def feedback_dir(self) -> Path:
        return self.data_dir / "feedback"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def uploads_tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def reference_cache_dir(self) -> Path:
        return self.data_dir / "reference-cache"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def allowed_model_roots(self) -> list[Path]:
        """Where `POST /v1/models` may register from: the data dir's models folder + HALOS_MODEL_ROOTS."""
        return [self.models_dir, *(self.model_roots or [])]

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.feedback_dir, self.runs_dir, self.uploads_tmp_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()

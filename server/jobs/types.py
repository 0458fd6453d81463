"""The values the job state machine hands its callers (the worker's task, the API's services)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from halos_core.artefact_spec import ArtefactResult, LabelSpec, SampleSpec, parse_job_spec
from halos_core.job_spec import JobSpec
from halos_core.round_result import RoundResult
from server.models import Job, JobStatus


class JobNotFound(LookupError):
    pass


class Heartbeat(str, Enum):
    OK = "ok"
    CANCEL = "cancel"  # cancel requested: kill the training and report `cancelled`
    LOST = "lost"  # the lease is no longer ours: kill the training at once, report nothing


@dataclass(frozen=True)
class Claim:
    """One claimed attempt. `spec` is the job's stored spec as it is in the database; `job_spec()`
    validates it (a row written by an older version may not: the runner then fails the job)."""

    job_id: str
    attempt: int
    lease_token: str
    run_dir: str | None
    spec: dict[str, Any]
    project_id: str = ""
    kind: str = "round"
    # multi-node attempts (server/jobs/gang.py): this worker's machine rank among `nodes`, its own
    # member lease token, and the c10d rendezvous endpoint (rank 0's address and port)
    nodes: int = 1
    rank: int = 0
    member_token: str | None = None
    rendezvous: tuple[str, int] | None = None

    @property
    def gang(self) -> bool:
        return self.member_token is not None

    def job_spec(self) -> JobSpec:
        return JobSpec.model_validate(self.spec)

    def any_spec(self) -> JobSpec | SampleSpec | LabelSpec:
        """The stored spec as the model of its kind (round, sample, label)."""
        return parse_job_spec(self.spec)


@dataclass
class Outcome:
    """How an attempt ended. `succeeded` carries the job's result.json (a round's or an artefact job's)."""

    status: Literal["succeeded", "failed", "crashed", "cancelled"]
    error: str | None = None
    result: RoundResult | ArtefactResult | None = None

    def __post_init__(self) -> None:
        if self.status not in ("succeeded", "failed", "crashed", "cancelled"):
            raise ValueError(f"invalid outcome status {self.status!r}")
        if self.status == "succeeded" and self.result is None:
            raise ValueError("a succeeded outcome needs the round's result")


class ParentFailed(Exception):
    """`submit(..., refuse_failed_parent=True)`: the parent job failed or was cancelled (nothing
    was inserted; the session was rolled back)."""

    def __init__(self, parent: Job, message: str):
        super().__init__(message)
        self.parent_job_id = parent.id
        self.status = parent.status.value if isinstance(parent.status, JobStatus) else str(parent.status)

"""The job state machine: the ONLY writer of `Job.status` (docs/ARCHITECTURE.md).

```
waiting ──parent succeeded──▶ queued ──claim──▶ running ──exit 0 + result.json──▶ succeeded
   └─parent failed/cancelled─▶ failed   ▲  ▲        ├─exit >0──────────────────▶ failed
                                        │  │        ├─cancel──▶ cancelling ──▶ cancelled
                                        │  │        └─lease expired / crash ──▶ crashed
                                        │  └─ warm-shutdown release (no retry consumed)
                                        └──── crashed, crashes < max_attempts (backoff) (else failed)
queued/waiting ──cancel──▶ cancelled
```

Every transition is a *conditional* UPDATE on the row's current status (and, for the holder of a
lease, its lease token): a transition whose precondition no longer holds changes nothing and is
reported as such (`None`, `Heartbeat.LOST`, an unchanged job), so duplicate deliveries, stale
runners and racing sweepers are harmless. Every function takes a SQLModel `Session` and commits
itself. On SQLite each transaction starts with `BEGIN IMMEDIATE` (server/db.py), on Postgres the
conditional UPDATE takes the row lock and re-checks its WHERE clause after a concurrent commit.

`crashed` is resolved in the same transaction that detects it (a new queued attempt with
`not_before` backoff, or `failed` once the job has crashed `max_attempts` times); the Attempt row
keeps `outcome='crashed'`. Attempts are append-only and every attempt row is closed (`ended_at`,
`outcome`) on every transition out of running/cancelling (invariant I2 is checked against them).
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Iterable, Optional

from sqlalchemy import func, or_, update
from sqlmodel import Session, select

from server.models import (
    TERMINAL_STATUSES,
    Attempt,
    Checkpoint,
    Job,
    JobStatus,
    MetricPoint,
    Round,
    Run,
    utcnow,
)

log = logging.getLogger(__name__)

LIVE_STATUSES = (JobStatus.running, JobStatus.cancelling)
MAX_ERROR_CHARS = 8000


class JobNotFound(LookupError):
    pass


class Heartbeat(str, Enum):
    OK = "ok"
    CANCEL = "cancel"  # cancel requested: kill the training and report `cancelled`
    LOST = "lost"  # the lease is no longer ours: kill the training at once, report nothing


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    lease_token: str
    run_dir: Optional[str]
    spec: dict[str, Any]
    project_id: str = ""
    kind: str = "round"


@dataclass
class Outcome:
    status: str  # succeeded | failed | crashed | cancelled
    error: Optional[str] = None
    result: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in ("succeeded", "failed", "crashed", "cancelled"):
            raise ValueError(f"invalid outcome status {self.status!r}")


# --------------------------------------------------------------------------- helpers


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _trim(text: Optional[str]) -> Optional[str]:
    """Error text for the database: NUL characters dropped (Postgres text rejects them; a trainer's
    log tail can hold them), at most MAX_ERROR_CHARS (the tail is kept)."""
    if text is None:
        return None
    text = text.replace("\x00", "")
    return text if len(text) <= MAX_ERROR_CHARS else "…" + text[-MAX_ERROR_CHARS:]


def json_safe(value: Any) -> Any:
    """A copy of `value` that every database accepts as JSON: NaN/±Infinity (an fp16 overflow
    step's `grad_norm`) become None, NUL characters are dropped from strings and keys."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {(k.replace("\x00", "") if isinstance(k, str) else k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _load(session: Session, job_id: str) -> Optional[Job]:
    return session.exec(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).one_or_none()


def _reload_and_end(session: Session, job_id: str) -> Optional[Job]:
    """Load the job, then end the transaction the read opened (on SQLite every transaction starts
    with BEGIN IMMEDIATE and would hold the write lock until the caller's next commit)."""
    job = _load(session, job_id)
    session.commit()
    return job


def _round_of(session: Session, job_id: str) -> Optional[Round]:
    return session.exec(
        select(Round).where(Round.job_id == job_id).execution_options(populate_existing=True)
    ).one_or_none()


def _close_attempt(session: Session, job_id: str, attempt: int, outcome: str, error: Optional[str], now: datetime) -> None:
    session.exec(
        update(Attempt)
        .where(Attempt.job_id == job_id, Attempt.attempt == attempt, Attempt.ended_at.is_(None))
        .values(ended_at=now, outcome=outcome, error=_trim(error))
    )


def _crash_count(session: Session, job_id: str) -> int:
    return session.exec(
        select(func.count()).select_from(Attempt).where(Attempt.job_id == job_id, Attempt.outcome == "crashed")
    ).one()


def _transition(session: Session, job_id: str, from_statuses: Iterable[JobStatus], values: dict[str, Any],
                lease_token: Optional[str] = None, extra_where: Iterable[Any] = ()) -> bool:
    """The one primitive: UPDATE job SET … WHERE id=? AND status IN (…) [AND lease_token=?]."""
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(list(from_statuses)), *extra_where)
    if lease_token is not None:
        stmt = stmt.where(Job.lease_token == lease_token)
    values = {**values, "updated_at": values.get("updated_at") or utcnow()}
    result = session.exec(stmt.values(**values))
    return result.rowcount == 1


def _parent_label(session: Session, parent: Job) -> str:
    rnd = _round_of(session, parent.id)
    return f"parent round {rnd.index} (job {parent.id})" if rnd is not None else f"parent job {parent.id}"


def _parent_message(session: Session, parent: Job, reason: str, cancelled: bool) -> str:
    """Why a child of a failed or cancelled job fails: "parent round 2 was cancelled (job …)" /
    "parent round 2 (job …) failed: <its error>"."""
    if cancelled:
        rnd = _round_of(session, parent.id)
        return (f"parent round {rnd.index} was cancelled (job {parent.id})" if rnd is not None
                else f"parent job {parent.id} was cancelled")
    return f"{_parent_label(session, parent)} failed: {reason}"


def _fail_waiting_children(session: Session, parent: Job, reason: str, now: datetime, *,
                           cancelled: bool = False) -> list[str]:
    """Waiting children of a failed/cancelled job fail with it (recursively down the chain)."""
    failed: list[str] = []
    children = session.exec(
        select(Job.id).where(Job.parent_job_id == parent.id, Job.status == JobStatus.waiting)
    ).all()
    if not children:
        return failed
    message = _trim(_parent_message(session, parent, reason, cancelled))
    for child_id in children:
        if _transition(session, child_id, [JobStatus.waiting],
                       {"status": JobStatus.failed, "error": message, "finished_at": now, "updated_at": now}):
            failed.append(child_id)
            child = _load(session, child_id)
            failed += _fail_waiting_children(session, child, message, now)
    return failed


def _parent_checkpoint(session: Session, parent: Job) -> Optional[Checkpoint]:
    rnd = _round_of(session, parent.id)
    if rnd is not None and rnd.checkpoint_id:
        return session.get(Checkpoint, rnd.checkpoint_id)
    return session.exec(
        select(Checkpoint).where(Checkpoint.job_id == parent.id).order_by(Checkpoint.created_at.desc())
    ).first()


def _inherit(session: Session, child: Job, parent: Job) -> None:
    """Point a child job (in memory or in the DB) at its succeeded parent's final checkpoint."""
    ckpt = _parent_checkpoint(session, parent)
    spec = dict(child.spec or {})
    if ckpt is not None:
        spec["init_from"] = ckpt.path
        spec["init_from_checkpoint_id"] = ckpt.id
        spec["counters"] = {"step": ckpt.step, "examples": ckpt.examples}
    child.spec = spec
    rnd = _round_of(session, child.id)
    if rnd is not None and ckpt is not None:
        rnd.parent_checkpoint_id = ckpt.id
        session.add(rnd)


def _promote_children(session: Session, parent: Job, now: datetime) -> list[str]:
    promoted: list[str] = []
    children = session.exec(
        select(Job.id).where(Job.parent_job_id == parent.id, Job.status == JobStatus.waiting)
    ).all()
    for child_id in children:
        child = _load(session, child_id)
        if child is None or child.status != JobStatus.waiting:
            continue
        _inherit(session, child, parent)
        if _transition(session, child_id, [JobStatus.waiting],
                       {"status": JobStatus.queued, "spec": child.spec, "queued_at": now,
                        "published_at": None, "updated_at": now}):
            promoted.append(child_id)
    return promoted


def _register_checkpoint(session: Session, job: Job, result: dict[str, Any]) -> Optional[Checkpoint]:
    rnd = _round_of(session, job.id)
    if rnd is None or not result.get("final_dir"):
        return None
    run = session.get(Run, rnd.run_id)
    ckpt = Checkpoint(
        project_id=job.project_id,
        run_id=rnd.run_id,
        round_id=rnd.id,
        job_id=job.id,
        model_id=run.model_id if run is not None else (job.spec or {}).get("model_id"),
        parent_id=rnd.parent_checkpoint_id,
        path=str(result["final_dir"]),
        manifest_sha256=str(result.get("manifest_sha256") or ""),
        step=int(result.get("step") or 0),
        examples=int(result.get("examples") or 0),
    )
    session.add(ckpt)
    session.flush()
    rnd.checkpoint_id = ckpt.id
    session.add(rnd)
    return ckpt


def _resolve_crash(session: Session, job: Job, error: str, now: datetime, backoff_s: float) -> str:
    """Called with the attempt already closed as `crashed` and the job row guarded by the caller."""
    if job.cancel_requested or job.status == JobStatus.cancelling:
        _set_terminal(session, job, JobStatus.cancelled, f"cancelled (attempt {job.attempt} crashed: {error})", now)
        return "cancelled"
    crashes = _crash_count(session, job.id)
    if crashes < job.max_attempts:
        delay = backoff_s * (2 ** max(crashes - 1, 0))
        session.exec(
            update(Job).where(Job.id == job.id).values(
                status=JobStatus.queued, lease_token=None, lease_expires_at=None,
                not_before=now + timedelta(seconds=delay), queued_at=now, published_at=None,
                error=_trim(f"attempt {job.attempt} crashed: {error}; retry {crashes + 1}/{job.max_attempts}"
                            f" after {delay:g}s"),
                updated_at=now,
            )
        )
        return "queued"
    _set_terminal(session, job, JobStatus.failed, f"crashed {crashes} times: {error}", now)
    return "failed"


def _set_terminal(session: Session, job: Job, status: JobStatus, error: Optional[str], now: datetime) -> None:
    session.exec(
        update(Job).where(Job.id == job.id).values(
            status=status, error=_trim(error), finished_at=now, lease_token=None, lease_expires_at=None,
            not_before=None, updated_at=now,
        )
    )
    if status in (JobStatus.failed, JobStatus.cancelled):
        reason = error or status.value
        _fail_waiting_children(session, job, reason, now, cancelled=status == JobStatus.cancelled)


def _default_backoff() -> float:
    from server.settings import get_settings

    return get_settings().retry_backoff_s


# --------------------------------------------------------------------------- public API


class ParentFailed(Exception):
    """`submit(..., refuse_failed_parent=True)`: the parent job failed or was cancelled (nothing
    was inserted; the session was rolled back)."""

    def __init__(self, parent: Job, message: str):
        super().__init__(message)
        self.parent_job_id = parent.id
        self.status = parent.status.value if isinstance(parent.status, JobStatus) else str(parent.status)


def submit(session: Session, job: Job, *, max_attempts: Optional[int] = None,
           refuse_failed_parent: bool = False) -> Job:
    """Insert `job` as `waiting` (its parent job unfinished) or `queued`, and commit.

    The caller publishes the id after this returns (`server.queue.publish`). When the parent has
    already succeeded the job inherits its final checkpoint here; when it failed or was
    cancelled the job fails at once — or, with `refuse_failed_parent`, nothing is inserted (the
    caller's pending objects are rolled back too) and `ParentFailed` is raised: the API checked the
    parent a moment ago and answers 409 instead. The parent row is locked (Postgres `FOR UPDATE`;
    SQLite serialises writers anyway), so a parent finishing concurrently either sees this child
    and promotes it, or is seen here as finished.
    """
    now = utcnow()
    if max_attempts is None:
        from server.settings import get_settings

        max_attempts = get_settings().max_attempts
    job.max_attempts = max_attempts
    job.attempt = 0
    job.lease_token = None
    job.lease_expires_at = None
    job.cancel_requested = False
    job.status = JobStatus.queued
    job.updated_at = now
    parent: Optional[Job] = None
    try:
        # no autoflush: the caller's pending Round references this job, which must be inserted first
        with session.no_autoflush:
            if job.parent_job_id:
                parent = session.exec(
                    select(Job).where(Job.id == job.parent_job_id).with_for_update()
                    .execution_options(populate_existing=True)
                ).one_or_none()
                if parent is None:
                    raise JobNotFound(f"parent job {job.parent_job_id} does not exist")
                if parent.status in (JobStatus.failed, JobStatus.cancelled):
                    message = _trim(_parent_message(session, parent, parent.error or parent.status.value,
                                                    parent.status == JobStatus.cancelled))
                    if refuse_failed_parent:
                        raise ParentFailed(parent, message)
                    job.status = JobStatus.failed
                    job.error = message
                    job.finished_at = now
                elif parent.status != JobStatus.succeeded:
                    job.status = JobStatus.waiting
        if job.status == JobStatus.queued:
            job.queued_at = now
        session.add(job)
        session.flush([job])
        if parent is not None and parent.status == JobStatus.succeeded:
            _inherit(session, job, parent)
            session.add(job)
        session.commit()
        session.refresh(job)
        session.commit()  # end the read transaction (SQLite: BEGIN IMMEDIATE holds the write lock)
    except Exception:
        session.rollback()
        raise
    return job


def claim(session: Session, job_id: str, host: str, pid: Optional[int], lease_ttl: float | timedelta,
          *, run_dir: Optional[str] = None, now: Optional[datetime] = None) -> Optional[Claim]:
    """queued → running with a new lease and Attempt row; None when not claimable (duplicate delivery,
    already running/finished, cancel requested, or still in retry backoff)."""
    now = now or utcnow()
    token = secrets.token_hex(16)
    values: dict[str, Any] = {
        "status": JobStatus.running,
        "attempt": Job.attempt + 1,
        "lease_token": token,
        "lease_expires_at": now + timedelta(seconds=_seconds(lease_ttl)),
        "started_at": func.coalesce(Job.started_at, now),
        "not_before": None,
        "updated_at": now,
    }
    if run_dir is not None:
        values["run_dir"] = run_dir
    try:
        ok = _transition(
            session, job_id, [JobStatus.queued], values,
            extra_where=[or_(Job.not_before.is_(None), Job.not_before <= now), Job.cancel_requested.is_(False)],
        )
        if not ok:
            session.rollback()
            return None
        job = _load(session, job_id)
        claimed = Claim(job_id=job.id, attempt=job.attempt, lease_token=token, run_dir=job.run_dir,
                        spec=dict(job.spec or {}), project_id=job.project_id, kind=job.kind)
        session.add(Attempt(job_id=job_id, attempt=job.attempt, lease_token=token, host=host[:255], pid=pid,
                            started_at=now))
        session.commit()
    except Exception:
        session.rollback()
        raise
    return claimed


def mark_attempt_started(session: Session, job_id: str, lease_token: str, *,
                         resumed_from_step: Optional[int] = None, pid: Optional[int] = None) -> bool:
    """Record what the runner decided for this attempt (resume point; pid of the training group)."""
    values: dict[str, Any] = {}
    if resumed_from_step is not None:
        values["resumed_from_step"] = resumed_from_step
    if pid is not None:
        values["pid"] = pid
    if not values:
        return True
    result = session.exec(
        update(Attempt).where(Attempt.job_id == job_id, Attempt.lease_token == lease_token,
                              Attempt.ended_at.is_(None)).values(**values)
    )
    session.commit()
    return result.rowcount == 1


def heartbeat(session: Session, job_id: str, lease_token: str, lease_ttl: float | timedelta,
              *, now: Optional[datetime] = None) -> Heartbeat:
    """Renew the lease. OK; CANCEL (kill the training, then finish(cancelled)); LOST (self-fence)."""
    now = now or utcnow()
    ok = _transition(
        session, job_id, LIVE_STATUSES,
        {"lease_expires_at": now + timedelta(seconds=_seconds(lease_ttl)), "updated_at": now},
        lease_token=lease_token,
    )
    if not ok:
        session.rollback()
        return Heartbeat.LOST
    status, cancel = session.exec(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).one()
    session.commit()
    if status == JobStatus.cancelling or cancel:
        return Heartbeat.CANCEL
    return Heartbeat.OK


def int_or_zero(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def record_progress(session: Session, job_id: str, lease_token: str, metrics: list[dict[str, Any]], *,
                    skip_recorded: bool = False) -> None:
    """Append MetricPoint rows and update the job's progress (ignored unless the lease is ours).
    Records are stored `json_safe` (NaN/Infinity → null, NUL characters dropped).

    `skip_recorded`: drop points whose (step, split) the job already has — used by a retry to
    backfill lines an earlier attempt wrote to metrics.jsonl but died before recording."""
    metrics = [json_safe(r) for r in metrics if isinstance(r, dict)]
    if not metrics:
        return
    job = session.exec(
        select(Job).where(Job.id == job_id, Job.lease_token == lease_token, Job.status.in_(list(LIVE_STATUSES)))
        .execution_options(populate_existing=True)
    ).one_or_none()
    if job is None:
        session.rollback()
        return
    if skip_recorded:
        recorded = set(session.exec(select(MetricPoint.step, MetricPoint.split).where(MetricPoint.job_id == job_id)).all())
        metrics = [r for r in metrics if isinstance(r, dict)
                   and (int_or_zero(r.get("step")), str(r.get("split") or "train")[:10]) not in recorded]
        if not metrics:
            session.rollback()
            return
    now = utcnow()
    latest_train: Optional[dict[str, Any]] = None
    for rec in metrics:
        if not isinstance(rec, dict):
            continue
        split = str(rec.get("split") or "train")[:10]
        step = int_or_zero(rec.get("step"))
        session.add(MetricPoint(job_id=job_id, attempt=job.attempt, step=step, split=split, data=rec, created_at=now))
        if split == "train":
            latest_train = rec
    if latest_train is not None:
        values: dict[str, Any] = {"latest_metrics": latest_train, "updated_at": now}
        for key, col in (("step", "step"), ("examples", "examples"), ("round_step", "round_step"),
                         ("total_steps", "total_steps")):
            if latest_train.get(key) is not None:
                try:
                    values[col] = int(latest_train[key])
                except (TypeError, ValueError):
                    pass
        session.exec(update(Job).where(Job.id == job_id, Job.lease_token == lease_token).values(**values))
    session.commit()


def finish(session: Session, job_id: str, lease_token: str, outcome: Outcome, *,
           retry_backoff_s: Optional[float] = None, now: Optional[datetime] = None) -> Job:
    """End the attempt holding `lease_token`. A stale token changes nothing (returns the job as is).

    succeeded: registers the final Checkpoint (parent = the round's parent checkpoint, model = the
    run's model), sets Round.checkpoint_id and promotes waiting children to `queued` (publish them
    after this returns: `unpublished_children`). failed/cancelled: waiting children fail too.
    crashed: a new queued attempt with backoff, or failed after `max_attempts` crashes.
    """
    now = now or utcnow()
    backoff = _default_backoff() if retry_backoff_s is None else retry_backoff_s
    try:
        job = session.exec(
            select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
        ).one_or_none()
        if job is None:
            raise JobNotFound(job_id)
        if job.lease_token != lease_token or job.status not in LIVE_STATUSES:
            log.warning("finish(%s, %s) ignored: lease not held (status %s)", job_id, outcome.status, job.status)
            session.commit()
            return job
        attempt = job.attempt
        if outcome.status == "succeeded":
            result = outcome.result or {}
            _close_attempt(session, job_id, attempt, "succeeded", None, now)
            values: dict[str, Any] = {
                "status": JobStatus.succeeded, "error": None, "finished_at": now, "lease_token": None,
                "lease_expires_at": None, "not_before": None, "updated_at": now,
            }
            for key in ("step", "examples", "round_steps", "total_steps"):
                if result.get(key) is not None:
                    values["round_step" if key == "round_steps" else key] = int(result[key])
            if not _transition(session, job_id, LIVE_STATUSES, values, lease_token=lease_token):
                raise RuntimeError(f"job {job_id} changed under a row lock")
            _register_checkpoint(session, job, result)
            session.flush()
            _promote_children(session, job, now)
        elif outcome.status in ("failed", "cancelled"):
            _close_attempt(session, job_id, attempt, outcome.status, outcome.error, now)
            status = JobStatus.failed if outcome.status == "failed" else JobStatus.cancelled
            _set_terminal(session, job, status, outcome.error or (None if status == JobStatus.cancelled else "failed"), now)
        else:  # crashed
            _close_attempt(session, job_id, attempt, "crashed", outcome.error, now)
            _resolve_crash(session, job, outcome.error or "crashed", now, backoff)
        session.commit()
    except Exception:
        session.rollback()
        raise
    return _reload_and_end(session, job_id)


def release(session: Session, job_id: str, lease_token: str, reason: str, *, now: Optional[datetime] = None) -> bool:
    """Warm shutdown: running → queued without consuming a retry (cancelling → cancelled).

    The caller has already stopped the training process group. Returns False for a stale token.
    """
    now = now or utcnow()
    try:
        job = session.exec(
            select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
        ).one_or_none()
        if job is None or job.lease_token != lease_token or job.status not in LIVE_STATUSES:
            session.rollback()
            return False
        _close_attempt(session, job_id, job.attempt, "released", reason, now)
        if job.status == JobStatus.cancelling or job.cancel_requested:
            _set_terminal(session, job, JobStatus.cancelled, f"cancelled ({reason})", now)
        else:
            _transition(session, job_id, LIVE_STATUSES,
                        {"status": JobStatus.queued, "lease_token": None, "lease_expires_at": None,
                         "not_before": None, "queued_at": now, "published_at": None, "updated_at": now},
                        lease_token=lease_token)
        session.commit()
        return True
    except Exception:
        session.rollback()
        raise


def request_cancel(session: Session, job_id: str, *, now: Optional[datetime] = None) -> Job:
    """waiting/queued → cancelled; running → cancelling (the runner kills and reports); else unchanged."""
    now = now or utcnow()
    try:
        job = session.exec(
            select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
        ).one_or_none()
        if job is None:
            raise JobNotFound(job_id)
        if job.status in (JobStatus.waiting, JobStatus.queued):
            if _transition(session, job_id, [job.status], {"cancel_requested": True}):
                _set_terminal(session, job, JobStatus.cancelled, "cancelled by request", now)
        elif job.status == JobStatus.running:
            _transition(session, job_id, [JobStatus.running],
                        {"status": JobStatus.cancelling, "cancel_requested": True, "updated_at": now})
        session.commit()
    except Exception:
        session.rollback()
        raise
    return _reload_and_end(session, job_id)


def expire_leases(session: Session, now: Optional[datetime] = None, *,
                  retry_backoff_s: Optional[float] = None) -> list[str]:
    """running/cancelling jobs whose lease expired → crashed → queued (backoff) or failed.

    Also resolves any job left in `crashed` and any `waiting` job whose parent is already
    terminal (a child inserted while its parent was finishing). Returns the ids it changed.
    """
    now = now or utcnow()
    backoff = _default_backoff() if retry_backoff_s is None else retry_backoff_s
    changed: list[str] = []
    try:
        rows = session.exec(
            select(Job.id, Job.lease_token, Job.lease_expires_at).where(
                Job.status.in_(list(LIVE_STATUSES)),
                or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
            )
        ).all()
        for job_id, token, expires in rows:
            guard = [or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)]
            stmt_ok = session.exec(
                update(Job).where(Job.id == job_id, Job.status.in_(list(LIVE_STATUSES)), *guard,
                                  (Job.lease_token == token) if token is not None else Job.lease_token.is_(None))
                .values(updated_at=now)
            ).rowcount == 1
            if not stmt_ok:
                continue
            job = _load(session, job_id)
            error = f"lease expired at {expires.isoformat() if expires else '?'} (worker lost or stalled)"
            _close_attempt(session, job_id, job.attempt, "crashed", error, now)
            _resolve_crash(session, job, error, now, backoff)
            changed.append(job_id)
        for job_id in session.exec(select(Job.id).where(Job.status == JobStatus.crashed)).all():
            job = _load(session, job_id)
            _close_attempt(session, job_id, job.attempt, "crashed", job.error or "crashed", now)
            _resolve_crash(session, job, job.error or "crashed", now, backoff)
            changed.append(job_id)
        # waiting children whose parent already finished (the parent finished between the API's
        # check and the child's commit)
        stuck = session.exec(
            select(Job.id, Job.parent_job_id).where(Job.status == JobStatus.waiting)
        ).all()
        for child_id, parent_id in stuck:
            parent = _load(session, parent_id) if parent_id else None
            if parent is None:
                continue
            if parent.status == JobStatus.succeeded:
                changed += _promote_children(session, parent, now)
            elif parent.status in (JobStatus.failed, JobStatus.cancelled):
                changed += _fail_waiting_children(session, parent, parent.error or parent.status.value, now,
                                                  cancelled=parent.status == JobStatus.cancelled)
        session.commit()
    except Exception:
        session.rollback()
        raise
    return changed


def claimable_unheld(session: Session, now: Optional[datetime] = None,
                     older_than: float | timedelta = 30.0) -> list[str]:
    """Queued jobs past their backoff that were never published, or published more than
    `older_than` ago and still not claimed (the broker lost or dropped the message).

    A job that has been queued for long (behind long-running jobs) is republished less often:
    every max(older_than, min(age/4, 10 x older_than)), so the duplicates a busy queue collects
    stay bounded while a lost message is still replaced within minutes.
    """
    now = now or utcnow()
    older = _seconds(older_than)
    cutoff = now - timedelta(seconds=older)
    rows = session.exec(
        select(Job.id, Job.published_at, Job.queued_at).where(
            Job.status == JobStatus.queued,
            or_(Job.not_before.is_(None), Job.not_before <= now),
            or_(Job.published_at.is_(None), Job.published_at <= cutoff),
        ).order_by(Job.queued_at)
    ).all()
    session.commit()  # end the read transaction without expiring the caller's objects
    due = []
    for job_id, published_at, queued_at in rows:
        if published_at is not None and queued_at is not None:
            age = (now - queued_at).total_seconds()
            interval = max(older, min(age / 4, older * 10))
            if (now - published_at).total_seconds() < interval:
                continue
        due.append(job_id)
    return due


def mark_published(session: Session, job_ids: str | Iterable[str], now: Optional[datetime] = None) -> None:
    now = now or utcnow()
    ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
    if not ids:
        return
    session.exec(update(Job).where(Job.id.in_(ids)).values(published_at=now))
    session.commit()


def unpublished_children(session: Session, parent_job_id: str) -> list[str]:
    """Children promoted by `finish` that still need a publish."""
    ids = session.exec(
        select(Job.id).where(Job.parent_job_id == parent_job_id, Job.status == JobStatus.queued,
                             Job.published_at.is_(None))
    ).all()
    session.commit()
    return list(ids)


def get(session: Session, job_id: str) -> Job:
    job = _reload_and_end(session, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def is_terminal(status: JobStatus | str) -> bool:
    return JobStatus(status) in TERMINAL_STATUSES

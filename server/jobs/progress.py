"""Progress an attempt reports while it runs: metric points, eval passes and intermediate
checkpoints (as events), and the attempt's resume point. Written only by the lease holder (a stale
runner's reports are dropped); the job row is locked first, as for every job event
(server/events.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from halos_client.event_models import EventType
from server.events import job_event
from server.jobs.rows import int_or_zero, json_safe
from server.models import LIVE_STATUSES, Attempt, Event, Job, MetricPoint, utcnow


def mark_attempt_started(
    session: Session, job_id: str, lease_token: str, *, resumed_from_step: int | None = None, pid: int | None = None
) -> bool:
    """Record what the runner decided for this attempt (resume point; pid of the training group)."""
    values: dict[str, Any] = {}
    if resumed_from_step is not None:
        values["resumed_from_step"] = resumed_from_step
    if pid is not None:
        values["pid"] = pid
    if not values:
        return True
    result = session.exec(
        update(Attempt)
        .where(col(Attempt.job_id) == job_id, col(Attempt.lease_token) == lease_token, col(Attempt.ended_at).is_(None))
        .values(**values)
    )
    session.commit()
    return result.rowcount == 1


def record_progress(
    session: Session, job_id: str, lease_token: str, metrics: list[dict[str, Any]], *, skip_recorded: bool = False
) -> None:
    """Append MetricPoint rows and update the job's progress (ignored unless the lease is ours).
    Records are stored `json_safe` (NaN/Infinity → null, NUL characters dropped).

    `skip_recorded`: drop points whose (step, split) the job already has — used by a retry to
    backfill lines an earlier attempt wrote to metrics.jsonl but died before recording."""
    metrics = [json_safe(r) for r in metrics if isinstance(r, dict)]
    if not metrics:
        return
    job = _held(session, job_id, lease_token)
    if job is None:
        session.rollback()
        return
    if skip_recorded:
        recorded = set(
            session.exec(select(MetricPoint.step, MetricPoint.split).where(MetricPoint.job_id == job_id)).all()
        )
        metrics = [
            r for r in metrics if (int_or_zero(r.get("step")), str(r.get("split") or "train")[:10]) not in recorded
        ]
        if not metrics:
            session.rollback()
            return
    now = utcnow()
    latest_train: dict[str, Any] | None = None
    for rec in metrics:
        split = str(rec.get("split") or "train")[:10]
        step = int_or_zero(rec.get("step"))
        session.add(MetricPoint(job_id=job_id, attempt=job.attempt, step=step, split=split, data=rec, created_at=now))
        if split == "train":
            latest_train = rec
        elif split == "eval":
            job_event(
                session, job_id, EventType.job_eval_done, attempt=job.attempt, data={"step": step, "metrics": rec}
            )
    if latest_train is not None:
        values: dict[str, Any] = {"latest_metrics": latest_train, "updated_at": now}
        for key in ("step", "examples", "round_step", "total_steps"):
            if latest_train.get(key) is not None:
                try:
                    values[key] = int(latest_train[key])
                except (TypeError, ValueError):
                    pass
        session.exec(update(Job).where(col(Job.id) == job_id, col(Job.lease_token) == lease_token).values(**values))
    session.commit()


def _held(session: Session, job_id: str, lease_token: str) -> Job | None:
    """The job, row-locked, if `lease_token` holds it (else None)."""
    return session.exec(
        select(Job)
        .where(Job.id == job_id, Job.lease_token == lease_token, col(Job.status).in_(list(LIVE_STATUSES)))
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def record_checkpoint_saved(session: Session, job_id: str, lease_token: str, step: int, name: str) -> bool:
    """A `job.checkpoint_saved` event for a complete intermediate checkpoint, once per (job, step):
    a retry that finds the checkpoints of earlier attempts, or saves the same step again after
    resuming before it, adds none. Returns whether an event was written."""
    job = _held(session, job_id, lease_token)
    if job is None:
        session.rollback()
        return False
    seen = session.exec(
        select(Event.data).where(Event.job_id == job_id, Event.type == EventType.job_checkpoint_saved.value)
    ).all()
    if any(int_or_zero((d or {}).get("step")) == step for d in seen):
        session.commit()
        return False
    job_event(session, job_id, EventType.job_checkpoint_saved, attempt=job.attempt, data={"step": step, "name": name})
    session.commit()
    return True

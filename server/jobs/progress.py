"""Progress an attempt reports while it runs: metric points and the attempt's resume point.
Written only by the lease holder (a stale runner's reports are dropped)."""

from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import update
from sqlmodel import Session, select

from server.jobs.rows import int_or_zero, json_safe
from server.models import LIVE_STATUSES, Attempt, Job, MetricPoint, utcnow


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
        metrics = [r for r in metrics
                   if (int_or_zero(r.get("step")), str(r.get("split") or "train")[:10]) not in recorded]
        if not metrics:
            session.rollback()
            return
    now = utcnow()
    latest_train: Optional[dict[str, Any]] = None
    for rec in metrics:
        split = str(rec.get("split") or "train")[:10]
        step = int_or_zero(rec.get("step"))
        session.add(MetricPoint(job_id=job_id, attempt=job.attempt, step=step, split=split, data=rec, created_at=now))
        if split == "train":
            latest_train = rec
    if latest_train is not None:
        values: dict[str, Any] = {"latest_metrics": latest_train, "updated_at": now}
        for key in ("step", "examples", "round_step", "total_steps"):
            if latest_train.get(key) is not None:
                try:
                    values[key] = int(latest_train[key])
                except (TypeError, ValueError):
                    pass
        session.exec(update(Job).where(Job.id == job_id, Job.lease_token == lease_token).values(**values))
    session.commit()

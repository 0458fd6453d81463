"""Row-level helpers of the job state machine: the one conditional-UPDATE primitive, loads that
see the latest committed row, attempt bookkeeping, and values every database accepts."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, overload

from sqlalchemy import update
from sqlmodel import Session, col, select

from server.models import Attempt, Job, JobStatus, Round, utcnow

MAX_ERROR_CHARS = 8000


def seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


@overload
def trim(text: str) -> str: ...
@overload
def trim(text: None) -> None: ...
def trim(text: str | None) -> str | None:
    """Error text for the database: NUL characters dropped (Postgres text rejects them; a trainer's
    log tail can hold them), at most MAX_ERROR_CHARS (the tail is kept)."""
    if text is None:
        return None
    text = text.replace("\x00", "")
    return text if len(text) <= MAX_ERROR_CHARS else "…" + text[-MAX_ERROR_CHARS:]


def json_safe(value: Any) -> Any:
    """A copy of `value` that every database accepts as JSON: NaN/±Infinity (an overflowing step's
    `grad_norm`) become None, NUL characters are dropped from strings and keys."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {(k.replace("\x00", "") if isinstance(k, str) else k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def int_or_zero(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def load(session: Session, job_id: str) -> Job | None:
    return session.exec(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one_or_none()


def reload_and_end(session: Session, job_id: str) -> Job | None:
    """Load the job, then end the transaction the read opened (on SQLite every transaction starts
    with BEGIN IMMEDIATE and would hold the write lock until the caller's next commit)."""
    job = load(session, job_id)
    session.commit()
    return job


def round_of(session: Session, job_id: str) -> Round | None:
    return session.exec(
        select(Round).where(Round.job_id == job_id).execution_options(populate_existing=True)
    ).one_or_none()


def close_attempt(session: Session, job_id: str, attempt: int, outcome: str, error: str | None, now: datetime) -> None:
    session.exec(
        update(Attempt)
        .where(col(Attempt.job_id) == job_id, col(Attempt.attempt) == attempt, col(Attempt.ended_at).is_(None))
        .values(ended_at=now, outcome=outcome, error=trim(error))
    )


def transition(
    session: Session,
    job_id: str,
    from_statuses: Iterable[JobStatus],
    values: dict[str, Any],
    lease_token: str | None = None,
    extra_where: Iterable[Any] = (),
) -> bool:
    """The one primitive: UPDATE job SET … WHERE id=? AND status IN (…) [AND lease_token=?]."""
    stmt = update(Job).where(col(Job.id) == job_id, col(Job.status).in_(list(from_statuses)), *extra_where)
    if lease_token is not None:
        stmt = stmt.where(col(Job.lease_token) == lease_token)
    values = {**values, "updated_at": values.get("updated_at") or utcnow()}
    result = session.exec(stmt.values(**values))
    return result.rowcount == 1


def requeued(now: datetime) -> dict[str, Any]:
    """The columns of a running job handed back to the queue without using a retry (a release):
    no lease, queued now, to be published again."""
    return {
        "status": JobStatus.queued,
        "lease_token": None,
        "lease_expires_at": None,
        "not_before": None,
        "queued_at": now,
        "published_at": None,
        "updated_at": now,
    }

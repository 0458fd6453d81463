"""Read side of jobs (status, progress, metrics, log tail) and the cancel request.

Job.status is written only by `server.jobs`; this module reads it and calls
`jobs.request_cancel` for cancellation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import msgspec
from sqlalchemy import Connection, Row, Text, bindparam
from sqlalchemy import cast as sql_cast
from sqlalchemy import select as core_select  # sqlmodel's `select` is typed for at most four columns
from sqlmodel import Session, col

from halos_client.models import JobOut, JobProgress, MetricSeries
from server.errors import Conflict
from server.models import TERMINAL_STATUSES, Attempt, FeedbackFile, Job, JobStatus, MetricPoint, Round, utcnow
from server.services.common import MAX_PAGE, get_owned, newest_first, not_found, plausible_id, split_page
from server.services.keys import Principal
from server.settings import Settings

MAX_METRIC_POINTS = 10_000
# The ETA follows the pace of the current attempt's last steps (not the whole run's average, which
# would include model loading, the reference pass and earlier, crashed attempts).
PACE_WINDOW_STEPS = 20


def _request_cancel(session: Session, job_id: str) -> Job:
    from server import jobs

    return jobs.request_cancel(session, job_id)


def get_job(session: Session, principal: Principal, job_id: str) -> Job:
    return get_owned(session, Job, job_id, principal.project_id, "job")


class JobFields(Protocol):
    """What a job view reads of a job: a `Job` row object, or a row of `_JOBS_WITH_LINKS` (plain
    columns: a page of views without building ORM objects, which costs more than the query)."""

    id: str
    kind: str
    status: JobStatus
    attempt: int
    max_attempts: int
    cancel_requested: bool
    parent_job_id: str | None
    step: int
    round_step: int
    total_steps: int | None
    examples: int
    latest_metrics: dict | None
    error: str | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class Timing:
    percent_done: float | None
    elapsed_s: float | None
    eta_s: float | None


_TERMINAL = {s.value for s in TERMINAL_STATUSES}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class PointFields(Protocol):
    """What a job's timing reads of a metric point: a `MetricPoint` or a row of `_RECENT_POINTS`."""

    step: int
    data: dict | None
    created_at: datetime


def _point_time(point: PointFields) -> float:
    """When the trainer logged the step (its `time` field, on the worker's clock); the row's
    insertion time only for lines without one."""
    logged = (point.data or {}).get("time")
    if isinstance(logged, (int, float)) and not isinstance(logged, bool):
        return float(logged)
    return _utc(point.created_at).timestamp()


def timing(
    job: JobFields, now: datetime, attempt_started_at: datetime | None = None, recent_points: Sequence[PointFields] = ()
) -> Timing:
    """percent done, elapsed and ETA of one job.

    `recent_points`: the current attempt's latest train points. Only those logged after this
    attempt started count towards the pace: a retry re-records (backfills) lines an earlier,
    crashed attempt wrote, and their times would mix the crash and the backoff into the pace."""
    status = job.status.value if isinstance(job.status, JobStatus) else str(job.status)
    if status == JobStatus.succeeded.value:
        percent: float | None = 100.0
    elif job.total_steps:
        percent = round(min(100.0, max(0.0, 100.0 * (job.round_step or 0) / job.total_steps)), 2)
    else:
        percent = None
    elapsed = None
    if job.started_at is not None:
        end = job.finished_at if (job.finished_at is not None and status in _TERMINAL) else now
        elapsed = round(max(0.0, (_utc(end) - _utc(job.started_at)).total_seconds()), 3)
    eta = 0.0 if status == JobStatus.succeeded.value else None
    if status == JobStatus.running.value and attempt_started_at is not None and job.total_steps:
        since = _utc(attempt_started_at).timestamp()
        timed = sorted((p for p in recent_points if _point_time(p) >= since), key=lambda p: p.step)
        if len(timed) >= 2:
            first, last = timed[0], timed[-1]
            t0, t1 = _point_time(first), _point_time(last)
            if last.step > first.step and t1 > t0:
                per_step = (t1 - t0) / (last.step - first.step)
                data = last.data or {}
                total = _int(data.get("total_steps")) or job.total_steps
                done = _int(data.get("round_step"))
                remaining = max(0, total - (job.round_step if done is None else done))
                # Count down between steps by at most one step's time: a stalled trainer does not
                # reach 0, and clock skew between the API and the worker host shifts it by one step.
                since_last = min(max(0.0, now.timestamp() - t1), per_step)
                eta = round(max(0.0, remaining * per_step - since_last), 3)
    return Timing(percent_done=percent, elapsed_s=elapsed, eta_s=eta)


# A running job's attempt starts and its latest train points, as plain rows (see _JOBS_WITH_LINKS).
_ATTEMPT_STARTS = core_select(col(Attempt.job_id), col(Attempt.attempt), col(Attempt.started_at)).where(
    col(Attempt.job_id).in_(bindparam("ids", expanding=True))
)
_RECENT_POINTS = (
    core_select(col(MetricPoint.step), col(MetricPoint.data), col(MetricPoint.created_at))
    .where(
        col(MetricPoint.job_id) == bindparam("job_id"),
        col(MetricPoint.split) == "train",
        col(MetricPoint.attempt) == bindparam("attempt"),
    )
    .order_by(col(MetricPoint.step).desc())
    .limit(PACE_WINDOW_STEPS)
)


def _timings(conn: Connection, jobs: Sequence[JobFields], now: datetime) -> dict[str, Timing]:
    """Timing per job; a running job costs two indexed reads (its attempt, its last steps)."""
    running = [j for j in jobs if j.status == JobStatus.running and j.total_steps]
    started: dict[tuple[str, int], datetime] = {}
    if running:
        for job_id, attempt, started_at in conn.execute(_ATTEMPT_STARTS, {"ids": [j.id for j in running]}):
            started[(job_id, attempt)] = started_at
    out = {}
    for j in jobs:
        attempt_started = started.get((j.id, j.attempt))
        points: Sequence[PointFields] = ()
        if attempt_started is not None:
            rows = conn.execute(_RECENT_POINTS, {"job_id": j.id, "attempt": j.attempt}).all()
            points = cast(Sequence[PointFields], rows)
        out[j.id] = timing(j, now, attempt_started, points)
    return out


@dataclass(frozen=True)
class _Links:
    """What a job view shows of the rows around the job: its round (a training job) and the
    feedback file it generated (a labelling job)."""

    run_id: str | None = None
    round_id: str | None = None
    round_index: int | None = None
    checkpoint_id: str | None = None
    output_feedback_id: str | None = None


_NO_LINKS = _Links()


# The feedback file a job generated (a labelling job's output; one per job, the newest if ever more):
# a subquery, so that a page never holds a job twice.
_OUTPUT_FEEDBACK = (
    core_select(col(FeedbackFile.id))
    .where(col(FeedbackFile.job_id) == col(Job.id))
    .order_by(col(FeedbackFile.created_at).desc())
    .limit(1)
    .correlate(Job)
    .scalar_subquery()
)
_LINK_COLUMNS: tuple[Any, ...] = (  # labelled: a row of _JOBS_WITH_LINKS reads the job's own columns by name
    col(Round.run_id).label("link_run_id"),
    col(Round.id).label("link_round_id"),
    col(Round.index).label("link_round_index"),
    col(Round.checkpoint_id).label("link_checkpoint_id"),
    _OUTPUT_FEEDBACK.label("link_output_feedback_id"),
)

# One statement of plain columns for a whole page (a job has at most one round), built once and run on
# the Core connection: every job read runs it, and building the expression and loading ORM rows cost
# several times more than the query itself.
_LINKS = (
    core_select(col(Job.id), *_LINK_COLUMNS)
    .outerjoin(Round, col(Round.job_id) == col(Job.id))
    .where(col(Job.id).in_(bindparam("ids", expanding=True)))
)


def _links(conn: Connection, ids: list[str]) -> dict[str, _Links]:
    rows = conn.execute(_LINKS, {"ids": ids}).all()
    return {row[0]: _Links(*row[1:]) for row in rows}


def _job_out(j: JobFields, t: Timing, rnd: _Links) -> JobOut:
    status = j.status.value if isinstance(j.status, JobStatus) else str(j.status)
    return JobOut(
        id=j.id,
        kind=j.kind,
        status=status,
        attempt=j.attempt,
        max_attempts=j.max_attempts,
        cancel_requested=bool(j.cancel_requested),
        progress=JobProgress(
            step=j.step or 0, round_step=j.round_step or 0, total_steps=j.total_steps, examples=j.examples or 0
        ),
        percent_done=t.percent_done,
        elapsed_s=t.elapsed_s,
        eta_s=t.eta_s,
        latest_metrics=j.latest_metrics,
        error=j.error,
        created_at=j.created_at,
        queued_at=j.queued_at,
        started_at=j.started_at,
        finished_at=j.finished_at,
        updated_at=j.updated_at,
        parent_job_id=j.parent_job_id,
        run_id=rnd.run_id,
        round_id=rnd.round_id,
        round_index=rnd.round_index,
        checkpoint_id=rnd.checkpoint_id,
        output_feedback_id=rnd.output_feedback_id,
    )


def job_views(session: Session, jobs: list[Job]) -> list[JobOut]:
    if not jobs:
        return []
    conn = session.connection()
    timings = _timings(conn, jobs, utcnow())
    links = _links(conn, [j.id for j in jobs])
    return [_job_out(j, timings[j.id], links.get(j.id, _NO_LINKS)) for j in jobs]


def job_view(session: Session, job: Job) -> JobOut:
    return job_views(session, [job])[0]


_JOB_COLUMNS = list(Job.__table__.columns)  # type: ignore[attr-defined]  # (SQLModel declares no __table__)
# A job's columns and its links (see _LINKS): the statement behind the job routes that clients poll.
_JOBS_WITH_LINKS = core_select(*_JOB_COLUMNS, *_LINK_COLUMNS).outerjoin(Round, col(Round.job_id) == col(Job.id))
_ONE_JOB = _JOBS_WITH_LINKS.where(col(Job.id) == bindparam("id"))


def _owned_job_row(conn: Connection, statement: Any, principal: Principal, job_id: str) -> Row:
    """The row `statement` (with `project_id` among its columns) reads for this job of the caller's
    project, else 404 (as `common.get_owned`, on a Core connection)."""
    row = conn.execute(statement, {"id": job_id}).first() if plausible_id(job_id) else None
    if row is None or row.project_id != principal.project_id:
        raise not_found("job", job_id)
    return row


def _jobs_from_rows(rows: Sequence[Row]) -> list[tuple[JobFields, _Links]]:
    n = len(_JOB_COLUMNS)
    return [(cast(JobFields, row), _Links(*row[n:])) for row in rows]


def _views(conn: Connection, jobs: list[tuple[JobFields, _Links]]) -> list[JobOut]:
    timings = _timings(conn, [j for j, _ in jobs], utcnow())
    return [_job_out(j, timings[j.id], links) for j, links in jobs]


def list_job_views(
    session: Session, principal: Principal, limit: int, cursor: str | None, status: JobStatus | None = None
) -> tuple[list[JobOut], str | None]:
    """A page of the project's jobs, newest first (cursor pagination as `common.paginate`), as views
    read in one statement (as `job_view_by_id`)."""
    limit = max(1, min(limit, MAX_PAGE))
    query = _JOBS_WITH_LINKS.where(col(Job.project_id) == principal.project_id)
    if status is not None:
        query = query.where(col(Job.status) == status)
    conn = session.connection()
    rows = conn.execute(newest_first(query, Job, cursor, limit)).all()
    jobs, next_cursor = split_page(_jobs_from_rows(rows), limit, key=lambda pair: pair[0])
    return _views(conn, jobs), next_cursor


def job_view_by_id(conn: Connection, principal: Principal, job_id: str) -> JobOut:
    """`job_view(get_job(…))` in one prebuilt statement on a Core connection: the read that
    clients poll (`read_view`), so it skips the ORM's identity map and a second query."""
    return _views(conn, _jobs_from_rows([_owned_job_row(conn, _ONE_JOB, principal, job_id)]))[0]


_JOB_PROJECT = core_select(col(Job.project_id)).where(col(Job.id) == bindparam("id"))
# `data` as its stored JSON text, decoded by `_point_data`
_POINTS = core_select(
    col(MetricPoint.step),
    col(MetricPoint.split),
    col(MetricPoint.attempt),
    sql_cast(col(MetricPoint.data), Text).label("data"),
    col(MetricPoint.created_at),
)


def _point_data(text: str | None) -> dict[str, Any]:
    """A point's metrics. msgspec decodes ~10x faster than the JSON column's json.loads (a 10k-step
    page is 10k of them); json.loads still reads what msgspec refuses (NaN, written by json.dumps)."""
    if not text:
        return {}
    try:
        data = msgspec.json.decode(text)
    except msgspec.DecodeError:
        data = json.loads(text)
    return data if isinstance(data, dict) else {}  # JSON null (a point stored with data=None): none


def metrics(
    conn: Connection, principal: Principal, job_id: str, split: str | None, after_step: int | None, limit: int
) -> MetricSeries:
    """The per-step series, ascending by step, at most `limit` steps per page.

    After a crash and retry the same step can have been logged by two attempts: the latest
    attempt's point wins, so each (step, split) appears once. Plain rows, not `MetricPoint`
    objects: a page is up to MAX_METRIC_POINTS steps, and building ORM objects cost about 5x the
    query (bench/README, "Metric series")."""
    _owned_job_row(conn, _JOB_PROJECT, principal, job_id)
    limit = max(1, min(limit, MAX_METRIC_POINTS))
    filters = [col(MetricPoint.job_id) == job_id]
    if split:
        filters.append(col(MetricPoint.split) == split)
    if after_step is not None:
        filters.append(col(MetricPoint.step) > after_step)
    steps = (
        conn.execute(
            core_select(col(MetricPoint.step))
            .where(*filters)
            .distinct()
            .order_by(col(MetricPoint.step))
            .limit(limit + 1)
        )
        .scalars()
        .all()
    )
    if not steps:
        return MetricSeries(job_id=job_id, items=[], next_after_step=None)
    more = len(steps) > limit
    upper = steps[min(limit, len(steps)) - 1]
    rows = conn.execute(
        _POINTS.where(*filters, col(MetricPoint.step) <= upper).order_by(
            col(MetricPoint.step), col(MetricPoint.split), col(MetricPoint.attempt), col(MetricPoint.id)
        )
    )
    # within one (step, split), ascending attempt: the last attempt's row wins; then sorted here, not
    # by the database, whose collation may order split names otherwise
    latest = dict(sorted({(r.step, r.split): r for r in rows}.items()))
    # one validation of the whole page (in pydantic-core), not one model per point
    items = [
        {"step": step, "split": split_, "attempt": attempt, "data": _point_data(data), "created_at": created_at}
        for step, split_, attempt, data, created_at in latest.values()
    ]
    return MetricSeries.model_validate({"job_id": job_id, "items": items, "next_after_step": upper if more else None})


def log_path(settings: Settings, job: Job) -> Path:
    run_dir = Path(job.run_dir) if job.run_dir else settings.runs_dir / job.id
    return run_dir / "stdout.log"


def log_tail(settings: Settings, job: Job, tail_bytes: int) -> str:
    """The last `tail_bytes` of the job's stdout.log ("" before the job has started)."""
    path = log_path(settings, job)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - tail_bytes))
            data = fh.read(tail_bytes)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return ""
    if len(data) == tail_bytes and size > tail_bytes:  # cut mid-line: start at the next full line
        nl = data.find(b"\n")
        if 0 <= nl < len(data) - 1:
            data = data[nl + 1 :]
    return data.decode("utf-8", errors="replace")


def cancel(session: Session, principal: Principal, job_id: str) -> Job:
    job = get_job(session, principal, job_id)
    if job.status in TERMINAL_STATUSES:
        raise Conflict(
            f"job {job.id} already {job.status.value}; nothing to cancel",
            code="job_finished",
            details={"status": job.status.value},
        )
    job = _request_cancel(session, job.id)
    if job.status in TERMINAL_STATUSES and job.status != JobStatus.cancelled:  # finished meanwhile
        raise Conflict(
            f"job {job.id} already {job.status.value}; nothing to cancel",
            code="job_finished",
            details={"status": job.status.value},
        )
    return job

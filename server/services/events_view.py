"""Read side of job events: the cursor-paginated list and the batches the SSE stream sends.

Both read the `event` and `metricpoint` tables (never one process's memory), so any API process
answers for any job and a restart loses nothing. The stream's position is a pair of cursors
(last event id, last metric-point id), sent as the SSE `id` `"<event>.<metric>"`: a client that
reconnects with `Last-Event-ID` continues exactly after what it has seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from halos_client.event_models import EventList, EventOut, EventType
from server.db import MAX_DB_INT
from server.models import TERMINAL_STATUSES, Event, Job, JobStatus, MetricPoint
from server.services.jobs_view import get_job
from server.services.keys import Principal

LAST_EVENT_ID = re.compile(r"([0-9]{1,18})\.([0-9]{1,18})")
MAX_EVENTS_PAGE = 500
STREAM_EVENT_BATCH = 500
STREAM_METRIC_BATCH = 1000


def event_out(e: Event) -> EventOut:
    return EventOut(
        id=e.id or 0,
        type=EventType(e.type),
        job_id=e.job_id,
        run_id=e.run_id,
        subject_id=e.subject_id,
        attempt=e.attempt,
        status=e.status,
        data=dict(e.data or {}),
        created_at=e.created_at,
    )


def list_events(session: Session, principal: Principal, job_id: str, after: int | None, limit: int) -> EventList:
    """The job's events in order, after event id `after`. `next_cursor` is the last id returned (pass it
    as `after`; with fewer than `limit` items there is nothing more *now*, but a running job adds more)."""
    job = get_job(session, principal, job_id)
    limit = max(1, min(limit, MAX_EVENTS_PAGE))
    rows = session.exec(
        select(Event).where(Event.job_id == job.id, col(Event.id) > (after or 0)).order_by(col(Event.id)).limit(limit)
    ).all()
    session.commit()
    items = [event_out(e) for e in rows]
    return EventList(items=items, next_cursor=items[-1].id if items else after)


@dataclass(frozen=True)
class StreamPosition:
    event_id: int = 0
    metric_id: int = 0

    def header(self) -> str:
        return f"{self.event_id}.{self.metric_id}"

    @classmethod
    def parse(cls, value: str | None, after: int | None = None) -> StreamPosition:
        """`Last-Event-ID` as this server sends it ("<event>.<metric>") wins over `after` (events
        only); any other value is not one of our ids and is ignored."""
        match = LAST_EVENT_ID.fullmatch((value or "").strip())
        ids = (int(match[1]), int(match[2])) if match else None
        if ids is None or max(ids) > MAX_DB_INT:
            return cls(after or 0, 0)
        return cls(*ids)


@dataclass
class StreamBatch:
    status: str
    items: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (sse event, sse id, data)
    position: StreamPosition = field(default_factory=StreamPosition)
    drained: bool = False  # the job is terminal and everything up to its end has been read


def read_batch(session: Session, job_id: str, position: StreamPosition, metrics: bool) -> StreamBatch:
    """What happened after `position`: events and (with `metrics`) metric points, each in id order and
    merged by time. The status is read FIRST: when it is terminal, the events read after it include
    the terminal one (written in the same transaction as the status), so the stream can end."""
    status = session.exec(select(Job.status).where(Job.id == job_id)).one()
    events = session.exec(
        select(Event)
        .where(Event.job_id == job_id, col(Event.id) > position.event_id)
        .order_by(col(Event.id))
        .limit(STREAM_EVENT_BATCH)
    ).all()
    points = (
        session.exec(
            select(MetricPoint)
            .where(MetricPoint.job_id == job_id, col(MetricPoint.id) > position.metric_id)
            .order_by(col(MetricPoint.id))
            .limit(STREAM_METRIC_BATCH)
        ).all()
        if metrics
        else []
    )
    session.commit()
    event_id, metric_id = position.event_id, position.metric_id
    items: list[tuple[str, str, dict[str, Any]]] = []
    i = j = 0
    while i < len(events) or j < len(points):  # a merge by time that keeps each table's id order
        if j >= len(points) or (i < len(events) and events[i].created_at <= points[j].created_at):
            row = events[i]
            i += 1
            event_id = row.id or event_id
            items.append((row.type, f"{event_id}.{metric_id}", event_out(row).model_dump(mode="json")))
        else:
            point = points[j]
            j += 1
            metric_id = point.id or metric_id
            items.append(
                (
                    "metric",
                    f"{event_id}.{metric_id}",
                    {
                        "job_id": job_id,
                        "step": point.step,
                        "split": point.split,
                        "attempt": point.attempt,
                        "data": dict(point.data or {}),
                        "created_at": point.created_at.isoformat(),
                    },
                )
            )
    status_text = status.value if isinstance(status, JobStatus) else str(status)
    drained = (
        JobStatus(status_text) in TERMINAL_STATUSES
        and len(events) < STREAM_EVENT_BATCH
        and len(points) < STREAM_METRIC_BATCH
    )
    return StreamBatch(status_text, items, StreamPosition(event_id, metric_id), drained)

"""Job events: `GET /v1/jobs/{id}/events` (cursor pages) and the Server-Sent Events stream
(`GET /v1/jobs/{id}/events/stream`, or the list URL with `Accept: text/event-stream`).

The stream polls the database every `events_poll_interval_s` (any API process serves any job;
nothing lives in one process's memory), sends each event as an SSE message whose `event` is the
event type and each metric point as `event: metric`, comments as heartbeats every
`events_heartbeat_s`, and ends with `event: end` once the job is terminal and everything up to
its end was sent. Reconnect with `Last-Event-ID` to continue after the last message seen.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session
from sse_starlette.sse import EventSourceResponse

from halos_client.event_models import EventList
from server.api.deps import JsonBodyLimitRoute, ProjectDep, ReadSessionDep, SettingsDep, end_reads, error_responses
from server.db import MAX_DB_INT, get_read_engine
from server.services import events_view as service
from server.services.jobs_view import get_job
from server.settings import Settings

router = APIRouter(
    prefix="/v1/jobs", tags=["events"], route_class=JsonBodyLimitRoute, responses=error_responses(401, 429)
)

JobId = Annotated[str, Path(max_length=200)]
# One Server-Sent Event (the fields of a message; `data` is JSON text)
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "text/event-stream: one message per event (`event:` = its type, `data:` = EventOut JSON) and "
        "per metric point (`event: metric`), `id:` = '<event id>.<metric id>'; `event: end` last",
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    }
}
# typed `str` (default None) rather than Optional: the spec then says "a string", not "or null"
# (a header cannot carry a JSON null). What this server sends is '<event id>.<metric id>'; anything
# else is ignored, as EventSource servers commonly do (the stream starts at `after`).
LastEventId = Annotated[
    str,
    Header(
        alias="Last-Event-ID",
        max_length=64,
        description="resume after this message: the `id:` ('<event id>.<metric id>') of the last one seen",
    ),
]


def _stream(
    settings: Settings, job_id: str, position: service.StreamPosition, metrics: bool, request: Request
) -> EventSourceResponse:
    engine = get_read_engine(settings)  # read-only transactions: a poll never takes SQLite's write lock

    def read(pos: service.StreamPosition) -> service.StreamBatch:
        with Session(engine, expire_on_commit=False) as session:
            return service.read_batch(session, job_id, pos, metrics)

    async def messages() -> AsyncIterator[dict[str, Any]]:
        pos = position
        deadline = time.monotonic() + settings.events_stream_max_s
        while True:
            batch = await run_in_threadpool(read, pos)
            for event, message_id, data in batch.items:
                yield {"event": event, "id": message_id, "data": json.dumps(data, separators=(",", ":"))}
            pos = batch.position
            if batch.drained:
                # no `id:` of its own: it is not a position (a client resuming after it would get it again)
                yield {"event": "end", "data": json.dumps({"job_id": job_id, "status": batch.status})}
                return
            if batch.items and len(batch.items) >= service.STREAM_EVENT_BATCH:
                continue  # a backlog: read on without waiting
            if time.monotonic() >= deadline or await request.is_disconnected():
                return  # the client reconnects with Last-Event-ID
            await asyncio.sleep(settings.events_poll_interval_s)

    return EventSourceResponse(
        messages(), ping=settings.events_heartbeat_s, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={
        **error_responses(404, 422),
        200: {
            "description": "a page of events (JSON), or the stream with `Accept: text/event-stream`",
            "content": {"application/json": {}, "text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        },
    },
)
def list_events(
    job_id: JobId,
    principal: ProjectDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    request: Request,
    after: Annotated[int | None, Query(ge=0, le=MAX_DB_INT, description="events after this event id")] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_EVENTS_PAGE)] = 100,
    last_event_id: LastEventId = None,  # type: ignore[assignment]  # absent header: None (see LastEventId)
) -> Any:
    """The job's lifecycle events in order (queued, started with the attempt, checkpoint saved, eval
    done, attempt crashed, retry scheduled, cancelling, succeeded / failed / cancelled, …). They
    are written in the same transaction as the change they describe, so none is lost across
    retries and restarts. `Accept: text/event-stream` returns the live stream instead."""
    if "text/event-stream" in request.headers.get("accept", ""):
        job = get_job(session, principal, job_id)
        position = service.StreamPosition.parse(last_event_id, after)
        end_reads(session)  # the stream polls with short sessions of its own
        return _stream(settings, job.id, position, True, request)
    return service.list_events(session, principal, job_id, after, limit)


@router.get(
    "/{job_id}/events/stream",
    response_class=EventSourceResponse,
    responses={**error_responses(404, 422), **SSE_RESPONSE},
)
def stream_events(
    job_id: JobId,
    principal: ProjectDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    request: Request,
    after: Annotated[int | None, Query(ge=0, le=MAX_DB_INT, description="start after this event id")] = None,
    metrics: Annotated[bool, Query(description="also send every metric point (`event: metric`)")] = True,
    last_event_id: LastEventId = None,  # type: ignore[assignment]  # absent header: None (see LastEventId)
) -> EventSourceResponse:
    """Server-Sent Events: the job's events and metric points as they are written, from the start
    (or after `Last-Event-ID` / `after`), heartbeats while idle; ends after the job's terminal
    event (`event: end`). Works against any API process (it reads the database)."""
    job = get_job(session, principal, job_id)
    position = service.StreamPosition.parse(last_event_id, after)
    end_reads(session)  # the stream polls with short sessions of its own
    return _stream(settings, job.id, position, metrics, request)

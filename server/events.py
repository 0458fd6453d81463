"""The one writer of the `event` table and of the webhook outbox.

`emit` adds an Event row and, for every webhook endpoint of the project subscribed to its type,
a `OutboundDelivery` row (the transactional outbox) — in the CALLER's transaction, never
committing: an event exists exactly when the change it describes was committed. The job state
machine (server/jobs/) calls it for every transition, the feedback service when a file is stored.

Ordering (the cursor): every `job.*` event is written in a transaction that holds the job's row
lock (the state machine's conditional UPDATE or `SELECT … FOR UPDATE`; SQLite serialises all
writers), so a job's event ids are committed in increasing order and `id > cursor` never skips
one. The dispatcher (server/webhooks/dispatcher.py) sends the outbox rows after commit.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, select

from halos_client.event_models import EventType, subscription_matches
from server.models import Event, Job, JobStatus, OutboundDelivery, Round, WebhookEndpoint, utcnow


def _jsonable(value: Any) -> Any:
    from server.jobs.rows import json_safe

    return json_safe(json.loads(json.dumps(value, default=str)))


def emit(
    session: Session,
    project_id: str,
    type: EventType,
    *,
    job_id: str | None = None,
    run_id: str | None = None,
    subject_id: str | None = None,
    attempt: int | None = None,
    status: str | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    """Add the event and its outbox rows to the session (flushed, not committed)."""
    now = utcnow()
    event = Event(
        project_id=project_id,
        type=type.value,
        job_id=job_id,
        run_id=run_id,
        subject_id=subject_id or job_id,
        attempt=attempt,
        status=status,
        data=_jsonable(data or {}),
        created_at=now,
    )
    session.add(event)
    session.flush([event])
    assert event.id is not None  # flushed: the database assigned it
    endpoints = session.exec(
        select(WebhookEndpoint).where(
            WebhookEndpoint.project_id == project_id, col(WebhookEndpoint.deleted_at).is_(None)
        )
    ).all()
    for endpoint in endpoints:
        if subscription_matches(list(endpoint.event_types or []), type.value):
            session.add(
                OutboundDelivery(
                    project_id=project_id,
                    endpoint_id=endpoint.id,
                    event_id=event.id,
                    type=type.value,
                    body=webhook_body(event),
                    next_attempt_at=now,
                    created_at=now,
                )
            )
    return event


def webhook_body(event: Event) -> str:
    """The delivery payload (Standard Webhooks' recommended `{type, timestamp, data}` shape), fixed at
    insert so every retry signs and sends the same bytes."""
    data = {
        "event_id": event.id,
        "job_id": event.job_id,
        "run_id": event.run_id,
        "subject_id": event.subject_id,
        "attempt": event.attempt,
        "status": event.status,
        **(event.data or {}),
    }
    return json.dumps(
        {"type": event.type, "timestamp": event.created_at.isoformat(), "data": data},
        separators=(",", ":"),
        sort_keys=True,
    )


def job_event(
    session: Session,
    job_id: str,
    type: EventType,
    *,
    attempt: int | None = None,
    data: dict[str, Any] | None = None,
    subject_id: str | None = None,
) -> Event:
    """A `job.*` event; its status is the job's status as this transaction leaves it (read back)."""
    project_id, status = session.exec(select(Job.project_id, Job.status).where(Job.id == job_id)).one()
    run_id = session.exec(select(Round.run_id).where(Round.job_id == job_id)).one_or_none()
    status_text = status.value if isinstance(status, JobStatus) else str(status)
    return emit(
        session,
        project_id,
        type,
        job_id=job_id,
        run_id=run_id,
        subject_id=subject_id,
        attempt=attempt,
        status=status_text,
        data=data,
    )

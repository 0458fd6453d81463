"""Webhook endpoints of a project (create / list / get / delete / rotate the secret) and their
delivery log. The deliveries themselves are written by server/events.py and sent by
server/webhooks/dispatcher.py."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from halos_client.event_models import (
    DeliveryAttemptOut,
    DeliveryList,
    DeliveryOut,
    WebhookCreate,
    WebhookOut,
    WebhookWithSecret,
)
from server.errors import Unprocessable, not_found
from server.models import OutboundDelivery, WebhookAttempt, WebhookEndpoint, utcnow
from server.services.common import get_owned, paginate
from server.services.keys import Principal
from server.settings import Settings
from server.webhooks import addresses, signing

MAX_LOG_ATTEMPTS = 50


def webhook_out(w: WebhookEndpoint) -> WebhookOut:
    return WebhookOut(
        id=w.id,
        url=w.url,
        event_types=list(w.event_types or []),
        description=w.description,
        created_at=w.created_at,
        secret_rotated_at=w.secret_rotated_at,
        previous_secret_expires_at=w.previous_secret_expires_at,
    )


def with_secret(w: WebhookEndpoint) -> WebhookWithSecret:
    return WebhookWithSecret(**webhook_out(w).model_dump(), secret=w.secret)


def get_webhook(session: Session, principal: Principal, webhook_id: str) -> WebhookEndpoint:
    w = get_owned(session, WebhookEndpoint, webhook_id, principal.project_id, "webhook")
    if w.deleted_at is not None:
        raise not_found("webhook", webhook_id)
    return w


def create(session: Session, settings: Settings, principal: Principal, body: WebhookCreate) -> WebhookEndpoint:
    url = str(body.url)
    host = body.url.host or ""
    why = addresses.literal_refusal(host, settings.webhook_allowed_networks)
    if why:
        raise Unprocessable(
            f"webhook URL not allowed: {why}", code="webhook_url_not_allowed", details={"field": "url", "reason": why}
        )
    w = WebhookEndpoint(
        project_id=principal.project_id,
        url=url,
        event_types=body.event_types,
        description=body.description,
        secret=signing.new_secret(),
    )
    session.add(w)
    session.commit()
    return w


def list_webhooks(
    session: Session, principal: Principal, limit: int, cursor: str | None
) -> tuple[list[WebhookEndpoint], str | None]:
    return paginate(
        session, WebhookEndpoint, principal.project_id, limit, cursor, col(WebhookEndpoint.deleted_at).is_(None)
    )


def delete(session: Session, principal: Principal, webhook_id: str) -> None:
    """The endpoint gets nothing new; its pending deliveries are given up; its log stays readable
    through the delivery ids."""
    w = get_webhook(session, principal, webhook_id)
    now = utcnow()
    w.deleted_at = now
    session.add(w)
    session.exec(
        update(OutboundDelivery)
        .where(col(OutboundDelivery.endpoint_id) == w.id, col(OutboundDelivery.status) == "pending")
        .values(status="failed", last_error="endpoint deleted", finished_at=now)
    )
    session.commit()


def rotate(session: Session, settings: Settings, principal: Principal, webhook_id: str) -> WebhookEndpoint:
    """A new secret signs from now on; the old one also signs for `webhook_secret_grace_s`, so
    receivers can switch without losing a delivery."""
    w = get_webhook(session, principal, webhook_id)
    now = utcnow()
    w.previous_secret = w.secret
    w.previous_secret_expires_at = now + timedelta(seconds=settings.webhook_secret_grace_s)
    w.secret = signing.new_secret()
    w.secret_rotated_at = now
    session.add(w)
    session.commit()
    return w


def delivery_out(d: OutboundDelivery, attempts: list[WebhookAttempt]) -> DeliveryOut:
    return DeliveryOut(
        id=d.id,
        endpoint_id=d.endpoint_id,
        event_id=d.event_id,
        type=d.type,
        status=d.status,
        attempts=d.attempts,
        next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        created_at=d.created_at,
        finished_at=d.finished_at,
        log=[
            DeliveryAttemptOut(
                attempt=a.attempt,
                started_at=a.started_at,
                duration_ms=a.duration_ms,
                status_code=a.status_code,
                error=a.error,
                ok=a.ok,
            )
            for a in attempts
        ],
    )


def list_deliveries(
    session: Session, principal: Principal, webhook_id: str, status: str | None, limit: int, cursor: str | None
) -> DeliveryList:
    """Newest first, each with its attempts (at most the last MAX_LOG_ATTEMPTS)."""
    w = get_owned(session, WebhookEndpoint, webhook_id, principal.project_id, "webhook")
    filters = [OutboundDelivery.endpoint_id == w.id]
    if status:
        filters.append(OutboundDelivery.status == status)
    rows, next_cursor = paginate(session, OutboundDelivery, principal.project_id, limit, cursor, *filters)
    ids = [d.id for d in rows]
    logs: dict[str, list[WebhookAttempt]] = {i: [] for i in ids}
    if ids:
        for a in session.exec(
            select(WebhookAttempt).where(col(WebhookAttempt.delivery_id).in_(ids)).order_by(col(WebhookAttempt.attempt))
        ).all():
            logs[a.delivery_id].append(a)
    session.commit()
    return DeliveryList(items=[delivery_out(d, logs[d.id][-MAX_LOG_ATTEMPTS:]) for d in rows], next_cursor=next_cursor)


def redeliver(session: Session, principal: Principal, webhook_id: str, delivery_id: str) -> DeliveryOut:
    """Send a delivery again (same `webhook-id` and body): a failed one becomes pending, due now."""
    w = get_webhook(session, principal, webhook_id)
    d = get_owned(session, OutboundDelivery, delivery_id, principal.project_id, "delivery")
    if d.endpoint_id != w.id:
        raise not_found("delivery", delivery_id)
    session.exec(
        update(OutboundDelivery)
        .where(col(OutboundDelivery.id) == d.id)
        .values(status="pending", next_attempt_at=utcnow(), finished_at=None, lease_owner=None, lease_expires_at=None)
    )
    session.commit()
    session.refresh(d)
    attempts = list(
        session.exec(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == d.id).order_by(col(WebhookAttempt.attempt))
        ).all()
    )
    session.commit()
    return delivery_out(d, attempts)

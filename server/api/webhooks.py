"""Webhook endpoints of the caller's project and their delivery log (`/v1/webhooks`)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response

from halos_client.event_models import (
    DeliveryList,
    DeliveryOut,
    WebhookCreate,
    WebhookList,
    WebhookOut,
    WebhookWithSecret,
)
from server.api.deps import (
    JsonBodyLimitRoute,
    ProjectDep,
    ReadSessionDep,
    SettingsDep,
    WriteSessionDep,
    error_responses,
)
from server.services import webhooks as service

router = APIRouter(
    prefix="/v1/webhooks", tags=["webhooks"], route_class=JsonBodyLimitRoute, responses=error_responses(401, 429)
)

WebhookId = Annotated[str, Path(max_length=200)]


@router.post("", status_code=201, response_model=WebhookWithSecret, responses=error_responses(400, 413, 422))
def create_webhook(
    body: WebhookCreate, principal: ProjectDep, settings: SettingsDep, session: WriteSessionDep
) -> WebhookWithSecret:
    """Deliver the project's events of `event_types` to `url`, signed per Standard Webhooks with the
    returned `secret` (shown only here and on rotate). A URL whose host is a private, loopback or
    link-local address is refused (422) unless the operator allowed its network; host names are
    checked again at every delivery."""
    return service.with_secret(service.create(session, settings, principal, body))


@router.get("", response_model=WebhookList, responses=error_responses(422))
def list_webhooks(
    principal: ProjectDep,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> WebhookList:
    rows, next_cursor = service.list_webhooks(session, principal, limit, cursor)
    return WebhookList(items=[service.webhook_out(w) for w in rows], next_cursor=next_cursor)


@router.get("/{webhook_id}", response_model=WebhookOut, responses=error_responses(404))
def get_webhook(webhook_id: WebhookId, principal: ProjectDep, session: ReadSessionDep) -> WebhookOut:
    return service.webhook_out(service.get_webhook(session, principal, webhook_id))


@router.delete("/{webhook_id}", status_code=204, response_class=Response, responses=error_responses(404))
def delete_webhook(webhook_id: WebhookId, principal: ProjectDep, session: WriteSessionDep) -> Response:
    """Stop delivering to this endpoint; its pending deliveries are given up."""
    service.delete(session, principal, webhook_id)
    return Response(status_code=204)


@router.post("/{webhook_id}/rotate-secret", response_model=WebhookWithSecret, responses=error_responses(404))
def rotate_webhook_secret(
    webhook_id: WebhookId, principal: ProjectDep, settings: SettingsDep, session: WriteSessionDep
) -> WebhookWithSecret:
    """A new signing secret; the previous one keeps signing too (a second `v1,` signature) until
    `previous_secret_expires_at` (`webhook_secret_grace_s`)."""
    return service.with_secret(service.rotate(session, settings, principal, webhook_id))


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList, responses=error_responses(404, 422))
def list_deliveries(
    webhook_id: WebhookId,
    principal: ProjectDep,
    session: ReadSessionDep,
    status: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> DeliveryList:
    """The delivery log, newest first: each delivery's `webhook-id`, event, status, and every
    attempt (time, duration, status code, error)."""
    return service.list_deliveries(session, principal, webhook_id, status, limit, cursor)


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver", response_model=DeliveryOut, responses=error_responses(404)
)
def redeliver(
    webhook_id: WebhookId,
    delivery_id: Annotated[str, Path(max_length=200)],
    principal: ProjectDep,
    session: WriteSessionDep,
) -> DeliveryOut:
    """Send a delivery again now, with the same `webhook-id` and body."""
    return service.redeliver(session, principal, webhook_id, delivery_id)

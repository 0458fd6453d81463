"""Labelling tools: Label Studio configs, tasks export, export import; webhook integrations
(Label Studio, Argilla) accumulating annotations into a draft sealed into a feedback file."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from halos_client.models import FeedbackOut, IntegrationCreate, IntegrationOut, WebhookResult
from halos_core.feedback.labelstudio import CONFIGS
from server import storage
from server.api.deps import (
    IdempotencyKeyDep,
    KeylessWriteSessionDep,
    ProjectDep,
    ReadSessionDep,
    SettingsDep,
    WriteSessionDep,
    error_responses,
)
from server.errors import BadRequest, NotFound, PayloadTooLarge
from server.models import Integration
from server.services import feedback as feedback_service
from server.services import integrations as service
from server.services import labelstudio
from server.services.idempotency import REPLAY_HEADER

router = APIRouter(prefix="/v1", tags=["labelling tools"], responses=error_responses(401, 429))
MAX_WEBHOOK_BYTES = 4 * 1024 * 1024
Config = Literal["pairwise", "rating"]


def _out(session, integration: Integration, secret: bool = False) -> IntegrationOut:
    return IntegrationOut(
        id=integration.id,
        tool=integration.tool,
        label_config=integration.label_config,
        name=integration.name,
        webhook_path=f"/v1/integrations/{integration.id}/webhook",
        secret=integration.secret if secret and integration.tool == "label_studio" else None,
        draft=service.draft_counts(session, integration),
        created_at=integration.created_at,
    )


@router.get(
    "/labelstudio/configs/{name}",
    response_class=PlainTextResponse,
    responses={
        **error_responses(404, 422),
        200: {
            "content": {"application/xml": {"schema": {"type": "string"}}},
            "description": "the labelling config (XML)",
        },
    },
)
def labelstudio_config(name: Annotated[str, Path(max_length=64)]) -> PlainTextResponse:
    """The Label Studio labelling config for `pairwise` comparison or `rating` (paste it into the
    project). Another name ⇒ 404 `config_not_found`, listing the shipped ones."""
    if name not in CONFIGS:
        raise NotFound(
            f"no Label Studio config named {name!r}; the server ships {', '.join(CONFIGS)}",
            code="config_not_found",
            details={"name": name, "configs": list(CONFIGS)},
        )
    return PlainTextResponse(CONFIGS[name], media_type="application/xml")


@router.get(
    "/feedback/{feedback_id}/labelstudio-tasks",
    responses={
        **error_responses(404, 422),
        200: {
            "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}},
            "description": "Label Studio tasks (import them into the project)",
        },
    },
)
def labelstudio_tasks(
    feedback_id: Annotated[str, Path(max_length=200)],
    principal: ProjectDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    config: Config = "pairwise",
) -> StreamingResponse:
    """A samples file as Label Studio tasks: `pairwise` (a prompt's samples in pairs) or `rating`
    (one task per sample). Each task keeps our ids in `data.halos`. Not a samples file ⇒ 422."""
    fb = feedback_service.get_feedback(session, principal, feedback_id)
    return StreamingResponse(labelstudio.tasks_json(settings, fb, config), media_type="application/json")


@router.post(
    "/labelstudio/imports",
    status_code=201,
    response_model=FeedbackOut,
    responses={**error_responses(400, 413, 415, 422)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}},
        }
    },
)
async def labelstudio_import(
    request: Request,
    response: Response,
    principal: ProjectDep,
    settings: SettingsDep,
    session: WriteSessionDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> FeedbackOut:
    """Label Studio's JSON export (tasks with annotations) as a feedback file: pairwise for the
    Pairwise config, scalar for Rating. A malformed export ⇒ one 422 listing every bad task /
    annotation; nothing stored."""
    try:
        staged = await storage.receive_upload(
            request.stream(),
            request.headers.get("content-type"),
            tmp_dir=settings.uploads_tmp_dir,
            max_bytes=settings.max_upload_bytes,
        )
    except ClientDisconnect:
        raise BadRequest("the client disconnected during the upload", code="client_disconnected") from None
    try:
        result = await run_in_threadpool(
            labelstudio.import_export, session, settings, principal, staged, idempotency_key
        )
    finally:
        staged.discard()
    if result.replayed:
        response.headers[REPLAY_HEADER] = "true"
    return feedback_service.to_out(result.feedback)


@router.post("/integrations", status_code=201, response_model=IntegrationOut, responses=error_responses(400, 422))
def create_integration(body: IntegrationCreate, principal: ProjectDep, session: WriteSessionDep) -> IntegrationOut:
    """A webhook endpoint for one labelling project. Label Studio: the response's `secret` goes in
    the webhook's header `X-Halos-Webhook-Secret`. Argilla: pass the webhook's secret (whsec_…)."""
    integration = service.create(session, principal, body.tool, body.label_config, body.name, body.secret)
    return _out(session, integration, secret=True)


@router.get("/integrations/{integration_id}", response_model=IntegrationOut, responses=error_responses(404))
def get_integration(
    integration_id: Annotated[str, Path(max_length=200)], principal: ProjectDep, session: ReadSessionDep
) -> IntegrationOut:
    return _out(session, service.get(session, principal, integration_id))


@router.post(
    "/integrations/{integration_id}/seal",
    status_code=201,
    response_model=FeedbackOut,
    responses=error_responses(404, 409, 422),
)
def seal(
    integration_id: Annotated[str, Path(max_length=200)],
    principal: ProjectDep,
    session: WriteSessionDep,
    settings: SettingsDep,
) -> FeedbackOut:
    """Seal the draft (the annotations received since the last seal, as last updated, without the
    deleted ones) into a feedback file. Empty draft ⇒ 409 `draft_empty`."""
    return feedback_service.to_out(service.seal(session, settings, principal, integration_id))


@router.post(
    "/integrations/{integration_id}/webhook",
    response_model=WebhookResult,
    openapi_extra={
        "security": [],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
    },
    responses=error_responses(400, 404, 413, 422),
)
async def webhook(
    integration_id: Annotated[str, Path(max_length=200)], request: Request, session: KeylessWriteSessionDep
) -> WebhookResult:
    """Deliveries from the labelling tool (no API key: the integration's secret / signature
    authenticates; a bad one ⇒ 401 and nothing recorded). Replays change nothing."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_WEBHOOK_BYTES:
            raise PayloadTooLarge(f"webhook body over {MAX_WEBHOOK_BYTES} bytes")
    headers = {k.lower(): v for k, v in request.headers.items()}
    result = await run_in_threadpool(service.receive, session, integration_id, bytes(body), headers)
    return WebhookResult(**result)

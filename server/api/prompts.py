"""Prompt sets: POST /v1/prompts (streamed upload), GET /v1/prompts[/{id}[/content]]."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from halos_client.models import PromptSetList, PromptSetOut
from server import storage
from server.api.deps import IdempotencyKeyDep, ProjectDep, ReadSessionDep, SettingsDep, WriteSessionDep, error_responses
from server.errors import BadRequest, Conflict
from server.services import prompts as service
from server.services.common import refuse_deleted
from server.services.idempotency import REPLAY_HEADER
from server.storage_lifecycle import deletion

router = APIRouter(prefix="/v1/prompts", tags=["prompts"], responses=error_responses(401, 429))

_UPLOAD_BODY = {
    "required": True,
    "description": 'JSON array or JSON Lines of {"prompt_id", "prompt": [turns] | string, "split"?} records, or '
    "any feedback file (its prompts are taken). Multipart (`file` part) or the raw file as the body.",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}},
            }
        },
        "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
        "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
        "application/jsonl": {"schema": {"type": "string", "format": "binary"}},
    },
}
PromptSetId = Annotated[str, Path(max_length=200)]


@router.post(
    "",
    status_code=201,
    response_model=PromptSetOut,
    summary="Upload a prompt set",
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={
        **error_responses(400, 413, 415, 422),
        201: {
            "description": "Stored",
            "links": {
                "GetPromptSet": {"operationId": "get_prompt_set", "parameters": {"prompt_set_id": "$response.body#/id"}}
            },
        },
    },
)
async def upload_prompts(
    request: Request,
    response: Response,
    principal: ProjectDep,
    settings: SettingsDep,
    session: WriteSessionDep,
    idempotency_key: IdempotencyKeyDep = None,
    filename: Annotated[str | None, Query(max_length=4096)] = None,
    strict: Annotated[bool, Query(description="refuse plain-string prompts (422)")] = False,
) -> PromptSetOut:
    """Validated record by record like feedback: one 422 `invalid_prompts` listing every bad
    record, nothing stored. Plain-string prompts are read as one user turn and reported in
    `findings` (refused with `strict=true`)."""
    declared: int | None = None
    if (raw_length := request.headers.get("content-length")) is not None:
        try:
            declared = int(raw_length)
        except ValueError:
            raise BadRequest("invalid Content-Length header", code="invalid_content_length") from None
    try:
        staged = await storage.receive_upload(
            request.stream(),
            request.headers.get("content-type"),
            tmp_dir=settings.uploads_tmp_dir,
            max_bytes=settings.max_upload_bytes,
            content_length=declared,
            filename=filename,
        )
    except ClientDisconnect:
        raise BadRequest("the client disconnected during the upload", code="client_disconnected") from None
    try:
        ps, replayed = await run_in_threadpool(
            service.ingest, session, settings, principal, staged, idempotency_key, strict
        )
    finally:
        staged.discard()
    if replayed:
        response.headers[REPLAY_HEADER] = "true"
    return service.to_out(ps)


@router.get("/{prompt_set_id}", response_model=PromptSetOut, responses=error_responses(404))
def get_prompt_set(prompt_set_id: PromptSetId, principal: ProjectDep, session: ReadSessionDep) -> PromptSetOut:
    return service.to_out(service.get_prompt_set(session, principal, prompt_set_id))


@router.get("", response_model=PromptSetList, responses=error_responses(422))
def list_prompt_sets(
    principal: ProjectDep,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> PromptSetList:
    rows, next_cursor = service.list_prompt_sets(session, principal, limit, cursor)
    return PromptSetList(items=[service.to_out(r) for r in rows], next_cursor=next_cursor)


@router.get(
    "/{prompt_set_id}/content",
    response_class=FileResponse,
    responses={
        **error_responses(404, 409),
        200: {
            "description": "the stored file, streamed",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
            },
        },
    },
)
def get_prompt_set_content(
    prompt_set_id: PromptSetId, principal: ProjectDep, session: ReadSessionDep, settings: SettingsDep
) -> FileResponse:
    ps = service.get_prompt_set(session, principal, prompt_set_id)
    refuse_deleted(ps, "prompt_set")
    path = settings.data_dir / ps.storage_path
    if not path.is_file():
        raise Conflict(f"the stored content of {ps.id} is missing", code="content_missing")
    media = "application/json" if path.suffix == ".json" else "application/x-ndjson"
    return FileResponse(path, media_type=media, headers={"ETag": f'"{ps.sha256}"'}, filename=f"{ps.id}{path.suffix}")


@router.delete("/{prompt_set_id}", status_code=204, response_class=Response, responses=error_responses(404, 409))
def delete_prompt_set(
    prompt_set_id: PromptSetId, principal: ProjectDep, session: WriteSessionDep, settings: SettingsDep
) -> Response:
    """Delete the prompt set's bytes; the row stays as a tombstone (`deleted_at`). 409
    `prompt_set_in_use` while an unfinished sampling job uses it; deleting again is a 204."""
    deletion.delete_prompt_set(session, settings, principal, prompt_set_id)
    return Response(status_code=204)

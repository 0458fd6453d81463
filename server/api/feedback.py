"""POST /v1/feedback (streamed upload), GET /v1/feedback/{id}, GET /v1/feedback, GET /v1/feedback/{id}/content."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from halos_client.models import FeedbackList, FeedbackOut
from server import storage
from server.api.deps import IdempotencyKeyDep, ProjectDep, ReadSessionDep, SettingsDep, WriteSessionDep, error_responses
from server.errors import BadRequest, Conflict
from server.services import feedback as service
from server.services.common import refuse_deleted
from server.services.idempotency import REPLAY_HEADER
from server.storage_lifecycle import deletion

router = APIRouter(prefix="/v1/feedback", tags=["feedback"], responses=error_responses(401, 429))

_UPLOAD_BODY = {
    "required": True,
    "description": "A feedback file: HALOs JSON (array) or JSONL, TRL preference / unpaired, OpenAI "
    "preference JSONL. Either multipart/form-data with a `file` part (and an optional `filename` "
    "field, kept as metadata only) or the raw file as the body.",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "filename": {"type": "string", "maxLength": 4096},
                },
            }
        },
        "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
        "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
        "application/jsonl": {"schema": {"type": "string", "format": "binary"}},
    },
}


@router.post(
    "",
    status_code=201,
    response_model=FeedbackOut,
    summary="Upload a feedback file",
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={
        **error_responses(400, 413, 415, 422),
        201: {
            "description": "Stored (also returned, with `Idempotent-Replayed: true`, for a replay)",
            "links": {
                "GetFeedback": {"operationId": "get_feedback", "parameters": {"feedback_id": "$response.body#/id"}}
            },
        },
    },
)
async def upload_feedback(
    request: Request,
    response: Response,
    principal: ProjectDep,
    settings: SettingsDep,
    session: WriteSessionDep,
    idempotency_key: IdempotencyKeyDep = None,
    filename: Annotated[
        str | None, Query(max_length=4096, description="client file name for a raw body (metadata only)")
    ] = None,
    strict: Annotated[
        bool, Query(description="refuse a file with data-quality findings (422) instead of storing it with warnings")
    ] = False,
) -> FeedbackOut:
    """Streamed to disk with the size cap enforced while reading (413, with or without a
    Content-Length), hashed, validated record by record. An invalid file gets one 422
    `invalid_feedback` listing every bad record (line, field, code, hint) and nothing is stored.
    Stored content-addressed under the server's own name; the client's file name is metadata.
    Data-quality findings (pairs with identical outputs — left out of training —, duplicate
    records, plain-string prompts, empty outputs) come back in `findings`; with `strict=true`
    they are refused with the same 422 report."""
    pool = request.app.state.validation_pool
    # validation starts while the body is still arriving (in the pool's workers)
    pipeline = pool.pipeline(service.feedback_limits(settings)) if pool is not None else None
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
            on_flush=pipeline.flushed if pipeline is not None else None,
        )
    except BaseException as exc:
        if pipeline is not None:
            pipeline.cancel()  # the temp file is gone: segments not yet running are dropped
        if isinstance(exc, ClientDisconnect):
            raise BadRequest("the client disconnected during the upload", code="client_disconnected") from None
        raise
    try:
        result = await run_in_threadpool(
            service.ingest,
            session,
            settings,
            principal,
            staged,
            idempotency_key,
            strict,
            pool=pool,
            pipeline=pipeline,
        )
    finally:
        if pipeline is not None:
            pipeline.cancel()  # (what ingest did not wait for: e.g. a replay)
        staged.discard()  # no-op when ingest published it
    if result.replayed:
        response.headers[REPLAY_HEADER] = "true"
    return service.to_out(result.feedback)


@router.get("/{feedback_id}", response_model=FeedbackOut, responses=error_responses(404))
def get_feedback(
    feedback_id: Annotated[str, Path(max_length=200)], principal: ProjectDep, session: ReadSessionDep
) -> FeedbackOut:
    return service.to_out(service.get_feedback(session, principal, feedback_id))


@router.get("", response_model=FeedbackList, responses=error_responses(422))
def list_feedback(
    principal: ProjectDep,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> FeedbackList:
    """Newest first; pass `next_cursor` as `cursor` for the next page."""
    rows, next_cursor = service.list_feedback(session, principal, limit, cursor)
    return FeedbackList(items=[service.to_out(r) for r in rows], next_cursor=next_cursor)


@router.get(
    "/{feedback_id}/content",
    response_class=FileResponse,
    responses={
        **error_responses(404, 409),
        200: {
            "description": "the stored file, streamed (JSON array or JSON Lines)",
            "content": {
                "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
            },
        },
    },
)
def get_feedback_content(
    feedback_id: Annotated[str, Path(max_length=200)],
    principal: ProjectDep,
    session: ReadSessionDep,
    settings: SettingsDep,
) -> FileResponse:
    """The file's bytes as stored (uploads as uploaded; generated samples / labels as the job wrote
    them), streamed; `ETag` is its sha256."""
    fb = service.get_feedback(session, principal, feedback_id)
    refuse_deleted(fb, "feedback")
    path = service.content_path(settings, fb)
    if not path.is_file():
        raise Conflict(f"the stored content of {fb.id} is missing", code="content_missing")
    media = "application/json" if path.suffix == ".json" else "application/x-ndjson"
    return FileResponse(path, media_type=media, headers={"ETag": f'"{fb.sha256}"'}, filename=f"{fb.id}{path.suffix}")


@router.delete("/{feedback_id}", status_code=204, response_class=Response, responses=error_responses(404, 409))
def delete_feedback(
    feedback_id: Annotated[str, Path(max_length=200)],
    principal: ProjectDep,
    session: WriteSessionDep,
    settings: SettingsDep,
) -> Response:
    """Delete the file's bytes (personal data included); the row stays as a tombstone with its sha256
    (`deleted_at`), so the lineage of rounds trained on it still names it. 409 `feedback_in_use`
    while an unfinished round / labelling job uses it; deleting again is a 204."""
    deletion.delete_feedback(session, settings, principal, feedback_id)
    return Response(status_code=204)

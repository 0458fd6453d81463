"""POST /v1/models (register an SFT checkpoint directory), GET /v1/models/{id}, GET /v1/models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from halos_client.models import ModelCreate, ModelList, ModelOut
from server.api.deps import (
    JsonBodyLimitRoute,
    ProjectDep,
    ReadSessionDep,
    SettingsDep,
    WriteSessionDep,
    error_responses,
)
from server.services import models_registry as service
from server.storage_lifecycle import deletion

router = APIRouter(
    prefix="/v1/models", tags=["models"], route_class=JsonBodyLimitRoute, responses=error_responses(401, 429)
)


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses={
        **error_responses(400, 413, 422, 503),
        201: {
            "description": "Registered",
            "links": {"GetModel": {"operationId": "get_model", "parameters": {"model_id": "$response.body#/id"}}},
        },
    },
)
def register_model(
    body: ModelCreate, request: Request, principal: ProjectDep, settings: SettingsDep, session: WriteSessionDep
) -> ModelOut:
    """The directory must hold `config.json`, weights (`*.safetensors` or `pytorch_model*.bin`)
    and a tokenizer; otherwise 422 naming what is missing. It must lie under the data dir's
    `models/` folder or one of `HALOS_MODEL_ROOTS` (422 `model_path_not_allowed`). Its content
    hash is recorded: this reads the whole directory (seconds per GB; use a long client timeout).
    Too many registrations hashing at once ⇒ 503 `model_registration_busy` with Retry-After."""
    # A sync route: FastAPI runs it in its threadpool, so hashing never blocks the event loop.
    return service.to_out(
        service.register_model(session, principal, body, settings, request.app.state.model_hash_slots)
    )


@router.get("/{model_id}", response_model=ModelOut, responses=error_responses(404))
def get_model(
    model_id: Annotated[str, Path(max_length=200)], principal: ProjectDep, session: ReadSessionDep
) -> ModelOut:
    return service.to_out(service.get_model(session, principal, model_id))


@router.get("", response_model=ModelList, responses=error_responses(422))
def list_models(
    principal: ProjectDep,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> ModelList:
    rows, next_cursor = service.list_models(session, principal, limit, cursor)
    return ModelList(items=[service.to_out(r) for r in rows], next_cursor=next_cursor)


@router.delete("/{model_id}", status_code=204, response_class=Response, responses=error_responses(404, 409))
def delete_model(
    model_id: Annotated[str, Path(max_length=200)],
    principal: ProjectDep,
    session: WriteSessionDep,
    settings: SettingsDep,
) -> Response:
    """End the model's registration (its directory is the operator's and stays on disk). 409
    `model_in_use` while a run (not deleted) or an unfinished job uses it; deleting again is a 204."""
    deletion.delete_model(session, settings, principal, model_id)
    return Response(status_code=204)

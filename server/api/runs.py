"""Runs and their rounds: POST/GET /v1/runs, GET /v1/runs/{id}, POST /v1/runs/{id}/rounds."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from halos_client.models import (
    RetentionPlan,
    RetentionPolicy,
    Rollback,
    RoundCreate,
    RoundOut,
    RunCreate,
    RunList,
    RunOut,
)
from server.api.deps import (
    IdempotencyKeyDep,
    JsonBodyLimitRoute,
    ProjectDep,
    ReadSessionDep,
    SettingsDep,
    WriteSessionDep,
    error_responses,
)
from server.services import head, run_views
from server.services import runs as service
from server.services.idempotency import REPLAY_HEADER
from server.storage_lifecycle import deletion, retention

router = APIRouter(
    prefix="/v1/runs", tags=["runs"], route_class=JsonBodyLimitRoute, responses=error_responses(401, 429)
)

RunId = Annotated[str, Path(max_length=200)]


@router.post(
    "",
    status_code=201,
    response_model=RunOut,
    responses={
        **error_responses(400, 404, 409, 413, 422),
        201: {
            "description": "Created",
            "links": {
                "GetRun": {"operationId": "get_run", "parameters": {"run_id": "$response.body#/id"}},
                "CreateRound": {"operationId": "create_round", "parameters": {"run_id": "$response.body#/id"}},
            },
        },
    },
)
def create_run(
    body: RunCreate,
    response: Response,
    principal: ProjectDep,
    settings: SettingsDep,
    session: WriteSessionDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> RunOut:
    """An online run on a registered model: the model is the pinned reference for every round;
    `loss`, `hyperparams`, `conversion`, `lora` are the defaults rounds may override.
    Unknown `model_id` ⇒ 404 `model_not_found`."""
    run, replayed = service.create_run(session, settings, principal, body, idempotency_key)
    if replayed:
        response.headers[REPLAY_HEADER] = "true"
    return run_views.run_view(session, run)


@router.get("", response_model=RunList, responses=error_responses(422))
def list_runs(
    principal: ProjectDep,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> RunList:
    rows, next_cursor = service.list_runs(session, principal, limit, cursor)
    return RunList(items=[run_views.run_summary(r) for r in rows], next_cursor=next_cursor)


@router.get("/{run_id}", response_model=RunOut, responses=error_responses(404))
def get_run(run_id: RunId, principal: ProjectDep, session: ReadSessionDep) -> RunOut:
    """The run with its rounds in order (each with its job's status and checkpoints)."""
    return run_views.run_view(session, service.get_run(session, principal, run_id))


@router.post(
    "/{run_id}/rounds",
    status_code=201,
    response_model=RoundOut,
    responses={
        **error_responses(400, 404, 409, 413, 422, 507),
        201: {
            "description": "Queued (or waiting for its parent round)",
            "links": {
                "GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/job_id"}},
                "GetMetrics": {"operationId": "get_metrics", "parameters": {"job_id": "$response.body#/job_id"}},
                "GetLogs": {"operationId": "get_logs", "parameters": {"job_id": "$response.body#/job_id"}},
                "CancelJob": {"operationId": "cancel_job", "parameters": {"job_id": "$response.body#/job_id"}},
                "GetRun": {"operationId": "get_run", "parameters": {"run_id": "$response.body#/run_id"}},
            },
        },
    },
)
def create_round(
    run_id: RunId,
    body: RoundCreate,
    response: Response,
    principal: ProjectDep,
    settings: SettingsDep,
    session: WriteSessionDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> RoundOut:
    """Queue a training round on feedback files. Validated now, not on the worker: unknown
    feedback ids or an explicit parent checkpoint not of this run ⇒ 404; unknown loss, a loss
    that cannot use the feedback kinds, hyperparameters that do not fit, a parent checkpoint
    whose manifest does not verify ⇒ 422. Default parent: the latest round's checkpoint (if it is
    still running the new round waits for it; if it failed or was cancelled ⇒ 409
    `parent_round_failed`)."""
    rnd, _job, replayed = service.create_round(session, settings, principal, run_id, body, idempotency_key)
    if replayed:
        response.headers[REPLAY_HEADER] = "true"
    return run_views.round_view(session, rnd)


@router.post("/{run_id}/rollback", response_model=RunOut, responses=error_responses(400, 404, 413, 422))
def rollback(run_id: RunId, body: Rollback, principal: ProjectDep, session: WriteSessionDep) -> RunOut:
    """Move the run's head to `checkpoint_id` (any checkpoint of this run; null: the SFT model).
    The next round continues from it, with its optimizer state; the move is in `head_history`.
    A checkpoint of another run ⇒ 404."""
    return run_views.run_view(session, head.rollback(session, principal, run_id, body.checkpoint_id))


@router.delete("/{run_id}", status_code=204, response_class=Response, responses=error_responses(404, 409))
def delete_run(run_id: RunId, principal: ProjectDep, session: WriteSessionDep, settings: SettingsDep) -> Response:
    """Delete the run's checkpoints and run directories; the rows stay for the record (every
    checkpoint `pruned`) and the run answers 404 afterwards. 409 `run_in_use` while a job of the run
    (or a sampling / labelling job using one of its checkpoints) is unfinished; deleting again is a 204."""
    deletion.delete_run(session, settings, principal, run_id)
    return Response(status_code=204)


@router.get("/{run_id}/retention", response_model=RetentionPlan, responses=error_responses(404))
def retention_plan(
    run_id: RunId, principal: ProjectDep, session: ReadSessionDep, settings: SettingsDep
) -> RetentionPlan:
    """Dry run: what the run's retention policy would remove now, checkpoint by checkpoint, and how
    many bytes; and which checkpoints are kept whole and why (head, pinned, needed by a job, recent)."""
    return retention.plan(session, service.get_run(session, principal, run_id), settings)


@router.put("/{run_id}/retention", response_model=RetentionPlan, responses=error_responses(400, 404, 413, 422))
def set_retention(
    run_id: RunId, body: RetentionPolicy, principal: ProjectDep, session: WriteSessionDep, settings: SettingsDep
) -> RetentionPlan:
    """Set the run's own retention (fields left null take the server's defaults); answers the dry
    run under the new policy. Nothing is removed until the policy is applied (by the sweeper, after
    the run's next round, or `POST /v1/runs/{id}/retention/apply`)."""
    run = service.get_run(session, principal, run_id)
    run.retention = body.model_dump(mode="json", exclude_none=True) or None
    session.add(run)
    session.commit()
    return retention.plan(session, run, settings)


@router.post("/{run_id}/retention/apply", response_model=RetentionPlan, responses=error_responses(404))
def apply_retention(
    run_id: RunId, principal: ProjectDep, session: WriteSessionDep, settings: SettingsDep
) -> RetentionPlan:
    """Apply the run's retention now; answers what was removed (`dry_run: false`)."""
    return retention.apply(session, service.get_run(session, principal, run_id), settings)

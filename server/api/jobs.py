"""Jobs: status and progress, the metric series, the log tail, cancellation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse

from halos_client.models import JobList, JobOut, MetricSeries
from server.api.deps import (
    API_KEY_SECURITY,
    JsonBodyLimitRoute,
    ProjectDep,
    ReadSessionDep,
    SettingsDep,
    WriteSessionDep,
    error_responses,
    read_view,
)
from server.db import MAX_DB_INT
from server.models import JobStatus
from server.services import jobs_view as service

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], route_class=JsonBodyLimitRoute, responses=error_responses(401, 429)
)

JobId = Annotated[str, Path(max_length=200)]


@router.get("", response_model=JobList, responses=error_responses(422))
def list_jobs(
    principal: ProjectDep,
    session: ReadSessionDep,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobList:
    items, next_cursor = service.list_job_views(session, principal, limit, cursor, status)
    return JobList(items=items, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404), openapi_extra=API_KEY_SECURITY)
async def get_job(job_id: JobId, request: Request) -> Response:
    # What clients poll: no dependencies (read_view authenticates and reads in one transaction),
    # and async, so that on SQLite the read runs here instead of costing a hop to the thread pool.
    return await read_view(request, service.job_view_by_id, job_id)


@router.get(
    "/{job_id}/metrics",
    response_model=MetricSeries,
    responses=error_responses(404, 422),
    openapi_extra=API_KEY_SECURITY,
)
async def get_metrics(
    job_id: JobId,
    request: Request,
    split: Annotated[str | None, Query(max_length=10, pattern=r"^[A-Za-z0-9_]+$", description="train | eval")] = None,
    after_step: Annotated[int | None, Query(ge=-1, le=MAX_DB_INT, description="only steps after this one")] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_METRIC_POINTS, description="steps per page")] = 1000,
) -> Response:
    """One point per (step, split), ascending; after a retry the latest attempt's point wins."""
    # read_view: the series goes out as the model's own JSON, not re-validated against
    # `response_model` (which cost a third of a 10k-step page); large, so in the thread pool
    return await read_view(request, service.metrics, job_id, split, after_step, limit, large=True)


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={
        **error_responses(404, 422),
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "the tail of the training log"},
    },
)
def get_logs(
    job_id: JobId,
    principal: ProjectDep,
    session: ReadSessionDep,
    settings: SettingsDep,
    tail_bytes: Annotated[int | None, Query(ge=1, le=16 * 1024 * 1024)] = None,
) -> PlainTextResponse:
    """The last `tail_bytes` (default `log_tail_bytes`) of the job's `stdout.log`; empty before it starts."""
    job = service.get_job(session, principal, job_id)
    text = service.log_tail(settings, job, tail_bytes or settings.log_tail_bytes)
    return PlainTextResponse(text)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses=error_responses(404, 409))
def cancel_job(job_id: JobId, principal: ProjectDep, session: WriteSessionDep) -> JobOut:
    """waiting/queued ⇒ cancelled at once; running ⇒ cancelling (the worker stops the training
    process group, then cancelled). A finished job ⇒ 409 `job_finished`."""
    return service.job_view(session, service.cancel(session, principal, job_id))

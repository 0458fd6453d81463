"""POST /v1/sampling-jobs and POST /v1/labelling-jobs: jobs that make a stored feedback file.

They are jobs like rounds: GET /v1/jobs/{id} (status, `output_feedback_id` once succeeded),
/metrics, /logs, POST /v1/jobs/{id}/cancel."""

from __future__ import annotations

from fastapi import APIRouter

from halos_client.models import JobOut, LabellingJobCreate, SamplingJobCreate
from server.api.deps import (
    JsonBodyLimitRoute,
    ProjectDep,
    SettingsDep,
    WriteSessionDep,
    error_responses,
)
from server.services import artefact_jobs as service
from server.services import jobs_view

router = APIRouter(
    prefix="/v1", tags=["sampling and labelling"], route_class=JsonBodyLimitRoute, responses=error_responses(401, 429)
)

_LINKS = {
    "GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/id"}},
    "GetMetrics": {"operationId": "get_metrics", "parameters": {"job_id": "$response.body#/id"}},
    "CancelJob": {"operationId": "cancel_job", "parameters": {"job_id": "$response.body#/id"}},
}


@router.post(
    "/sampling-jobs",
    status_code=201,
    response_model=JobOut,
    responses={**error_responses(400, 404, 413, 422), 201: {"description": "Queued", "links": _LINKS}},
)
def create_sampling_job(
    body: SamplingJobCreate, principal: ProjectDep, settings: SettingsDep, session: WriteSessionDep
) -> JobOut:
    """Sample `params.n` completions per prompt from a checkpoint, a model, or a run's head.
    Unknown or foreign ids ⇒ 404; n × prompts over the server's cap ⇒ 422 `too_many_samples`.
    The result is a `sampled` feedback file (HALOs samples format) a round can train on and a
    labelling job can label."""
    return jobs_view.job_view(session, service.create_sampling_job(session, settings, principal, body))


@router.post(
    "/labelling-jobs",
    status_code=201,
    response_model=JobOut,
    responses={**error_responses(400, 404, 413, 422), 201: {"description": "Queued", "links": _LINKS}},
)
def create_labelling_job(
    body: LabellingJobCreate, principal: ProjectDep, settings: SettingsDep, session: WriteSessionDep
) -> JobOut:
    """Label a samples file with a reward model (a bradley_terry checkpoint): scalar scores,
    binary labels (threshold / mean / median) or one pair per prompt (random / max / min, with
    `min_gap`). A checkpoint without a reward head ⇒ 422 `no_reward_head`."""
    return jobs_view.job_view(session, service.create_labelling_job(session, settings, principal, body))

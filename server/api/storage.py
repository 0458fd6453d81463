"""GET /v1/usage: where the project's bytes are (server/storage_lifecycle/usage.py)."""

from __future__ import annotations

from fastapi import APIRouter

from halos_client.models import UsageOut
from server.api.deps import ProjectDep, ReadSessionDep, SettingsDep, error_responses
from server.storage_lifecycle import usage

router = APIRouter(prefix="/v1/usage", tags=["storage"], responses=error_responses(401, 429))


@router.get("", response_model=UsageOut)
def get_usage(principal: ProjectDep, session: ReadSessionDep, settings: SettingsDep) -> UsageOut:
    """Bytes on disk by kind for the caller's project (feedback, prompt sets, checkpoints whole /
    optimizer-pruned, intermediate checkpoints, run logs), counts (checkpoints by state, pinned,
    deleted feedback), the shared reference cache, and the data dir's free space and reserve."""
    return usage.usage_out(session, settings, principal.project_id)

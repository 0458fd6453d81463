"""Checkpoints and their lineage back to the SFT model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from halos_client.models import CheckpointOut, LineageOut
from server.api.deps import ProjectDep, ReadSessionDep, WriteSessionDep, error_responses
from server.services import lineage as service
from server.storage_lifecycle import retention

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], responses=error_responses(401, 429))

CheckpointId = Annotated[str, Path(max_length=200)]


@router.get("/{checkpoint_id}", response_model=CheckpointOut, responses=error_responses(404))
def get_checkpoint(checkpoint_id: CheckpointId, principal: ProjectDep, session: ReadSessionDep) -> CheckpointOut:
    return service.checkpoint_view(session, service.get_checkpoint(session, principal, checkpoint_id))


@router.get("/{checkpoint_id}/lineage", response_model=LineageOut, responses=error_responses(404, 409))
def get_lineage(checkpoint_id: CheckpointId, principal: ProjectDep, session: ReadSessionDep) -> LineageOut:
    """This checkpoint first, then its parents back to round 1, and the SFT model at the root."""
    return service.lineage(session, principal, checkpoint_id)


@router.put("/{checkpoint_id}/pin", response_model=CheckpointOut, responses=error_responses(404))
def pin_checkpoint(checkpoint_id: CheckpointId, principal: ProjectDep, session: WriteSessionDep) -> CheckpointOut:
    """Keep this checkpoint whole whatever the run's retention says (idempotent). Pinning a pruned
    checkpoint brings nothing back; it only stops further pruning."""
    ckpt = retention.set_pinned(session, service.get_checkpoint(session, principal, checkpoint_id), True)
    return service.checkpoint_view(session, ckpt)


@router.delete("/{checkpoint_id}/pin", response_model=CheckpointOut, responses=error_responses(404))
def unpin_checkpoint(checkpoint_id: CheckpointId, principal: ProjectDep, session: WriteSessionDep) -> CheckpointOut:
    """Let retention prune this checkpoint again when its turn comes (idempotent)."""
    ckpt = retention.set_pinned(session, service.get_checkpoint(session, principal, checkpoint_id), False)
    return service.checkpoint_view(session, ckpt)

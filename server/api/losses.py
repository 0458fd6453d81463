"""GET /v1/losses: the losses this server trains, with their parameters (from the loss registry,
so a loss added there is listed and accepted by the API without touching the API)."""

from __future__ import annotations

from fastapi import APIRouter

from halos_client.models import LossInfo, LossList
from halos_core.loss_registry import DATA_KIND_ACCEPTS, LOSSES
from server.api.deps import ProjectDep, error_responses

router = APIRouter(prefix="/v1/losses", tags=["runs"], responses=error_responses(401, 429))


@router.get("", response_model=LossList)
def list_losses(principal: ProjectDep) -> LossList:
    """Every loss a run or round may name in `loss.name`, with its parameters' JSON schema."""
    return LossList(
        losses=[
            LossInfo(
                name=name,
                summary=spec.summary,
                data=spec.data,
                feedback_kinds=sorted(DATA_KIND_ACCEPTS[spec.data]),
                needs_reference=spec.needs_reference,
                head=spec.head,
                min_microbatch_size=spec.min_microbatch,
                parameters=spec.config.model_json_schema(),
            )
            for name, spec in LOSSES.items()
        ]
    )

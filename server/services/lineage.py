"""Checkpoints and their lineage back to the SFT model (the run's pinned reference)."""

from __future__ import annotations

from sqlmodel import Session, col, select

from halos_client.models import CheckpointOut, LineageItem, LineageOut, ModelRef
from server.errors import Conflict
from server.models import Checkpoint, Model, Round
from server.services.common import get_owned
from server.services.keys import Principal
from server.storage_lifecycle.retention import can_continue

MAX_DEPTH = 10_000  # a lineage longer than this is a cycle in hand-edited data, not a real run


def get_checkpoint(session: Session, principal: Principal, checkpoint_id: str) -> Checkpoint:
    return get_owned(session, Checkpoint, checkpoint_id, principal.project_id, "checkpoint")


def checkpoint_view(session: Session, ckpt: Checkpoint) -> CheckpointOut:
    rnd = session.get(Round, ckpt.round_id)
    return CheckpointOut(
        id=ckpt.id,
        run_id=ckpt.run_id,
        round_id=ckpt.round_id,
        round_index=rnd.index if rnd else None,
        job_id=ckpt.job_id,
        model_id=ckpt.model_id,
        parent_id=ckpt.parent_id,
        path=ckpt.path,
        manifest_sha256=ckpt.manifest_sha256,
        step=ckpt.step,
        examples=ckpt.examples,
        created_at=ckpt.created_at,
        state=ckpt.state,
        pinned=ckpt.pinned,
        can_continue=can_continue(ckpt),
        pruned_at=ckpt.pruned_at,
    )


def lineage(session: Session, principal: Principal, checkpoint_id: str) -> LineageOut:
    """This checkpoint, its parent, … back to round 1, then the SFT model."""
    start = get_checkpoint(session, principal, checkpoint_id)
    chain: list[Checkpoint] = []
    seen: set[str] = set()
    current: Checkpoint | None = start
    while current is not None:
        if current.id in seen or len(chain) >= MAX_DEPTH:
            raise Conflict(f"checkpoint lineage of {start.id} contains a cycle", code="lineage_cycle")
        seen.add(current.id)
        chain.append(current)
        if current.parent_id is None:
            break
        parent = session.get(Checkpoint, current.parent_id)
        current = parent if parent is not None and parent.project_id == principal.project_id else None
    rounds = {r.id: r for r in session.exec(select(Round).where(col(Round.id).in_([c.round_id for c in chain]))).all()}
    items = []
    for c in chain:
        r = rounds.get(c.round_id)
        items.append(
            LineageItem(
                checkpoint_id=c.id,
                round_id=c.round_id,
                round_index=r.index if r else None,
                job_id=c.job_id,
                step=c.step,
                examples=c.examples,
                manifest_sha256=c.manifest_sha256,
                feedback_ids=list(r.feedback_ids or []) if r else [],
                loss=r.loss if r else None,
                hyperparams=r.hyperparams if r else None,
                conversion=r.conversion if r else None,
                state=c.state,
            )
        )
    model = session.get(Model, chain[-1].model_id)
    if model is None:  # FK-enforced; only a hand-edited database gets here
        raise Conflict(f"the lineage's model {chain[-1].model_id} is gone", code="model_missing")
    return LineageOut(
        checkpoint_id=start.id,
        items=items,
        model=ModelRef(id=model.id, name=model.name, path=model.path, sha256=model.sha256),
    )

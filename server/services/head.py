"""Rollback: move a run's head to any checkpoint of the run (or back to the SFT model).

The next round continues from it — its weights and its optimizer/scheduler state, with its step
and example counters — and its checkpoint's lineage shows the rollback target as its parent. The
move is recorded as a `HeadMove` (reason "rollback"). A round already running keeps going but is
not promoted when it ends (the head moved under it: server/jobs/head.py).
"""

from __future__ import annotations

from sqlmodel import Session, select

from server.errors import not_found
from server.jobs.head import move
from server.models import Checkpoint, Run, utcnow
from server.services.common import get_owned
from server.services.keys import Principal
from server.storage_lifecycle.retention import require_continuable


def rollback(session: Session, principal: Principal, run_id: str, checkpoint_id: str | None) -> Run:
    run = get_owned(session, Run, run_id, principal.project_id, "run")
    if checkpoint_id is not None:
        ckpt = get_owned(session, Checkpoint, checkpoint_id, principal.project_id, "checkpoint", "checkpoint_id")
        if ckpt.run_id != run.id:
            raise not_found("checkpoint", checkpoint_id, "checkpoint_id")
        require_continuable(ckpt, "checkpoint_id")  # the head is what the next round continues from
    run = session.exec(
        select(Run).where(Run.id == run.id).with_for_update().execution_options(populate_existing=True)
    ).one()
    move(session, run, checkpoint_id, "rollback", utcnow())
    session.commit()
    return run

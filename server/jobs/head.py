"""The run's head: the checkpoint the next round continues from and sampling uses by default.

One rule for where a round starts: the run's head at the moment the round is queued (at submit,
or when the round it waited for ends; `chaining.inherit`). The head moves only:

- by promotion, when a round succeeds (`promote`, in `jobs.finish`'s transaction): the round's gate
  passes (`halos_core.gate`; no gate passes) AND the head is still the checkpoint the round started
  from — a round that started from a head that was rolled back meanwhile is not promoted;
- by rollback (`server/services/head.py`), to any checkpoint of the run.

Each move is a `HeadMove` row; a round that is not promoted keeps the reason in `Round.promotion`.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import ValidationError
from sqlmodel import Session, select

from halos_core.gate import GateRule, verdict
from halos_core.round_result import RoundResult
from server.jobs.rows import round_of
from server.models import Checkpoint, HeadMove, Job, Run


def head_checkpoint(session: Session, run: Run) -> Checkpoint | None:
    """The run's head (None: the SFT model)."""
    return session.get(Checkpoint, run.head_checkpoint_id) if run.head_checkpoint_id else None


def _name(checkpoint_id: str | None) -> str:
    return checkpoint_id or "the SFT model"


def move(session: Session, run: Run, to: str | None, reason: str, now: datetime, round_id: str | None = None) -> None:
    session.add(
        HeadMove(
            run_id=run.id,
            from_checkpoint_id=run.head_checkpoint_id,
            to_checkpoint_id=to,
            reason=reason,
            round_id=round_id,
            created_at=now,
        )
    )
    run.head_checkpoint_id = to
    session.add(run)


def promote(session: Session, job: Job, ckpt: Checkpoint, result: RoundResult, now: datetime) -> bool:
    """Decide whether the round that just produced `ckpt` becomes the run's head; record why."""
    rnd = round_of(session, job.id)
    if rnd is None:
        return False
    run = session.exec(
        select(Run).where(Run.id == rnd.run_id).with_for_update().execution_options(populate_existing=True)
    ).one()
    try:
        rules = [GateRule.model_validate(r) for r in rnd.gate or []]
    except ValidationError as exc:  # a row no version of this code writes
        rules, check = [], {"passed": False, "checks": [], "reason": f"stored gate is invalid: {exc}"}
    else:
        check = (
            verdict(rules, result.eval_before, result.eval) if rules else {"passed": True, "checks": [], "reason": None}
        )
    started_from = rnd.parent_checkpoint_id
    # both scorings of the round's eval set, so a client can follow every eval metric of the head
    # (the gate checks only the ones it names)
    promotion = {
        "gate": check,
        "eval_before": result.eval_before,
        "eval": result.eval,
        "started_from": started_from,
        "head_at_finish": run.head_checkpoint_id,
    }
    if not check["passed"]:
        reason = f"gate failed: {check['reason']}"
    elif run.head_checkpoint_id != started_from:
        reason = (
            f"the round started from {_name(started_from)} but the head is now "
            f"{_name(run.head_checkpoint_id)} (moved while it ran)"
        )
    else:
        reason = None
        move(session, run, ckpt.id, "promoted", now, round_id=rnd.id)
    rnd.promoted = reason is None
    rnd.promotion = {**promotion, "reason": reason}
    session.add(rnd)
    return reason is None

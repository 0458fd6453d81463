"""Retention of a run's checkpoints, pins, and intermediate checkpoints of succeeded rounds.

The run's checkpoints are ranked newest round first. Never touched: the run's head, pinned
checkpoints, and every checkpoint an unfinished (waiting/queued/running) job of the project names
in its spec (a round continuing from it, a sampling/labelling job generating with it). Of the rest,
the newest `keep_rounds` stay whole; those up to `keep_weights_rounds` back lose their optimizer and
scheduler state (`optimizer_pruned`: loadable and evaluable, no round continues from it); older ones
lose their files (`pruned`: the row and its hashes stay for the lineage).

A prune is a deletion intent (server/storage_lifecycle/files.py): the row's state changes and the
intent is recorded in one transaction, the files go after the commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from halos_client.models import RetentionAction, RetentionKept, RetentionPlan, RetentionPolicy
from halos_core.run_dir import RunDir
from server.errors import Conflict
from server.models import UNFINISHED_STATUSES, Checkpoint, Job, JobStatus, Round, Run, utcnow
from server.settings import Settings
from server.storage_lifecycle import files

log = logging.getLogger("halos.storage")

WHOLE, OPTIMIZER_PRUNED, PRUNED = "whole", "optimizer_pruned", "pruned"
_RANK = {WHOLE: 0, OPTIMIZER_PRUNED: 1, PRUNED: 2}


def effective_policy(run: Run, settings: Settings) -> RetentionPolicy:
    own = run.retention or {}
    keep = own.get("keep_rounds") or settings.retention_keep_rounds
    weights = own.get("keep_weights_rounds") or settings.retention_keep_weights_rounds
    return RetentionPolicy(keep_rounds=keep, keep_weights_rounds=max(keep, weights))


def _ids_in(value: Any, out: set[str]) -> None:
    if isinstance(value, str):
        if value.startswith("ckpt_"):
            out.add(value)
    elif isinstance(value, dict):
        for v in value.values():
            _ids_in(v, out)
    elif isinstance(value, list):
        for v in value:
            _ids_in(v, out)


def needed_by_jobs(session: Session, project_id: str) -> dict[str, str]:
    """checkpoint id → the unfinished job of the project whose spec names it."""
    needed: dict[str, str] = {}
    rows = session.exec(
        select(Job.id, Job.spec).where(Job.project_id == project_id, col(Job.status).in_(list(UNFINISHED_STATUSES)))
    ).all()
    for job_id, spec in rows:
        found: set[str] = set()
        _ids_in(spec or {}, found)
        for ckpt_id in found:
            needed.setdefault(ckpt_id, job_id)
    return needed


@dataclass
class _Decision:
    ckpt: Checkpoint
    round_index: int | None
    target: str  # the state retention wants
    reasons: list[str]


def _decide(session: Session, run: Run, policy: RetentionPolicy, data_dir: Path) -> list[_Decision]:
    rows = session.exec(
        select(Checkpoint, Round.index)
        .join(Round, col(Round.id) == col(Checkpoint.round_id))
        .where(Checkpoint.run_id == run.id)
        .order_by(col(Round.index).desc())
    ).all()
    needed = needed_by_jobs(session, run.project_id)
    keep = policy.keep_rounds or 1
    weights = policy.keep_weights_rounds or keep
    out = []
    for rank, (ckpt, index) in enumerate(rows):
        reasons = []
        if ckpt.id == run.head_checkpoint_id:
            reasons.append("head")
        if ckpt.pinned:
            reasons.append("pinned")
        if ckpt.id in needed:
            reasons.append(f"needed_by_job:{needed[ckpt.id]}")
        if rank < keep:
            reasons.append("recent")
        if not files.inside(files.resolve(data_dir, ckpt.path), data_dir):
            reasons.append("outside_data_dir")  # not the server's to remove (files.execute would refuse)
        target = WHOLE if reasons else (OPTIMIZER_PRUNED if rank < weights else PRUNED)
        out.append(_Decision(ckpt, index, target, reasons))
    return out


def _action_bytes(ckpt: Checkpoint, to_state: str, data_dir: Path) -> int:
    path = files.resolve(data_dir, ckpt.path)
    return files.optimizer_bytes(path) if to_state == OPTIMIZER_PRUNED else files.tree_bytes(path)


def plan(session: Session, run: Run, settings: Settings) -> RetentionPlan:
    """What the policy would remove now (nothing is changed)."""
    policy = effective_policy(run, settings)
    actions, kept = [], []
    for d in _decide(session, run, policy, settings.data_dir):
        if _RANK[d.target] > _RANK[d.ckpt.state]:
            actions.append(
                RetentionAction(
                    checkpoint_id=d.ckpt.id,
                    round_index=d.round_index,
                    from_state=d.ckpt.state,
                    to_state=d.target,
                    bytes=_action_bytes(d.ckpt, d.target, settings.data_dir),
                )
            )
        elif d.reasons:
            kept.append(
                RetentionKept(
                    checkpoint_id=d.ckpt.id,
                    round_index=d.round_index,
                    state=d.ckpt.state,
                    reasons=d.reasons,
                )
            )
    return RetentionPlan(
        run_id=run.id, dry_run=True, policy=policy, actions=actions, bytes=sum(a.bytes for a in actions), kept=kept
    )


def prune_intent(session: Session, ckpt: Checkpoint, to_state: str, data_dir: Path) -> int | None:
    """Move `ckpt` to `to_state` in the caller's transaction and record the intent that removes
    its bytes; None when it is already there."""
    if _RANK[to_state] <= _RANK[ckpt.state]:
        return None
    path = str(files.resolve(data_dir, ckpt.path))
    op = "drop_optimizer" if to_state == OPTIMIZER_PRUNED else "rmtree"
    ckpt.state = to_state
    ckpt.pruned_at = utcnow()
    session.add(ckpt)
    intent = files.add_intent(
        session, f"checkpoint_{to_state}", ckpt.id, [{"op": op, "path": path}], project_id=ckpt.project_id
    )
    session.flush()
    assert intent.id is not None
    return intent.id


def apply(session: Session, run: Run, settings: Settings) -> RetentionPlan:
    """Prune what the policy says, now, deciding in the transaction that prunes (a job submitted since
    a dry run protects its checkpoint)."""
    session.rollback()
    # the run's row lock (Postgres; SQLite serialises writers anyway) orders this prune with a pin,
    # a rollback or a promotion of the same run: what the plan reads below is what they committed
    run = _locked_run(session, run.id) or run
    current = plan(session, run, settings)
    intents = []
    by_id = {a.checkpoint_id: a for a in current.actions}
    for ckpt in session.exec(select(Checkpoint).where(col(Checkpoint.id).in_(list(by_id)))).all():
        intent = prune_intent(session, ckpt, by_id[ckpt.id].to_state, settings.data_dir)
        if intent is not None:
            intents.append(intent)
    session.commit()
    files.finish(session, intents, settings)
    if intents:
        log.info("retention of run %s: %d checkpoint(s) pruned, %d bytes", run.id, len(intents), current.bytes)
    return current.model_copy(update={"dry_run": False})


def apply_all(session: Session, settings: Settings) -> int:
    """The sweeper's pass: every live run's retention. Returns how many checkpoints were pruned."""
    run_ids = session.exec(select(Run.id).where(col(Run.deleted_at).is_(None))).all()
    session.commit()
    pruned = 0
    for run_id in run_ids:
        run = session.get(Run, run_id)
        if run is None:
            continue
        try:
            pruned += len(apply(session, run, settings).actions)
        except Exception:
            session.rollback()
            log.exception("retention of run %s failed", run_id)
    return pruned


def _locked_run(session: Session, run_id: str) -> Run | None:
    return session.exec(
        select(Run).where(col(Run.id) == run_id).with_for_update().execution_options(populate_existing=True)
    ).first()


def set_pinned(session: Session, ckpt: Checkpoint, pinned: bool) -> Checkpoint:
    _locked_run(session, ckpt.run_id)  # not between a retention pass's plan and its prune (see apply)
    session.refresh(ckpt)
    ckpt.pinned = pinned
    session.add(ckpt)
    session.commit()
    session.refresh(ckpt)
    return ckpt


# --------------------------------------------------------------------------- intermediate checkpoints


def remove_intermediates(run_dir: str | Path | None, data_dir: Path) -> int:
    """A succeeded round's intermediate checkpoints (runs/<job>/checkpoints/): its final checkpoint is
    registered, nothing resumes from them any more. Returns the bytes removed."""
    if not run_dir:
        return 0
    path = RunDir(run_dir).checkpoints
    if not path.is_dir() or not files.inside(path, data_dir):
        return 0
    freed = files.tree_bytes(path)
    files.rmtree(path)
    return freed


def sweep_intermediates(session: Session, settings: Settings) -> int:
    """Intermediate checkpoints a worker killed right after a success left behind."""
    freed = 0
    rows = session.exec(
        select(Job.run_dir).where(Job.kind == "round", Job.status == JobStatus.succeeded, col(Job.run_dir).is_not(None))
    ).all()
    session.commit()
    for run_dir in rows:
        if run_dir and RunDir(run_dir).checkpoints.is_dir():
            freed += remove_intermediates(run_dir, settings.data_dir)
    return freed


# --------------------------------------------------------------------------- what a pruned checkpoint still allows


def can_continue(ckpt: Checkpoint) -> bool:
    return ckpt.state == WHOLE


def require_weights(ckpt: Checkpoint, field: str) -> None:
    """409 for a checkpoint whose files are gone (sampling / labelling / evaluating need the weights)."""
    if ckpt.state == PRUNED:
        raise Conflict(
            f"checkpoint {ckpt.id} was pruned: its files are gone (the lineage row stays)",
            code="checkpoint_pruned",
            details={"field": field, "id": ckpt.id, "state": ckpt.state},
        )


def require_continuable(ckpt: Checkpoint, field: str) -> None:
    """409 for a checkpoint a round cannot continue from (its optimizer state, or everything, is gone)."""
    require_weights(ckpt, field)
    if not can_continue(ckpt):
        raise Conflict(
            f"checkpoint {ckpt.id} has no optimizer state any more (retention pruned it): a round cannot "
            "continue from it; its weights can still be sampled and evaluated. Pin checkpoints you want to "
            "continue from (PUT /v1/checkpoints/{id}/pin).",
            code="checkpoint_cannot_continue",
            details={"field": field, "id": ckpt.id, "state": ckpt.state},
        )


def after_round_success(session: Session, settings: Settings, job_id: str) -> None:
    """What the worker does once a round's success is recorded: its intermediates go, and its run's
    retention is applied (the new checkpoint pushes older ones down the policy)."""
    job = session.get(Job, job_id)
    if job is None or job.kind != "round" or job.status != JobStatus.succeeded:
        session.commit()
        return
    run_dir = job.run_dir
    rnd = session.exec(select(Round).where(Round.job_id == job_id)).first()
    run = session.get(Run, rnd.run_id) if rnd is not None else None
    session.commit()
    remove_intermediates(run_dir, settings.data_dir)
    if run is not None and run.deleted_at is None:
        apply(session, run, settings)

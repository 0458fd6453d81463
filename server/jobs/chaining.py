"""Round chaining: what happens to the rounds that wait for a parent, and to the lineage, when the
parent ends.

- succeeded: its final checkpoint is registered (`register_checkpoint`; `Round.checkpoint_id` is
  THE answer to "the checkpoint of this round", `round_checkpoint`), the run's head moves to it if
  the round is promoted (server/jobs/head.py), and every waiting child continues from the run's
  head (`JobSpec.continue_from`: the parent's checkpoint when it was promoted, else the head it
  kept) and becomes `queued` (`promote_children`);
- failed / cancelled: every waiting child fails too, recursively down the chain, naming the parent
  (`fail_waiting_children`).

Status changes go through the state machine's conditional UPDATE (`rows.transition`).
"""

from __future__ import annotations

import logging
from datetime import datetime

from pydantic import ValidationError
from sqlmodel import Session, select

from halos_client.event_models import EventType
from halos_core.job_spec import JobSpec
from halos_core.round_result import RoundResult
from server.events import job_event
from server.jobs.head import head_checkpoint
from server.jobs.rows import load, round_of, transition, trim
from server.models import Checkpoint, Job, JobStatus, Round, Run

log = logging.getLogger("server.jobs")


def round_checkpoint(session: Session, rnd: Round) -> Checkpoint | None:
    """The checkpoint a round produced (None until it succeeded). Registered with the round's
    success in one transaction, so `Round.checkpoint_id` is the only place to look."""
    return session.get(Checkpoint, rnd.checkpoint_id) if rnd.checkpoint_id else None


def job_checkpoint(session: Session, job: Job) -> Checkpoint | None:
    rnd = round_of(session, job.id)
    return round_checkpoint(session, rnd) if rnd is not None else None


def parent_message(session: Session, parent: Job, reason: str, cancelled: bool) -> str:
    """Why a child of a failed or cancelled job fails: "parent round 2 was cancelled (job …)" /
    "parent round 2 (job …) failed: <its error>"."""
    rnd = round_of(session, parent.id)
    if cancelled:
        return (
            f"parent round {rnd.index} was cancelled (job {parent.id})"
            if rnd is not None
            else f"parent job {parent.id} was cancelled"
        )
    label = f"parent round {rnd.index} (job {parent.id})" if rnd is not None else f"parent job {parent.id}"
    return f"{label} failed: {reason}"


def fail_waiting_children(
    session: Session, parent: Job, reason: str, now: datetime, *, cancelled: bool = False
) -> list[str]:
    """Waiting children of a failed/cancelled job fail with it (recursively down the chain)."""
    failed: list[str] = []
    children = session.exec(select(Job.id).where(Job.parent_job_id == parent.id, Job.status == JobStatus.waiting)).all()
    if not children:
        return failed
    message = trim(parent_message(session, parent, reason, cancelled))
    for child_id in children:
        if transition(
            session,
            child_id,
            [JobStatus.waiting],
            {"status": JobStatus.failed, "error": message, "finished_at": now, "updated_at": now},
        ):
            failed.append(child_id)
            job_event(session, child_id, EventType.job_failed, data={"error": message})
            child = load(session, child_id)
            if child is not None:
                failed += fail_waiting_children(session, child, message or "", now)
    return failed


def inherit(session: Session, child: Job, parent: Job) -> None:
    """Point a child round (in memory or in the DB) of a succeeded parent at the run's head (the
    parent's checkpoint when the parent was promoted)."""
    rnd = round_of(session, child.id)
    run = session.get(Run, rnd.run_id) if rnd is not None else None
    if rnd is None or run is None:
        return
    ckpt = head_checkpoint(session, run)
    try:
        spec = JobSpec.model_validate(child.spec)
    except ValidationError as exc:  # a row no version of this code writes: the worker fails it with the reason
        log.error("job %s: stored spec is invalid, not chained to %s: %s", child.id, run.head_checkpoint_id, exc)
        return
    if ckpt is None:  # the head is the SFT model (nothing promoted yet, or rolled back to it)
        child.spec = spec.continue_from(None, None, 0, 0).model_dump(mode="json")
    else:
        child.spec = spec.continue_from(ckpt.path, ckpt.id, ckpt.step, ckpt.examples).model_dump(mode="json")
    rnd.parent_checkpoint_id = ckpt.id if ckpt is not None else None
    session.add(rnd)


def promote_children(session: Session, parent: Job, now: datetime) -> list[str]:
    """waiting → queued for the children of a succeeded parent, each continuing from its checkpoint."""
    promoted: list[str] = []
    children = session.exec(select(Job.id).where(Job.parent_job_id == parent.id, Job.status == JobStatus.waiting)).all()
    for child_id in children:
        child = load(session, child_id)
        if child is None or child.status != JobStatus.waiting:
            continue
        inherit(session, child, parent)
        if transition(
            session,
            child_id,
            [JobStatus.waiting],
            {"status": JobStatus.queued, "spec": child.spec, "queued_at": now, "published_at": None, "updated_at": now},
        ):
            promoted.append(child_id)
            job_event(
                session,
                child_id,
                EventType.job_queued,
                data={
                    "reason": "parent succeeded",
                    "parent_job_id": parent.id,
                    "parent_checkpoint_id": (child.spec or {}).get("init_from_checkpoint_id"),
                },
            )
    return promoted


def register_checkpoint(session: Session, job: Job, result: RoundResult) -> Checkpoint | None:
    """The round's final checkpoint, in the same transaction as its success (parent = the round's
    parent checkpoint, model = the run's SFT model)."""
    rnd = round_of(session, job.id)
    if rnd is None:
        return None
    run = session.get(Run, rnd.run_id)
    if run is None:  # the foreign key makes this a hand-edited database
        raise LookupError(f"round {rnd.id} belongs to a missing run {rnd.run_id}")
    ckpt = Checkpoint(
        project_id=job.project_id,
        run_id=rnd.run_id,
        round_id=rnd.id,
        job_id=job.id,
        model_id=run.model_id,
        parent_id=rnd.parent_checkpoint_id,
        path=result.final_dir,
        manifest_sha256=result.manifest_sha256,
        step=result.step,
        examples=result.examples,
    )
    session.add(ckpt)
    session.flush()
    rnd.checkpoint_id = ckpt.id
    session.add(rnd)
    return ckpt

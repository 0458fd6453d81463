"""The job state machine: the ONLY writer of `Job.status` (docs/ARCHITECTURE.md).

```
waiting ──parent succeeded──▶ queued ──claim──▶ running ──exit 0 + result.json──▶ succeeded
   └─parent failed/cancelled─▶ failed   ▲  ▲        ├─exit >0──────────────────▶ failed
                                        │  │        ├─cancel──▶ cancelling ──▶ cancelled
                                        │  │        └─attempt crashed (lease expired, killed, exit 0 without a result)
                                        │  └─ warm-shutdown release (no retry consumed)
                                        └──── crashes < max_attempts (backoff); else failed
queued/waiting ──cancel──▶ cancelled
```

Every transition is a *conditional* UPDATE on the row's current status (and, for the holder of a
lease, its lease token): a transition whose precondition no longer holds changes nothing and is
reported as such (`None`, `Heartbeat.LOST`, an unchanged job), so duplicate deliveries, stale
runners and racing sweepers are harmless. Every function takes a SQLModel `Session` and commits
itself. On SQLite each transaction starts with `BEGIN IMMEDIATE` (server/db.py), on Postgres the
conditional UPDATE takes the row lock and re-checks its WHERE clause after a concurrent commit.

A crashed attempt is resolved in the transaction that detects it: the Attempt row keeps
`outcome='crashed'` with the reason, and the job is queued again with `not_before` backoff (its
`error` says which attempt crashed, why, and when the retry runs), or fails once it has crashed
`max_attempts` times. Attempts are append-only and every attempt row is closed (`ended_at`,
`outcome`) on every transition out of running/cancelling (invariant I2 in docs/RELIABILITY.md).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, update
from sqlmodel import Session, col, select

from halos_client.event_models import EventType
from server.db import db_now
from server.events import job_event
from server.jobs import gang
from server.jobs.chaining import fail_waiting_children, inherit, parent_message, promote_children
from server.jobs.gang import GangState, NodeOffer
from server.jobs.outputs import progress_values, record_success
from server.jobs.rows import close_attempt, load, reload_and_end, requeued, seconds, transition, trim
from server.jobs.types import Claim, Heartbeat, JobNotFound, Outcome, ParentFailed
from server.models import (
    FAILED_STATUSES,
    LIVE_STATUSES,
    PENDING_STATUSES,
    TERMINAL_STATUSES,
    Attempt,
    Checkpoint,
    FeedbackFile,
    GangMember,
    Job,
    JobStatus,
)

log = logging.getLogger("server.jobs")


def crash_count(session: Session, job_id: str) -> int:
    return session.exec(
        select(func.count()).select_from(Attempt).where(Attempt.job_id == job_id, Attempt.outcome == "crashed")
    ).one()


def _updated(session: Session, job_id: str) -> Job:
    """The row this transaction has just updated (and so holds locked): it exists."""
    job = load(session, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def resolve_crash(session: Session, job: Job, error: str, now: datetime, backoff_s: float) -> str:
    """Called with the attempt already closed as `crashed` and the job row guarded by the caller."""
    job_event(session, job.id, EventType.job_attempt_crashed, attempt=job.attempt, data={"reason": error})
    if job.cancel_requested or job.status == JobStatus.cancelling:
        set_terminal(session, job, JobStatus.cancelled, f"cancelled (attempt {job.attempt} crashed: {error})", now)
        return "cancelled"
    crashes = crash_count(session, job.id)
    if crashes < job.max_attempts:
        delay = backoff_s * (2 ** max(crashes - 1, 0))
        session.exec(
            update(Job)
            .where(col(Job.id) == job.id)
            .values(
                status=JobStatus.queued,
                lease_token=None,
                lease_expires_at=None,
                not_before=now + timedelta(seconds=delay),
                queued_at=now,
                published_at=None,
                error=trim(
                    f"attempt {job.attempt} crashed: {error}; retry {crashes + 1}/{job.max_attempts} after {delay:g}s"
                ),
                updated_at=now,
            )
        )
        job_event(
            session,
            job.id,
            EventType.job_retry_scheduled,
            attempt=job.attempt,
            data={
                "at": (now + timedelta(seconds=delay)).isoformat(),
                "delay_s": delay,
                "retry": crashes + 1,
                "max_attempts": job.max_attempts,
                "reason": error,
            },
        )
        return "queued"
    set_terminal(session, job, JobStatus.failed, f"crashed {crashes} times: {error}", now)
    return "failed"


def set_terminal(session: Session, job: Job, status: JobStatus, error: str | None, now: datetime) -> None:
    session.exec(
        update(Job)
        .where(col(Job.id) == job.id)
        .values(
            status=status,
            error=trim(error),
            finished_at=now,
            lease_token=None,
            lease_expires_at=None,
            not_before=None,
            updated_at=now,
        )
    )
    job_event(
        session,
        job.id,
        EventType.job_cancelled if status == JobStatus.cancelled else EventType.job_failed,
        attempt=job.attempt or None,
        data={"error": trim(error)},
    )
    if status in FAILED_STATUSES:
        reason = error or status.value
        fail_waiting_children(session, job, reason, now, cancelled=status == JobStatus.cancelled)


def default_backoff() -> float:
    from server.settings import get_settings

    return get_settings().retry_backoff_s


def submit(session: Session, job: Job, *, max_attempts: int | None = None, refuse_failed_parent: bool = False) -> Job:
    """Insert `job` as `waiting` (its parent job unfinished) or `queued`, and commit.

    The caller publishes the id after this returns (`server.queue.publish`). When the parent has
    already succeeded the job inherits its final checkpoint here; when it failed or was
    cancelled the job fails at once — or, with `refuse_failed_parent`, nothing is inserted (the
    caller's pending objects are rolled back too) and `ParentFailed` is raised: the API checked the
    parent a moment ago and answers 409 instead. The parent row is locked (Postgres `FOR UPDATE`;
    SQLite serialises writers anyway), so a parent finishing concurrently either sees this child
    and promotes it, or is seen here as finished.
    """
    now = db_now(session)
    if max_attempts is None:
        from server.settings import get_settings

        max_attempts = get_settings().max_attempts
    job.max_attempts = max_attempts
    job.attempt = 0
    job.lease_token = None
    job.lease_expires_at = None
    job.cancel_requested = False
    job.status = JobStatus.queued
    job.updated_at = now
    parent: Job | None = None
    try:
        # no autoflush: the caller's pending Round references this job, which must be inserted first
        with session.no_autoflush:
            if job.parent_job_id:
                parent = session.exec(
                    select(Job)
                    .where(Job.id == job.parent_job_id)
                    .with_for_update()
                    .execution_options(populate_existing=True)
                ).one_or_none()
                if parent is None:
                    raise JobNotFound(f"parent job {job.parent_job_id} does not exist")
                if parent.status in FAILED_STATUSES:
                    message = trim(
                        parent_message(
                            session, parent, parent.error or parent.status.value, parent.status == JobStatus.cancelled
                        )
                    )
                    if refuse_failed_parent:
                        raise ParentFailed(parent, message)
                    job.status = JobStatus.failed
                    job.error = message
                    job.finished_at = now
                elif parent.status != JobStatus.succeeded:
                    job.status = JobStatus.waiting
        if job.status == JobStatus.queued:
            job.queued_at = now
        session.add(job)
        session.flush([job])
        if parent is not None and parent.status == JobStatus.succeeded:
            inherit(session, job, parent)
            session.add(job)
        session.flush()  # the caller's pending Round too: the event names the job's run
        _submitted_event(session, job)
        session.commit()
        session.refresh(job)
        session.commit()  # end the read transaction (SQLite: BEGIN IMMEDIATE holds the write lock)
    except Exception:
        session.rollback()
        raise
    return job


def _submitted_event(session: Session, job: Job) -> None:
    if job.status == JobStatus.waiting:
        job_event(session, job.id, EventType.job_waiting_for_parent, data={"parent_job_id": job.parent_job_id})
    elif job.status == JobStatus.failed:
        job_event(session, job.id, EventType.job_failed, data={"error": job.error})
    else:
        job_event(session, job.id, EventType.job_queued, data={"reason": "submitted"})


def claim(
    session: Session,
    job_id: str,
    host: str,
    pid: int | None,
    lease_ttl: float | timedelta,
    *,
    run_dir: str | None = None,
    node: NodeOffer | None = None,
    now: datetime | None = None,
) -> Claim | None:
    """queued → running with a new lease and Attempt row; None when not claimable (duplicate delivery,
    already running/finished, cancel requested, or still in retry backoff).

    A multi-node round (server/jobs/gang.py) needs `node` (a caller without one gets None): the
    worker joins the oldest gang still forming — possibly ANOTHER job's: the Claim names the job
    it joined — or, when none is forming, opens this job's gang as rank 0."""
    now = now or db_now(session)
    try:
        spec = session.exec(select(Job.spec).where(Job.id == job_id)).one_or_none()
        nodes = gang.nodes_of(spec)
        if nodes > 1:
            if node is None:
                session.rollback()
                return None
            gang.lock_formation(session)
            forming = gang.oldest_forming(session, now, node.form_timeout_s)
            if forming is not None:
                joined = gang.join(session, forming, host, pid, lease_ttl, now)
                session.commit()
                return joined
    except Exception:
        session.rollback()
        raise
    token = secrets.token_hex(16)
    values: dict[str, Any] = {
        "status": JobStatus.running,
        "attempt": Job.attempt + 1,
        "lease_token": token,
        "lease_expires_at": now + timedelta(seconds=seconds(lease_ttl)),
        "started_at": func.coalesce(Job.started_at, now),
        "not_before": None,
        "updated_at": now,
    }
    if run_dir is not None:
        values["run_dir"] = run_dir
    try:
        ok = transition(
            session,
            job_id,
            [JobStatus.queued],
            values,
            extra_where=[
                or_(col(Job.not_before).is_(None), col(Job.not_before) <= now),
                col(Job.cancel_requested).is_(False),
                *([gang.no_live_members(job_id, now)] if nodes > 1 else []),
            ],
        )
        if not ok:
            session.rollback()
            return None
        job = _updated(session, job_id)
        claimed = Claim(
            job_id=job.id,
            attempt=job.attempt,
            lease_token=token,
            run_dir=job.run_dir,
            spec=dict(job.spec or {}),
            project_id=job.project_id,
            kind=job.kind,
        )
        session.add(
            Attempt(job_id=job_id, attempt=job.attempt, lease_token=token, host=host[:255], pid=pid, started_at=now)
        )
        data: dict[str, Any] = {"host": host[:255]}
        if nodes > 1:
            rank0 = gang.add_member(session, job, 0, nodes, host, pid, lease_ttl, now, node)
            claimed = gang.gang_claim(job, rank0, rank0)
            data["nodes"] = nodes
        job_event(session, job_id, EventType.job_started, attempt=job.attempt, data=data)
        session.commit()
    except Exception:
        session.rollback()
        raise
    return claimed


def heartbeat(
    session: Session,
    job_id: str,
    lease_token: str,
    lease_ttl: float | timedelta,
    *,
    member_token: str | None = None,
    now: datetime | None = None,
) -> Heartbeat:
    """Renew the lease (and a gang member's own). OK; CANCEL (kill the training, then
    finish(cancelled)); LOST (self-fence: the attempt ended, or this member was ended)."""
    now = now or db_now(session)
    ok = transition(
        session,
        job_id,
        LIVE_STATUSES,
        {"lease_expires_at": now + timedelta(seconds=seconds(lease_ttl)), "updated_at": now},
        lease_token=lease_token,
    )
    if ok and member_token is not None:
        ok = gang.renew(session, member_token, lease_ttl, now)
    if not ok:
        session.rollback()
        return Heartbeat.LOST
    status, cancel = session.exec(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).one()
    session.commit()
    if status == JobStatus.cancelling or cancel:
        return Heartbeat.CANCEL
    return Heartbeat.OK


def finish(
    session: Session,
    job_id: str,
    lease_token: str,
    outcome: Outcome,
    *,
    retry_backoff_s: float | None = None,
    member_token: str | None = None,
    now: datetime | None = None,
) -> Job:
    """End the attempt holding `lease_token`. A stale token changes nothing (returns the job as is).

    succeeded: registers the final Checkpoint (parent = the round's parent checkpoint, model = the
    run's model), sets Round.checkpoint_id, moves the run's head to it when the round's gate passes
    (server/jobs/head.py) and promotes waiting children to `queued`, continuing from the head
    (publish them after this returns: `unpublished_children`); a sampling / labelling job's output
    becomes a stored feedback file (server/jobs/outputs.py). failed/cancelled: waiting children fail too.
    crashed: a new queued attempt with backoff, or failed after `max_attempts` crashes.
    A gang member (`member_token`) ends the attempt for every member (the others' heartbeats
    answer LOST) and its own member row with it.
    """
    now = now or db_now(session)
    backoff = default_backoff() if retry_backoff_s is None else retry_backoff_s
    try:
        job = session.exec(
            select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
        ).one_or_none()
        if job is None:
            raise JobNotFound(job_id)
        if job.lease_token != lease_token or job.status not in LIVE_STATUSES:
            log.warning("finish(%s, %s) ignored: lease not held (status %s)", job_id, outcome.status, job.status)
            if member_token is not None:  # this member has stopped: it no longer holds up a retry
                gang.end_member(session, member_token, "lost", now)
            session.commit()
            return job
        attempt = job.attempt
        if member_token is not None:
            gang.end_member(session, member_token, outcome.status, now)
        if outcome.status == "succeeded":
            result = outcome.result
            assert result is not None  # Outcome refuses a success without its result
            close_attempt(session, job_id, attempt, "succeeded", None, now)
            values: dict[str, Any] = {
                "status": JobStatus.succeeded,
                "error": None,
                "finished_at": now,
                "lease_token": None,
                "lease_expires_at": None,
                "not_before": None,
                "updated_at": now,
                **progress_values(result),
            }
            if not transition(session, job_id, LIVE_STATUSES, values, lease_token=lease_token):
                raise RuntimeError(f"job {job_id} changed under a row lock")
            made = record_success(session, job, result, now)  # the checkpoint (+ head promotion) or the artefact
            session.flush()
            outputs: dict[str, Any] = {}
            if isinstance(made, Checkpoint):
                outputs["checkpoint_id"] = made.id
                job_event(
                    session,
                    job_id,
                    EventType.checkpoint_created,
                    attempt=attempt,
                    data={
                        "checkpoint_id": made.id,
                        "round_id": made.round_id,
                        "parent_id": made.parent_id,
                        "step": made.step,
                        "examples": made.examples,
                    },
                    subject_id=made.id,
                )
            elif isinstance(made, FeedbackFile):  # a sampling / labelling job's output
                outputs["feedback_id"] = made.id
                job_event(
                    session,
                    job_id,
                    EventType.feedback_stored,
                    attempt=attempt,
                    subject_id=made.id,
                    data={
                        "feedback_id": made.id,
                        "kind": made.kind,
                        "format": made.format,
                        "sha256": made.sha256,
                        "n_records": made.n_records,
                        "n_train": made.n_train,
                        "n_test": made.n_test,
                    },
                )
            job_event(
                session, job_id, EventType.job_succeeded, attempt=attempt, data={**outputs, **progress_values(result)}
            )
            promote_children(session, job, now)
        elif outcome.status in ("failed", "cancelled"):
            close_attempt(session, job_id, attempt, outcome.status, outcome.error, now)
            status = JobStatus.failed if outcome.status == "failed" else JobStatus.cancelled
            set_terminal(
                session, job, status, outcome.error or (None if status == JobStatus.cancelled else "failed"), now
            )
        else:  # crashed
            close_attempt(session, job_id, attempt, "crashed", outcome.error, now)
            resolve_crash(session, job, outcome.error or "crashed", now, backoff)
        session.commit()
    except Exception:
        session.rollback()
        raise
    return get(session, job_id)


def release(
    session: Session,
    job_id: str,
    lease_token: str,
    reason: str,
    *,
    member_token: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Warm shutdown: running → queued without consuming a retry (cancelling → cancelled).

    The caller has already stopped the training process group. Returns False for a stale token.
    A gang member releases the attempt for all (the others fence on their next heartbeat).
    """
    now = now or db_now(session)
    try:
        job = session.exec(
            select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
        ).one_or_none()
        if member_token is not None:
            gang.end_member(session, member_token, "released", now)
        if job is None or job.lease_token != lease_token or job.status not in LIVE_STATUSES:
            session.commit()
            return False
        close_attempt(session, job_id, job.attempt, "released", reason, now)
        if job.status == JobStatus.cancelling or job.cancel_requested:
            set_terminal(session, job, JobStatus.cancelled, f"cancelled ({reason})", now)
        else:
            transition(
                session,
                job_id,
                LIVE_STATUSES,
                requeued(now),
                lease_token=lease_token,
            )
            job_event(session, job_id, EventType.job_released, attempt=job.attempt, data={"reason": reason})
        session.commit()
        return True
    except Exception:
        session.rollback()
        raise


def request_cancel(session: Session, job_id: str, *, now: datetime | None = None) -> Job:
    """waiting/queued → cancelled; running → cancelling (the runner kills and reports); else unchanged."""
    now = now or db_now(session)
    try:
        job = session.exec(
            select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
        ).one_or_none()
        if job is None:
            raise JobNotFound(job_id)
        if job.status in PENDING_STATUSES:
            if transition(session, job_id, [job.status], {"cancel_requested": True}):
                set_terminal(session, job, JobStatus.cancelled, "cancelled by request", now)
        elif job.status == JobStatus.running:
            if transition(
                session,
                job_id,
                [JobStatus.running],
                {"status": JobStatus.cancelling, "cancel_requested": True, "updated_at": now},
            ):
                job_event(session, job_id, EventType.job_cancelling, attempt=job.attempt)
        session.commit()
    except Exception:
        session.rollback()
        raise
    return get(session, job_id)


def expire_leases(
    session: Session,
    now: datetime | None = None,
    *,
    retry_backoff_s: float | None = None,
    gang_form_timeout_s: float | None = None,
) -> list[str]:
    """running/cancelling jobs whose lease expired: the attempt is closed as crashed, the job is
    queued again (backoff) or failed. So is a multi-node attempt one of whose members' own lease
    expired; a gang still forming past `gang_form_timeout_s` is released (queued, no retry consumed).

    Also resolves any `waiting` job whose parent is already
    terminal (a child inserted while its parent was finishing). Returns the ids it changed.
    """
    now = now or db_now(session)
    backoff = default_backoff() if retry_backoff_s is None else retry_backoff_s
    changed: list[str] = []
    try:
        rows = session.exec(
            select(Job.id, Job.lease_token, Job.lease_expires_at).where(
                col(Job.status).in_(list(LIVE_STATUSES)),
                or_(col(Job.lease_expires_at).is_(None), col(Job.lease_expires_at) < now),
            )
        ).all()
        for job_id, token, expires in rows:
            guard = [or_(col(Job.lease_expires_at).is_(None), col(Job.lease_expires_at) < now)]
            stmt_ok = (
                session.exec(
                    update(Job)
                    .where(
                        col(Job.id) == job_id,
                        col(Job.status).in_(list(LIVE_STATUSES)),
                        *guard,
                        (col(Job.lease_token) == token) if token is not None else col(Job.lease_token).is_(None),
                    )
                    .values(updated_at=now)
                ).rowcount
                == 1
            )
            if not stmt_ok:
                continue
            job = _updated(session, job_id)
            error = f"lease expired at {expires.isoformat() if expires else '?'} (worker lost or stalled)"
            close_attempt(session, job_id, job.attempt, "crashed", error, now)
            resolve_crash(session, job, error, now, backoff)
            changed.append(job_id)
        changed += _expire_gangs(session, now, backoff, gang_form_timeout_s)
        # waiting children whose parent already finished (the parent finished between the API's
        # check and the child's commit)
        stuck = session.exec(select(Job.id, Job.parent_job_id).where(Job.status == JobStatus.waiting)).all()
        for _child_id, parent_id in stuck:
            parent = load(session, parent_id) if parent_id else None
            if parent is None:
                continue
            if parent.status == JobStatus.succeeded:
                changed += promote_children(session, parent, now)
            elif parent.status in FAILED_STATUSES:
                changed += fail_waiting_children(
                    session,
                    parent,
                    parent.error or parent.status.value,
                    now,
                    cancelled=parent.status == JobStatus.cancelled,
                )
        session.commit()
    except Exception:
        session.rollback()
        raise
    return changed


def _expire_gangs(session: Session, now: datetime, backoff: float, form_timeout_s: float | None) -> list[str]:
    changed: list[str] = []
    if form_timeout_s is None:
        from server.settings import get_settings

        form_timeout_s = get_settings().gang_form_timeout_s
    for job_id, attempt in gang.stale_forming(session, now, form_timeout_s):
        job = load(session, job_id)
        rank0 = gang.rank0_of(session, job_id, attempt)
        if job is not None and rank0 is not None and job.attempt == attempt and job.status in LIVE_STATUSES:
            gang.requeue_unformed(session, job, rank0, now)
            changed.append(job_id)
    for member in gang.expired_members(session, now):
        job = load(session, member.job_id)
        if job is None or job.attempt != member.attempt or job.status not in LIVE_STATUSES:
            continue
        error = (
            f"node {member.rank} of {member.size} ({member.host}) lost its lease at"
            f" {member.lease_expires_at.isoformat()} (worker lost or stalled)"
        )
        gang.end_member(session, member.token, "lost", now)
        close_attempt(session, job.id, job.attempt, "crashed", error, now)
        resolve_crash(session, job, error, now, backoff)
        changed.append(job.id)
    return changed


def release_unformed(session: Session, claim: Claim, *, form_timeout_s: float, now: datetime | None = None) -> bool:
    """A member waiting for its gang: release the attempt when the gang is still incomplete past
    its formation deadline (queued again, no retry consumed). True when it did."""
    now = now or db_now(session)
    try:
        gang.lock_formation(session)
        job = load(session, claim.job_id)
        rank0 = gang.rank0_of(session, claim.job_id, claim.attempt)
        if (
            job is None
            or rank0 is None
            or job.attempt != claim.attempt
            or job.lease_token != claim.lease_token
            or job.status not in LIVE_STATUSES
            or rank0.formed_at is not None
            or rank0.joined_at > now - timedelta(seconds=form_timeout_s)
        ):
            session.rollback()
            return False
        gang.requeue_unformed(session, job, rank0, now)
        session.commit()
        return True
    except Exception:
        session.rollback()
        raise


def gang_state(session: Session, claim: Claim) -> GangState | None:
    """A member's view of its gang (None: not a gang member)."""
    if claim.member_token is None:
        return None
    job = load(session, claim.job_id)
    member = session.exec(
        select(GangMember).where(GangMember.token == claim.member_token).execution_options(populate_existing=True)
    ).one_or_none()
    state = gang.state_of(session, job, member)
    session.commit()
    return state


def mark_gang_ready(session: Session, claim: Claim, resume_from: str | None, *, now: datetime | None = None) -> bool:
    """Rank 0 prepared the run directory (and picked the checkpoint every node resumes from)."""
    now = now or db_now(session)
    result = session.exec(
        update(GangMember)
        .where(
            col(GangMember.token) == claim.member_token,
            col(GangMember.rank) == 0,
            col(GangMember.ended_at).is_(None),
        )
        .values(ready_at=now, resume_from=resume_from)
    )
    session.commit()
    return result.rowcount == 1


def leave_gang(session: Session, claim: Claim, outcome: str, *, now: datetime | None = None) -> str | None:
    """A member stops without finishing the attempt: its trainer exited 0 (`done`: the process
    group's rank 0 writes the result on whichever node; node 0's worker reports it) or it was
    stopped otherwise (`lost`: fenced). A member stopped while its attempt still holds the job
    crashes the attempt for all (retried), and so does the last `done` member when no result
    was reported. Returns the job's status when it changed it."""
    if claim.member_token is None:
        return None
    now = now or db_now(session)
    try:
        job = session.exec(
            select(Job).where(Job.id == claim.job_id).with_for_update().execution_options(populate_existing=True)
        ).one_or_none()
        gang.end_member(session, claim.member_token, outcome, now)
        if job is None or job.lease_token != claim.lease_token or job.status not in LIVE_STATUSES:
            session.commit()
            return None
        if outcome != "done":
            # this node's trainer was stopped while the attempt still holds the job (its worker
            # fenced itself): the other nodes cannot go on without it, and must not wait for a
            # collective's timeout to notice
            error = f"node {claim.rank} of {claim.nodes} stopped ({outcome})"
        elif gang.open_members(session, job.id, job.attempt):
            session.commit()
            return None
        else:
            error = "every node of the gang stopped without reporting the round's result"
        close_attempt(session, job.id, job.attempt, "crashed", error, now)
        status = resolve_crash(session, job, error, now, default_backoff())
        session.commit()
        return status
    except Exception:
        session.rollback()
        raise


def claimable_unheld(session: Session, now: datetime | None = None, older_than: float | timedelta = 30.0) -> list[str]:
    """Queued jobs past their backoff that were never published, or published more than
    `older_than` ago and still not claimed (the broker lost or dropped the message).

    A job that has been queued for long (behind long-running jobs) is republished less often:
    every max(older_than, min(age/4, 10 x older_than)), so the duplicates a busy queue collects
    stay bounded while a lost message is still replaced within minutes.
    """
    now = now or db_now(session)
    older = seconds(older_than)
    cutoff = now - timedelta(seconds=older)
    rows = session.exec(
        select(Job.id, Job.published_at, Job.queued_at)
        .where(
            Job.status == JobStatus.queued,
            or_(col(Job.not_before).is_(None), col(Job.not_before) <= now),
            or_(col(Job.published_at).is_(None), col(Job.published_at) <= cutoff),
        )
        .order_by(col(Job.queued_at))
    ).all()
    session.commit()  # end the read transaction without expiring the caller's objects
    due = []
    for job_id, published_at, queued_at in rows:
        if published_at is not None and queued_at is not None:
            age = (now - queued_at).total_seconds()
            interval = max(older, min(age / 4, older * 10))
            if (now - published_at).total_seconds() < interval:
                continue
        due.append(job_id)
    return due


def mark_published(session: Session, job_ids: str | Iterable[str], now: datetime | None = None) -> None:
    now = now or db_now(session)
    ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
    if not ids:
        return
    session.exec(update(Job).where(col(Job.id).in_(ids)).values(published_at=now))
    session.commit()


def unpublished_children(session: Session, parent_job_id: str) -> list[str]:
    """Children promoted by `finish` that still need a publish."""
    ids = session.exec(
        select(Job.id).where(
            Job.parent_job_id == parent_job_id, Job.status == JobStatus.queued, col(Job.published_at).is_(None)
        )
    ).all()
    session.commit()
    return list(ids)


def get(session: Session, job_id: str) -> Job:
    job = reload_and_end(session, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def is_terminal(status: JobStatus | str) -> bool:
    return JobStatus(status) in TERMINAL_STATUSES

"""Multi-node attempts: a round with `hyperparams.nodes` = k > 1 is claimed by k workers together.

    queued ──first worker: open (rank 0, one Attempt row)──▶ running, gang forming (1/k)
           ──next workers: join (ranks 1..k-1)──▶ formed (k/k) ──▶ every node launches its trainer
    forming longer than gang_form_timeout_s ──▶ released: queued again, no retry consumed

One attempt, k `GangMember` rows. Every member holds the attempt's lease token (the job's, so
progress, finish, release and cancel work as for one node) plus its own member token and lease:
each member's heartbeat renews both. Any member's end fails the attempt for all of them: a member
that exits non-zero finishes the attempt as crashed/failed, a member whose lease expires has it
crashed by the sweeper (`expire_members`); the others' next heartbeat answers LOST and they fence
(kill their trainer) and `leave`. The job is queued again as for one node, and its next attempt is
opened only when no member of any earlier attempt still holds a live lease (their trainers are
gone or fenced: attempts never overlap, I2); the retry resumes from the last checkpoint rank 0's
worker picked (`mark_ready`), so every node loads the same one.

All-or-nothing without deadlock: a worker taking any multi-node job first joins the OLDEST gang
still forming (which may be another job's: the task republishes its own job) and opens a new gang
only when none is forming. Formation is serialised (SQLite: BEGIN IMMEDIATE; Postgres: a
transaction-scoped advisory lock), so two gangs competing for the same workers never each hold
half of them: the first fills, the second waits in the queue. A gang that cannot fill (fewer live
workers than nodes) is released after `gang_form_timeout_s`, so no worker waits forever.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, text, update
from sqlmodel import Session, col, select

from halos_client.event_models import EventType
from server.events import job_event
from server.jobs.rows import close_attempt, load, requeued, seconds, transition, trim
from server.jobs.types import Claim
from server.models import LIVE_STATUSES, GangMember, Job, JobStatus

# any constant: the key of the advisory lock that serialises gang formation on Postgres
_FORMATION_LOCK = 0x68616C6F  # "halo"


@dataclass(frozen=True)
class NodeOffer:
    """What a worker brings to a gang: where the others reach it if it opens the gang (rank 0)."""

    address: str
    port: int
    form_timeout_s: float


@dataclass(frozen=True)
class GangState:
    """One member's view of its gang."""

    size: int
    joined: int
    formed: bool
    ready: bool  # rank 0 prepared the run directory and launched: the others may launch
    resume_from: str | None
    live: bool  # the attempt still holds the job and this member has not been ended


def nodes_of(spec: Mapping[str, Any] | None) -> int:
    """The number of nodes a stored job spec asks for (1 for anything but a multi-node round)."""
    if not isinstance(spec, Mapping) or spec.get("kind", "round") != "round":
        return 1
    hp = spec.get("hyperparams")
    try:
        return max(1, int(hp.get("nodes", 1))) if isinstance(hp, dict) else 1
    except (TypeError, ValueError):
        return 1


def lock_formation(session: Session) -> None:
    """Serialise gang formation (SQLite already serialises every writing transaction)."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection().execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _FORMATION_LOCK})


def no_live_members(job_id: str, now: datetime) -> Any:
    """WHERE clause: no member of an earlier attempt of `job_id` still holds a live lease."""
    return ~exists().where(
        col(GangMember.job_id) == job_id,
        col(GangMember.ended_at).is_(None),
        col(GangMember.lease_expires_at) >= now,
    )


def oldest_forming(session: Session, now: datetime, form_timeout_s: float) -> GangMember | None:
    """Rank 0's row of the oldest gang still forming within its deadline, or None."""
    cutoff = now - timedelta(seconds=form_timeout_s)
    return session.exec(
        select(GangMember)
        .join(Job, and_(col(Job.id) == col(GangMember.job_id), col(Job.attempt) == col(GangMember.attempt)))
        .where(
            GangMember.rank == 0,
            col(GangMember.formed_at).is_(None),
            col(GangMember.ended_at).is_(None),
            col(GangMember.joined_at) > cutoff,
            Job.status == JobStatus.running,
            col(Job.cancel_requested).is_(False),
        )
        .order_by(col(GangMember.joined_at), col(GangMember.id))
        .limit(1)
    ).first()


def add_member(
    session: Session,
    job: Job,
    rank: int,
    size: int,
    host: str,
    pid: int | None,
    lease_ttl: float | timedelta,
    now: datetime,
    offer: NodeOffer | None = None,
) -> GangMember:
    member = GangMember(
        job_id=job.id,
        attempt=job.attempt,
        rank=rank,
        size=size,
        token=secrets.token_hex(16),
        host=host[:255],
        pid=pid,
        lease_expires_at=now + timedelta(seconds=seconds(lease_ttl)),
        joined_at=now,
        address=offer.address if offer is not None and rank == 0 else None,
        port=offer.port if offer is not None and rank == 0 else None,
    )
    session.add(member)
    session.flush([member])
    return member


def gang_claim(job: Job, member: GangMember, rank0: GangMember) -> Claim:
    return Claim(
        job_id=job.id,
        attempt=job.attempt,
        lease_token=job.lease_token or "",
        run_dir=job.run_dir,
        spec=dict(job.spec or {}),
        project_id=job.project_id,
        kind=job.kind,
        nodes=member.size,
        rank=member.rank,
        member_token=member.token,
        rendezvous=(rank0.address or "", int(rank0.port or 0)),
    )


def join(
    session: Session, rank0: GangMember, host: str, pid: int | None, lease_ttl: float | timedelta, now: datetime
) -> Claim | None:
    """Take the next rank of the forming gang `rank0` leads (the caller holds the formation lock)."""
    job = load(session, rank0.job_id)
    if job is None or job.status != JobStatus.running or job.attempt != rank0.attempt:
        return None
    joined = session.exec(
        select(func.count())
        .select_from(GangMember)
        .where(GangMember.job_id == job.id, GangMember.attempt == job.attempt)
    ).one()
    if joined >= rank0.size:
        return None
    member = add_member(session, job, joined, rank0.size, host, pid, lease_ttl, now)
    if joined + 1 == rank0.size:
        session.exec(update(GangMember).where(col(GangMember.id) == rank0.id).values(formed_at=now))
        rank0.formed_at = now
    transition(
        session,
        job.id,
        LIVE_STATUSES,
        {"lease_expires_at": now + timedelta(seconds=seconds(lease_ttl)), "updated_at": now},
        lease_token=job.lease_token,
    )
    return gang_claim(job, member, rank0)


def renew(session: Session, member_token: str, lease_ttl: float | timedelta, now: datetime) -> bool:
    """The member's own lease (the caller renews the job's in the same transaction)."""
    result = session.exec(
        update(GangMember)
        .where(col(GangMember.token) == member_token, col(GangMember.ended_at).is_(None))
        .values(lease_expires_at=now + timedelta(seconds=seconds(lease_ttl)))
    )
    return result.rowcount == 1


def end_member(session: Session, member_token: str, outcome: str, now: datetime) -> GangMember | None:
    """End one member (idempotent); returns its row."""
    session.exec(
        update(GangMember)
        .where(col(GangMember.token) == member_token, col(GangMember.ended_at).is_(None))
        .values(ended_at=now, outcome=outcome[:20])
    )
    return session.exec(
        select(GangMember).where(GangMember.token == member_token).execution_options(populate_existing=True)
    ).one_or_none()


def end_attempt_members(session: Session, job_id: str, attempt: int, outcome: str, now: datetime) -> None:
    """End every member of an attempt that never launched anything (a released forming gang)."""
    session.exec(
        update(GangMember)
        .where(
            col(GangMember.job_id) == job_id,
            col(GangMember.attempt) == attempt,
            col(GangMember.ended_at).is_(None),
        )
        .values(ended_at=now, outcome=outcome[:20])
    )


def open_members(session: Session, job_id: str, attempt: int) -> int:
    return session.exec(
        select(func.count())
        .select_from(GangMember)
        .where(
            GangMember.job_id == job_id,
            GangMember.attempt == attempt,
            col(GangMember.ended_at).is_(None),
        )
    ).one()


def rank0_of(session: Session, job_id: str, attempt: int) -> GangMember | None:
    return session.exec(
        select(GangMember)
        .where(GangMember.job_id == job_id, GangMember.attempt == attempt, GangMember.rank == 0)
        .execution_options(populate_existing=True)
    ).one_or_none()


def requeue_unformed(session: Session, job: Job, rank0: GangMember, now: datetime) -> None:
    """Release an attempt whose gang never formed: queued again without consuming a retry."""
    joined = session.exec(
        select(func.count())
        .select_from(GangMember)
        .where(GangMember.job_id == job.id, GangMember.attempt == job.attempt)
    ).one()
    reason = (
        f"gang of {rank0.size} nodes not complete within the formation timeout ({joined} joined): "
        "released without consuming a retry"
    )
    close_attempt(session, job.id, job.attempt, "released", reason, now)
    end_attempt_members(session, job.id, job.attempt, "released", now)
    transition(
        session,
        job.id,
        LIVE_STATUSES,
        {**requeued(now), "error": trim(reason)},
        lease_token=job.lease_token,
    )
    job_event(session, job.id, EventType.job_released, attempt=job.attempt, data={"reason": reason})


def stale_forming(session: Session, now: datetime, form_timeout_s: float) -> list[tuple[str, int]]:
    """(job_id, attempt) of live gangs still forming past their deadline."""
    cutoff = now - timedelta(seconds=form_timeout_s)
    rows = session.exec(
        select(GangMember.job_id, GangMember.attempt)
        .join(Job, and_(col(Job.id) == col(GangMember.job_id), col(Job.attempt) == col(GangMember.attempt)))
        .where(
            GangMember.rank == 0,
            col(GangMember.formed_at).is_(None),
            col(GangMember.ended_at).is_(None),
            col(GangMember.joined_at) <= cutoff,
            col(Job.status).in_(list(LIVE_STATUSES)),
        )
    ).all()
    return [(job_id, attempt) for job_id, attempt in rows]


def expired_members(session: Session, now: datetime) -> list[GangMember]:
    """Members of live attempts whose own lease expired (their worker died or stalled)."""
    return list(
        session.exec(
            select(GangMember)
            .join(Job, and_(col(Job.id) == col(GangMember.job_id), col(Job.attempt) == col(GangMember.attempt)))
            .where(
                col(GangMember.ended_at).is_(None),
                col(GangMember.lease_expires_at) < now,
                col(Job.status).in_(list(LIVE_STATUSES)),
            )
            .order_by(col(GangMember.id))
        ).all()
    )


def state_of(session: Session, job: Job | None, member: GangMember | None) -> GangState | None:
    if job is None or member is None:
        return None
    rank0 = rank0_of(session, member.job_id, member.attempt)
    if rank0 is None:
        return None
    joined = session.exec(
        select(func.count())
        .select_from(GangMember)
        .where(GangMember.job_id == member.job_id, GangMember.attempt == member.attempt)
    ).one()
    return GangState(
        size=rank0.size,
        joined=joined,
        formed=rank0.formed_at is not None,
        ready=rank0.ready_at is not None,
        resume_from=rank0.resume_from,
        live=job.status in LIVE_STATUSES and job.attempt == member.attempt and member.ended_at is None,
    )

"""Multi-node attempts in the database (server/jobs/gang.py): the gang claim is all-or-nothing,
every member holds its own lease, one member's end fails the attempt for all, the next attempt
waits until the previous members are gone, and two gangs competing for the same workers never
each hold half of them. On SQLite and on Postgres (real concurrent claims there)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import Session, SQLModel, col, select

from server import jobs
from server.db import make_engine
from server.jobs import Heartbeat, NodeOffer, Outcome
from server.models import Attempt, GangMember, Job, JobStatus, utcnow
from tests.worker.support import add_round, fresh_pg_database, make_settings, pg_available, reload, seed_run

TTL = 30.0
FORM = 60.0


def _offer(port: int = 29500) -> NodeOffer:
    return NodeOffer(address="10.0.0.1", port=port, form_timeout_s=FORM)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gang.db'}"
        return
    if not pg_available():
        pytest.skip("no Postgres at 127.0.0.1:5432")
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def env(db: str, tmp_path: Path):
    settings = make_settings(tmp_path / "data", database_url=db)
    settings.ensure_dirs()
    engine = make_engine(settings.db_url)
    SQLModel.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as session:
        run = seed_run(session, tmp_path)
        yield session, run, tmp_path, engine
    engine.dispose()


def _gang_round(session: Session, run, tmp: Path, nodes: int = 2) -> Job:
    job = add_round(session, run, tmp, submit=False)
    spec = dict(job.spec)
    spec["hyperparams"] = {**spec["hyperparams"], "nodes": nodes}
    session.exec(update(Job).where(col(Job.id) == job.id).values(spec=spec))
    session.commit()
    return jobs.submit(session, reload(session, job.id), max_attempts=3)


def _claim(session: Session, job_id: str, host: str, now=None, offer: NodeOffer | None = None):
    return jobs.claim(session, job_id, host, 1, TTL, node=offer or _offer(), now=now)


def _members(session: Session, job_id: str) -> list[GangMember]:
    rows = session.exec(
        select(GangMember).where(GangMember.job_id == job_id).order_by(col(GangMember.attempt), col(GangMember.rank))
    ).all()
    session.commit()
    return list(rows)


def test_gang_forms_all_or_nothing_with_a_lease_per_member(env):
    session, run, tmp, _ = env
    job = _gang_round(session, run, tmp, nodes=2)
    # a caller that cannot run a multi-node round (no NodeOffer) does not take it
    assert jobs.claim(session, job.id, "w0", 1, TTL) is None

    a = _claim(session, job.id, "w-a")
    assert a is not None and (a.rank, a.nodes, a.rendezvous) == (0, 2, ("10.0.0.1", 29500)) and a.gang
    state = jobs.gang_state(session, a)
    assert state is not None and (state.joined, state.formed, state.ready, state.live) == (1, False, False, True)

    b = _claim(session, job.id, "w-b", offer=_offer(1))  # its own port is not used: rank 0's is
    assert b is not None and b.job_id == job.id and (b.rank, b.attempt) == (1, a.attempt)
    assert b.lease_token == a.lease_token and b.member_token != a.member_token and b.rendezvous == a.rendezvous
    assert jobs.gang_state(session, a).formed and jobs.gang_state(session, b).formed
    assert _claim(session, job.id, "w-c") is None  # full: a third worker gets nothing
    assert len(_members(session, job.id)) == 2
    assert len(session.exec(select(Attempt).where(Attempt.job_id == job.id)).all()) == 1

    # rank 0 picks the resume point; the others read it
    assert jobs.mark_gang_ready(session, a, "/runs/x/checkpoints/step-000003")
    assert not jobs.mark_gang_ready(session, b, None)  # only rank 0
    sb = jobs.gang_state(session, b)
    assert sb.ready and sb.resume_from == "/runs/x/checkpoints/step-000003"

    # each member renews its own lease; a member whose own lease was ended is LOST
    for c in (a, b):
        assert jobs.heartbeat(session, job.id, c.lease_token, TTL, member_token=c.member_token) == Heartbeat.OK
    assert jobs.heartbeat(session, job.id, a.lease_token, TTL, member_token="not-a-member") == Heartbeat.LOST


def test_one_member_lease_expiring_fails_the_attempt_for_all_and_the_retry_waits_for_the_rest(env):
    session, run, tmp, _ = env
    job = _gang_round(session, run, tmp, nodes=2)
    t0 = utcnow()
    a = _claim(session, job.id, "w-a", now=t0)
    b = _claim(session, job.id, "w-b", now=t0)
    assert a is not None and b is not None
    # w-a keeps beating (its lease and the job's stay live); w-b went silent
    t1 = t0 + timedelta(seconds=TTL + 1)
    assert jobs.heartbeat(session, job.id, a.lease_token, TTL, member_token=a.member_token, now=t1) == Heartbeat.OK
    changed = jobs.expire_leases(session, t1, retry_backoff_s=0, gang_form_timeout_s=FORM)
    assert changed == [job.id]
    j = reload(session, job.id)
    assert j.status == JobStatus.queued and "node 1 of 2 (w-b) lost its lease" in j.error
    (att,) = session.exec(select(Attempt).where(Attempt.job_id == job.id)).all()
    assert att.outcome == "crashed"
    # the survivor learns at its next heartbeat: LOST (it fences its trainer)
    assert jobs.heartbeat(session, job.id, a.lease_token, TTL, member_token=a.member_token, now=t1) == Heartbeat.LOST
    # ... and until it has left (or its own lease expired) no new attempt starts: no overlap (I2)
    assert _claim(session, job.id, "w-c", now=t1) is None
    assert jobs.leave_gang(session, a, "lost", now=t1) is None
    c = _claim(session, job.id, "w-c", now=t1)
    assert c is not None and c.attempt == 2 and c.rank == 0
    assert [(m.attempt, m.rank, m.outcome) for m in _members(session, job.id)] == [
        (1, 0, "lost"),
        (1, 1, "lost"),
        (2, 0, None),
    ]


def test_a_member_failing_fails_the_attempt_for_all(env):
    session, run, tmp, _ = env
    job = _gang_round(session, run, tmp, nodes=2)
    a = _claim(session, job.id, "w-a")
    b = _claim(session, job.id, "w-b")
    jobs.finish(
        session,
        job.id,
        b.lease_token,
        Outcome("crashed", error="a training process was killed by SIGKILL"),
        retry_backoff_s=0,
        member_token=b.member_token,
    )
    assert reload(session, job.id).status == JobStatus.queued
    assert jobs.heartbeat(session, job.id, a.lease_token, TTL, member_token=a.member_token) == Heartbeat.LOST
    # the retry opens a new gang once rank 0 of the failed attempt has left
    assert _claim(session, job.id, "w-c") is None
    jobs.leave_gang(session, a, "lost")
    assert _claim(session, job.id, "w-c").attempt == 2


def test_every_member_leaving_without_a_result_crashes_the_attempt(env):
    session, run, tmp, _ = env
    job = _gang_round(session, run, tmp, nodes=2)
    a = _claim(session, job.id, "w-a")
    b = _claim(session, job.id, "w-b")
    assert jobs.leave_gang(session, b, "done") is None  # rank 0 may still report the result
    assert reload(session, job.id).status == JobStatus.running
    assert jobs.leave_gang(session, a, "done") == "queued"
    assert "without reporting the round's result" in reload(session, job.id).error


def test_a_member_stopped_while_the_attempt_holds_the_job_fails_it_for_all(env):
    """A node whose worker fenced itself (its heartbeats failed) while the others still train:
    the attempt is crashed at once instead of leaving them to a collective's timeout."""
    session, run, tmp, _ = env
    job = _gang_round(session, run, tmp, nodes=2)
    a = _claim(session, job.id, "w-a")
    b = _claim(session, job.id, "w-b")
    assert jobs.leave_gang(session, b, "lost") == "queued"
    assert "node 1 of 2 stopped (lost)" in reload(session, job.id).error
    assert jobs.heartbeat(session, job.id, a.lease_token, TTL, member_token=a.member_token) == Heartbeat.LOST
    assert jobs.leave_gang(session, a, "lost") is None  # the attempt already ended: nothing more


def test_an_incomplete_gang_is_released_after_the_formation_timeout(env):
    session, run, tmp, _ = env
    job = _gang_round(session, run, tmp, nodes=3)
    t0 = utcnow()
    a = _claim(session, job.id, "w-a", now=t0)
    b = _claim(session, job.id, "w-b", now=t0)
    assert a is not None and b is not None and not jobs.gang_state(session, a).formed
    assert not jobs.release_unformed(session, a, form_timeout_s=FORM, now=t0 + timedelta(seconds=1))
    late = t0 + timedelta(seconds=FORM + 1)
    assert jobs.release_unformed(session, b, form_timeout_s=FORM, now=late)
    j = reload(session, job.id)
    assert j.status == JobStatus.queued and j.not_before is None and "2 joined" in j.error
    assert {m.outcome for m in _members(session, job.id)} == {"released"}
    assert jobs.heartbeat(session, job.id, a.lease_token, TTL, member_token=a.member_token) == Heartbeat.LOST
    (att,) = session.exec(select(Attempt).where(Attempt.job_id == job.id)).all()
    assert att.outcome == "released"  # no retry consumed
    # the sweeper does the same for a gang whose members all died while it was forming
    c = _claim(session, job.id, "w-c", now=late)
    assert c is not None and c.attempt == 2
    assert jobs.expire_leases(session, late + timedelta(seconds=FORM + 1), gang_form_timeout_s=FORM) == [job.id]
    assert reload(session, job.id).status == JobStatus.queued


def test_two_gangs_competing_for_two_workers_do_not_deadlock(env):
    """Workers w1 and w2 take the messages of gangs A and B (2 nodes each) at the same moment:
    the first opens A, the second joins A instead of opening B; A forms, B stays queued."""
    session, run, tmp, _ = env
    a_job = _gang_round(session, run, tmp, nodes=2)
    b_job = _gang_round(session, run, tmp, nodes=2)
    first = _claim(session, a_job.id, "w1")
    second = _claim(session, b_job.id, "w2")
    assert first is not None and second is not None
    assert first.job_id == second.job_id == a_job.id and {first.rank, second.rank} == {0, 1}
    assert jobs.gang_state(session, first).formed
    assert reload(session, b_job.id).status == JobStatus.queued and _members(session, b_job.id) == []


def test_concurrent_gang_claims_form_whole_gangs(env):
    """8 threads (8 workers) claim 4 two-node gangs' messages at once (on Postgres: really
    concurrent transactions): every gang that starts is complete, no rank is taken twice and no
    worker is left holding half of a gang."""
    session, run, tmp, engine = env
    gangs = [_gang_round(session, run, tmp, nodes=2) for _ in range(4)]
    barrier = threading.Barrier(8)
    claims: list = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with Session(engine, expire_on_commit=False) as s:
            barrier.wait()
            c = jobs.claim(s, gangs[i % 4].id, f"w{i}", i, TTL, node=_offer())
            with lock:
                claims.append(c)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(claims) == 8
    per_job: dict[str, list[int]] = {}
    for c in claims:
        if c is not None:
            per_job.setdefault(c.job_id, []).append(c.rank)
    assert per_job
    sizes = []
    for g in gangs:
        members = _members(session, g.id)
        assert sorted(m.rank for m in members) == sorted(per_job.get(g.id, [])) == list(range(len(members)))
        assert reload(session, g.id).status == (JobStatus.running if members else JobStatus.queued)
        sizes.append(len(members))
    # whole gangs, and at most one still forming (it waits for more workers or its timeout)
    assert sizes.count(1) <= 1 and 2 in sizes, sizes

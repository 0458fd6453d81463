"""server/jobs.py: every transition (legal and illegal), leases, retries, lineage, concurrent claims."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import Session, SQLModel, select

from halos_core.round_result import RoundResult
from server import jobs
from server.db import make_engine
from server.jobs import Heartbeat, Outcome
from server.models import Attempt, Checkpoint, Job, JobStatus, MetricPoint, Round, utcnow
from tests.worker.support import (
    add_round,
    attempts,
    fresh_pg_database,
    make_settings,
    overlapping_attempts,
    pg_available,
    reload,
    seed_run,
)

TTL = 30.0


@pytest.fixture
def env(tmp_path: Path):
    settings = make_settings(tmp_path / "data")
    settings.ensure_dirs()
    engine = make_engine(settings.db_url)
    SQLModel.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as session:
        run = seed_run(session, tmp_path)
        yield session, run, tmp_path
    engine.dispose()


def _claim(session: Session, job_id: str, now=None):
    return jobs.claim(session, job_id, "host-a", 123, TTL, now=now)


def _final(tmp: Path, name: str) -> RoundResult:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    return RoundResult(
        job_id="job_x",
        final_dir=str(d),
        manifest_sha256="ab" * 32,
        step=10,
        examples=40,
        round_step=10,
        total_steps=10,
        loss="dpo",
        reference_sha256="cd" * 32,
    )


# --------------------------------------------------------------------------- submit / claim


def test_submit_and_claim_is_exclusive(env):
    session, run, tmp = env
    job = add_round(session, run, tmp)
    assert reload(session, job.id).status == JobStatus.queued
    assert job.queued_at is not None and job.max_attempts == 3

    c = _claim(session, job.id)
    assert c is not None and c.attempt == 1 and c.lease_token and c.spec["reference_path"]
    assert _claim(session, job.id) is None  # duplicate delivery
    j = reload(session, job.id)
    assert j.status == JobStatus.running and j.lease_token == c.lease_token and j.lease_expires_at > utcnow()
    rows = attempts(session, job.id)
    assert [(a.attempt, a.lease_token, a.host, a.pid, a.ended_at) for a in rows] == [
        (1, c.lease_token, "host-a", 123, None)
    ]


def test_claim_unknown_terminal_and_cancelled_jobs_is_none(env):
    session, run, tmp = env
    assert _claim(session, "job_nope") is None
    job = add_round(session, run, tmp)
    jobs.request_cancel(session, job.id)
    assert reload(session, job.id).status == JobStatus.cancelled
    assert _claim(session, job.id) is None


def test_heartbeat_ok_cancel_lost(env):
    session, run, tmp = env
    job = add_round(session, run, tmp)
    c = _claim(session, job.id)
    before = reload(session, job.id).lease_expires_at
    time.sleep(0.01)
    assert jobs.heartbeat(session, job.id, c.lease_token, TTL) == Heartbeat.OK
    assert reload(session, job.id).lease_expires_at > before
    assert jobs.heartbeat(session, job.id, "not-mine", TTL) == Heartbeat.LOST
    j = jobs.request_cancel(session, job.id)
    assert j.status == JobStatus.cancelling and j.cancel_requested
    assert jobs.heartbeat(session, job.id, c.lease_token, TTL) == Heartbeat.CANCEL
    done = jobs.finish(session, job.id, c.lease_token, Outcome("cancelled", error="cancelled by request"))
    assert done.status == JobStatus.cancelled and done.finished_at and done.lease_token is None
    assert jobs.heartbeat(session, job.id, c.lease_token, TTL) == Heartbeat.LOST
    assert attempts(session, job.id)[0].outcome == "cancelled"


def test_record_progress(env):
    session, run, tmp = env
    job = add_round(session, run, tmp)
    c = _claim(session, job.id)
    jobs.record_progress(
        session,
        job.id,
        c.lease_token,
        [
            {"step": 1, "round_step": 1, "total_steps": 4, "examples": 8, "loss": 0.7},
            {"step": 2, "round_step": 2, "total_steps": 4, "examples": 16, "loss": 0.6},
            {"step": 2, "split": "eval", "loss": 0.65},
        ],
    )
    j = reload(session, job.id)
    assert (j.step, j.round_step, j.total_steps, j.examples) == (2, 2, 4, 16)
    assert j.latest_metrics["loss"] == 0.6
    points = session.exec(select(MetricPoint).where(MetricPoint.job_id == job.id).order_by(MetricPoint.id)).all()
    assert [(p.step, p.split, p.attempt) for p in points] == [(1, "train", 1), (2, "train", 1), (2, "eval", 1)]
    jobs.record_progress(session, job.id, "stale", [{"step": 99}])  # ignored
    assert reload(session, job.id).step == 2


def _nan_and_nul_scenario(session: Session, run, tmp: Path) -> None:
    """Reviewer's t_nan_pg / t_nul_pg: an fp16 overflow step's `grad_norm: Infinity` (json.loads
    of metrics.jsonl) and NUL bytes in a trainer's log tail."""
    job = add_round(session, run, tmp)
    c = _claim(session, job.id)
    lines = [
        '{"step": 1, "round_step": 1, "loss": 0.7, "grad_norm": Infinity}',
        '{"step": 2, "round_step": 2, "loss": NaN, "grad_norm": 1.0, "nested": {"x": [-Infinity, 1.5]}}',
        '{"step": 3, "round_step": 3, "loss": 0.5, "grad_norm": -Infinity, "note": "a\\u0000b"}',
    ]
    jobs.record_progress(session, job.id, c.lease_token, [json.loads(line) for line in lines])
    points = session.exec(select(MetricPoint).where(MetricPoint.job_id == job.id).order_by(MetricPoint.step)).all()
    session.commit()
    assert [p.step for p in points] == [1, 2, 3]
    assert points[0].data["grad_norm"] is None and points[1].data["loss"] is None
    assert points[1].data["nested"] == {"x": [None, 1.5]} and points[2].data["note"] == "ab"
    j = reload(session, job.id)
    assert j.step == 3 and j.latest_metrics["grad_norm"] is None
    tail = b"\0\0\0\0".decode("utf-8", "replace")
    done = jobs.finish(
        session,
        job.id,
        c.lease_token,
        Outcome("failed", error="training exited with code 1: " + tail + "RuntimeError: boom"),
    )
    assert done.status == JobStatus.failed and done.error == "training exited with code 1: RuntimeError: boom"
    assert attempts(session, job.id)[0].error == done.error


def test_non_finite_metrics_and_nul_error_text(env):
    session, run, tmp = env
    _nan_and_nul_scenario(session, run, tmp)


@pytest.mark.skipif(not pg_available(), reason="no Postgres")
def test_non_finite_metrics_and_nul_error_text_postgres(tmp_path: Path):
    with fresh_pg_database() as url:
        engine = make_engine(url)
        SQLModel.metadata.create_all(engine)
        try:
            with Session(engine, expire_on_commit=False) as session:
                _nan_and_nul_scenario(session, seed_run(session, tmp_path), tmp_path)
        finally:
            engine.dispose()


# --------------------------------------------------------------------------- finish and lineage


def test_success_registers_checkpoint_and_promotes_children(env):
    session, run, tmp = env
    j1 = add_round(session, run, tmp)
    j2 = add_round(session, run, tmp, parent=j1)
    j3 = add_round(session, run, tmp, parent=j2)
    assert reload(session, j2.id).status == JobStatus.waiting
    assert reload(session, j3.id).status == JobStatus.waiting
    assert _claim(session, j2.id) is None  # waiting is not claimable

    c = _claim(session, j1.id)
    done = jobs.finish(session, j1.id, c.lease_token, Outcome("succeeded", result=_final(tmp, "final1")))
    assert done.status == JobStatus.succeeded and done.step == 10 and done.examples == 40
    r1 = session.exec(select(Round).where(Round.job_id == j1.id)).one()
    session.refresh(r1)
    ckpt = session.get(Checkpoint, r1.checkpoint_id)
    assert ckpt.path == str(tmp / "final1") and ckpt.parent_id is None and ckpt.model_id == run.model_id
    assert (ckpt.step, ckpt.examples, ckpt.run_id, ckpt.job_id) == (10, 40, run.id, j1.id)
    assert attempts(session, j1.id)[0].outcome == "succeeded"

    child = reload(session, j2.id)
    assert child.status == JobStatus.queued and child.queued_at is not None
    assert child.spec["init_from"] == ckpt.path and child.spec["init_from_checkpoint_id"] == ckpt.id
    assert child.spec["counters"] == {"step": 10, "examples": 40}
    r2 = session.exec(select(Round).where(Round.job_id == j2.id)).one()
    session.refresh(r2)
    assert r2.parent_checkpoint_id == ckpt.id
    assert jobs.unpublished_children(session, j1.id) == [j2.id]
    assert reload(session, j3.id).status == JobStatus.waiting  # still waits for round 2

    c2 = _claim(session, j2.id)
    jobs.finish(session, j2.id, c2.lease_token, Outcome("succeeded", result=_final(tmp, "final2")))
    r2 = session.exec(select(Round).where(Round.job_id == j2.id)).one()
    session.refresh(r2)
    assert session.get(Checkpoint, r2.checkpoint_id).parent_id == ckpt.id  # lineage
    assert reload(session, j3.id).status == JobStatus.queued


def test_submit_after_parent_finished(env):
    session, run, tmp = env
    j1 = add_round(session, run, tmp)
    c = _claim(session, j1.id)
    jobs.finish(session, j1.id, c.lease_token, Outcome("succeeded", result=_final(tmp, "f1")))
    j2 = add_round(session, run, tmp, parent=j1)  # the API saw it unfinished a moment ago
    j2 = reload(session, j2.id)
    assert j2.status == JobStatus.queued and j2.spec["init_from"] == str(tmp / "f1")

    j3 = add_round(session, run, tmp)
    c3 = _claim(session, j3.id)
    jobs.finish(session, j3.id, c3.lease_token, Outcome("failed", error="boom"))
    j4 = add_round(session, run, tmp, parent=j3)
    j4 = reload(session, j4.id)
    assert j4.status == JobStatus.failed and "failed: boom" in j4.error


def test_failure_and_cancel_fail_waiting_children(env):
    session, run, tmp = env
    j1 = add_round(session, run, tmp)
    j2 = add_round(session, run, tmp, parent=j1)
    j3 = add_round(session, run, tmp, parent=j2)
    c = _claim(session, j1.id)
    done = jobs.finish(session, j1.id, c.lease_token, Outcome("failed", error="ValueError: bad batch"))
    assert done.status == JobStatus.failed and done.error == "ValueError: bad batch"
    e2 = reload(session, j2.id)
    assert e2.status == JobStatus.failed
    assert e2.error == f"parent round 1 (job {j1.id}) failed: ValueError: bad batch"
    e3 = reload(session, j3.id)
    assert e3.status == JobStatus.failed and e3.error.startswith(f"parent round 2 (job {j2.id}) failed: parent round 1")

    k1 = add_round(session, run, tmp)
    k2 = add_round(session, run, tmp, parent=k1)
    assert jobs.request_cancel(session, k1.id).status == JobStatus.cancelled  # queued → cancelled
    assert reload(session, k2.id).status == JobStatus.failed
    assert reload(session, k2.id).error == f"parent round 4 was cancelled (job {k1.id})"

    # a running parent cancelled by request: its child says so (not "failed: cancelled by request")
    m1 = add_round(session, run, tmp)
    m2 = add_round(session, run, tmp, parent=m1)
    m3 = add_round(session, run, tmp, parent=m2)
    c = _claim(session, m1.id)
    assert jobs.request_cancel(session, m1.id).status == JobStatus.cancelling
    jobs.finish(session, m1.id, c.lease_token, Outcome("cancelled", error="cancelled by request"))
    assert reload(session, m2.id).error == f"parent round 6 was cancelled (job {m1.id})"
    assert (
        reload(session, m3.id).error
        == f"parent round 7 (job {m2.id}) failed: parent round 6 was cancelled (job {m1.id})"
    )
    m4 = add_round(session, run, tmp, parent=m1)  # submitted after the cancel
    assert reload(session, m4.id).error == f"parent round 6 was cancelled (job {m1.id})"
    with pytest.raises(jobs.ParentFailed) as refused:
        jobs.submit(session, Job(project_id=run.project_id, spec={}, parent_job_id=m1.id), refuse_failed_parent=True)
    assert refused.value.status == "cancelled"


def test_illegal_transitions_change_nothing(env):
    session, run, tmp = env
    job = add_round(session, run, tmp)
    # finish / release / heartbeat without a lease
    assert (
        jobs.finish(session, job.id, "nope", Outcome("succeeded", result=_final(tmp, "f0"))).status == JobStatus.queued
    )
    assert jobs.release(session, job.id, "nope", "x") is False
    assert jobs.heartbeat(session, job.id, "nope", TTL) == Heartbeat.LOST
    c = _claim(session, job.id)
    # a stale token cannot finish a running job
    assert jobs.finish(session, job.id, "stale", Outcome("failed", error="x")).status == JobStatus.running
    jobs.finish(session, job.id, c.lease_token, Outcome("succeeded", result=_final(tmp, "f")))
    # terminal is terminal
    for outcome in ("failed", "crashed", "cancelled", "succeeded"):
        late = Outcome(outcome, error="late", result=_final(tmp, "late") if outcome == "succeeded" else None)
        assert jobs.finish(session, job.id, c.lease_token, late).status == JobStatus.succeeded
    assert jobs.request_cancel(session, job.id).status == JobStatus.succeeded
    assert jobs.release(session, job.id, c.lease_token, "late") is False
    assert _claim(session, job.id) is None
    assert jobs.expire_leases(session, utcnow() + timedelta(days=1)) == []
    assert len(attempts(session, job.id)) == 1
    with pytest.raises(ValueError):
        Outcome("weird")
    with pytest.raises(jobs.JobNotFound):
        jobs.request_cancel(session, "job_missing")


# --------------------------------------------------------------------------- crashes, leases, release


def test_expired_lease_retries_with_backoff_then_fails(env):
    """Q6 at the state-machine level: crash → retry with doubling backoff → failed, no loop."""
    session, run, tmp = env
    job = add_round(session, run, tmp)
    t = utcnow()
    backoff = 10.0
    for n in (1, 2, 3):
        c = _claim(session, job.id, now=t)
        assert c is not None and c.attempt == n
        t = t + timedelta(seconds=TTL + 1)  # the lease runs out
        changed = jobs.expire_leases(session, t, retry_backoff_s=backoff)
        assert changed == [job.id]
        j = reload(session, job.id)
        if n < 3:
            delay = backoff * 2 ** (n - 1)
            assert j.status == JobStatus.queued and j.lease_token is None
            assert abs((j.not_before - t).total_seconds() - delay) < 0.01
            assert _claim(session, job.id, now=t + timedelta(seconds=delay - 1)) is None  # in backoff
            assert jobs.claimable_unheld(session, t, 0) == []
            t = t + timedelta(seconds=delay)
            assert jobs.claimable_unheld(session, t, 0) == [job.id]
        else:
            assert j.status == JobStatus.failed
            assert j.error.startswith("crashed 3 times: lease expired")
    assert _claim(session, job.id, now=t + timedelta(days=1)) is None
    rows = attempts(session, job.id)
    assert [a.outcome for a in rows] == ["crashed"] * 3 and overlapping_attempts(rows) == 0


def test_crash_outcome_retries_and_release_keeps_the_budget(env):
    session, run, tmp = env
    job = add_round(session, run, tmp)
    c = _claim(session, job.id)
    j = jobs.finish(session, job.id, c.lease_token, Outcome("crashed", error="killed by SIGKILL"), retry_backoff_s=0)
    assert j.status == JobStatus.queued and "attempt 1 crashed: killed by SIGKILL" in j.error
    for _ in range(4):  # releases (warm shutdowns) never use up the retries
        c = _claim(session, job.id)
        assert jobs.release(session, job.id, c.lease_token, "worker shutting down") is True
        assert reload(session, job.id).status == JobStatus.queued
    c = _claim(session, job.id)
    assert c.attempt == 6
    j = jobs.finish(session, job.id, c.lease_token, Outcome("crashed", error="again"), retry_backoff_s=0)
    assert j.status == JobStatus.queued
    c = _claim(session, job.id)
    j = jobs.finish(session, job.id, c.lease_token, Outcome("crashed", error="third"), retry_backoff_s=0)
    assert j.status == JobStatus.failed and j.error == "crashed 3 times: third"
    rows = attempts(session, job.id)
    assert [a.outcome for a in rows] == ["crashed"] + ["released"] * 4 + ["crashed", "crashed"]
    assert all(a.ended_at is not None for a in rows) and overlapping_attempts(rows) == 0


def test_cancel_running_then_crash_or_release_is_cancelled(env):
    session, run, tmp = env
    a = add_round(session, run, tmp)
    c = _claim(session, a.id)
    jobs.request_cancel(session, a.id)
    assert jobs.request_cancel(session, a.id).status == JobStatus.cancelling  # idempotent
    jobs.expire_leases(session, utcnow() + timedelta(seconds=TTL + 1))
    assert reload(session, a.id).status == JobStatus.cancelled  # a cancelled job is never retried

    b = add_round(session, run, tmp)
    c = _claim(session, b.id)
    jobs.request_cancel(session, b.id)
    assert jobs.release(session, b.id, c.lease_token, "worker shutting down")
    assert reload(session, b.id).status == JobStatus.cancelled


def test_waiting_child_of_a_finished_parent_is_resolved_by_the_sweep(env):
    """A child committed as `waiting` just after its parent finished (the race submit guards
    against on Postgres with FOR UPDATE) is promoted by expire_leases."""
    session, run, tmp = env
    p = add_round(session, run, tmp)
    c = _claim(session, p.id)
    jobs.finish(session, p.id, c.lease_token, Outcome("succeeded", result=_final(tmp, "fp")))
    child = add_round(session, run, tmp, parent=p, submit=False)
    session.exec(update(Job).where(Job.id == child.id).values(status=JobStatus.waiting))
    session.commit()
    assert child.id in jobs.expire_leases(session, utcnow())
    j = reload(session, child.id)
    assert j.status == JobStatus.queued and j.spec["init_from"] == str(tmp / "fp")


def test_claimable_unheld(env):
    session, run, tmp = env
    now = utcnow()
    fresh = add_round(session, run, tmp)
    published = add_round(session, run, tmp)
    old = add_round(session, run, tmp)
    backoff = add_round(session, run, tmp)
    jobs.mark_published(session, [published.id], now)
    jobs.mark_published(session, [old.id], now - timedelta(seconds=60))
    session.exec(update(Job).where(Job.id == backoff.id).values(not_before=now + timedelta(seconds=30)))
    session.commit()
    assert set(jobs.claimable_unheld(session, now, 30)) == {fresh.id, old.id}


# --------------------------------------------------------------------------- Q7: concurrent claimers

N_JOBS = 500


def _insert_queued(engine, n: int) -> list[str]:
    with Session(engine) as session:
        run = seed_run(session, Path("/tmp"))
        ids = []
        now = utcnow()
        for _ in range(n):
            job = Job(project_id=run.project_id, status=JobStatus.queued, spec={}, queued_at=now)
            session.add(job)
            ids.append(job.id)
        session.commit()
    return ids


def _claimer(url: str, ids: list[str], seed: int, out) -> None:
    engine = make_engine(url)
    order = list(ids)
    random.Random(seed).shuffle(order)
    claimed, errors = [], []
    with Session(engine) as session:
        for job_id in order:
            try:
                c = jobs.claim(session, job_id, f"claimer-{seed}", seed, TTL)
                if c is not None:
                    claimed.append(job_id)
            except Exception as exc:
                session.rollback()
                errors.append(repr(exc)[:200])
    engine.dispose()
    out.put((claimed, errors))


def _check_claims(engine, ids: list[str], results: list) -> None:
    claimed = [j for r in results for j in r[0]]
    errors = [e for r in results for e in r[1]]
    locked = [e for e in errors if "locked" in e]
    print(
        f"\nQ7: {len(ids)} jobs, {len(results)} claimers, {len(claimed)} claims, "
        f"{len(claimed) - len(set(claimed))} duplicates, {len(errors)} errors ({len(locked)} 'database is locked')"
    )
    assert not errors and not locked
    assert sorted(claimed) == sorted(ids)  # every job claimed exactly once
    with Session(engine) as session:
        rows = session.exec(select(Attempt)).all()
        assert len(rows) == len(ids) and len({r.job_id for r in rows}) == len(ids)
        claimed_jobs = session.exec(select(Job).where(Job.id.in_(ids))).all()
        assert all(j.status == JobStatus.running and j.attempt == 1 for j in claimed_jobs)


def test_q7_concurrent_claims_sqlite_processes(tmp_path: Path):
    settings = make_settings(tmp_path / "data")
    settings.ensure_dirs()
    engine = make_engine(settings.db_url)
    SQLModel.metadata.create_all(engine)
    ids = _insert_queued(engine, N_JOBS)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(settings.db_url, ids, seed, out)) for seed in range(4)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    print(f"SQLite: {time.monotonic() - t0:.1f}s", end="")
    _check_claims(engine, ids, results)
    engine.dispose()


@pytest.mark.postgres
def test_q7_concurrent_claims_postgres_threads_and_processes(tmp_path: Path):
    if not pg_available():
        pytest.skip("PostgreSQL not reachable")
    with fresh_pg_database() as url:
        engine = make_engine(url)
        SQLModel.metadata.create_all(engine)
        ids = _insert_queued(engine, N_JOBS)
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        procs = [ctx.Process(target=_claimer, args=(url, ids, seed, out)) for seed in range(2)]
        import queue as _q

        tout: _q.Queue = _q.Queue()
        threads = [threading.Thread(target=_claimer, args=(url, ids, 100 + i, tout)) for i in range(4)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for t in threads:
            t.start()
        results = [out.get(timeout=300) for _ in procs] + [tout.get(timeout=300) for _ in threads]
        for p in procs:
            p.join(timeout=60)
        for t in threads:
            t.join(timeout=60)
        print(f"Postgres: {time.monotonic() - t0:.1f}s", end="")
        _check_claims(engine, ids, results)
        engine.dispose()


# --------------------------------------------------------------------------- the sweeper


def test_sweep_once_expires_leases_and_republishes(env):
    import sqlite3

    from server import queue, sweeper
    from tests.worker.support import make_settings as _ms

    session, run, tmp = env
    settings = _ms(tmp / "data", retry_backoff_s=0.0, republish_after_s=30.0)
    lost = add_round(session, run, tmp)
    c = _claim(session, lost.id)
    never_published = add_round(session, run, tmp)
    report = sweeper.sweep_once(session, settings, utcnow() + timedelta(seconds=TTL + 1))
    assert report.expired == [lost.id]
    assert set(report.republished) == {lost.id, never_published.id}
    assert reload(session, never_published.id).published_at is not None
    broker = sqlite3.connect(settings.data_dir / "broker.db")
    payloads = [row[0] for row in broker.execute("SELECT payload FROM kombu_message")]
    assert sum(lost.id in p for p in payloads) == 1 and sum(never_published.id in p for p in payloads) == 1
    # published just now: not again on the next pass
    assert sweeper.sweep_once(session, settings).republished == []
    assert jobs.heartbeat(session, lost.id, c.lease_token, TTL) == Heartbeat.LOST
    # delivered messages are pruned from the embedded broker after an hour
    broker.execute("UPDATE kombu_message SET visible = 0, timestamp = '2000-01-01 00:00:00.000000'")
    broker.commit()
    assert queue.prune_embedded_broker(settings) == 2
    queue.reset()


def test_long_queued_jobs_are_republished_less_often(env):
    session, run, tmp = env
    now = utcnow()
    job = add_round(session, run, tmp)
    session.exec(
        update(Job)
        .where(Job.id == job.id)
        .values(queued_at=now - timedelta(hours=2), published_at=now - timedelta(seconds=60))
    )
    session.commit()
    assert jobs.claimable_unheld(session, now, 30) == []  # next publish after 10 x 30 s
    session.exec(update(Job).where(Job.id == job.id).values(published_at=now - timedelta(seconds=301)))
    session.commit()
    assert jobs.claimable_unheld(session, now, 30) == [job.id]


# --------------------------------------------------------------------------- clock skew (libfaketime)

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")  # Debian's `libfaketime`
_SKEWED_WORKER = """
import sys
from server import jobs
from server.db import make_engine
from sqlmodel import Session
with Session(make_engine(sys.argv[1]), expire_on_commit=False) as session:
    claim = jobs.claim(session, sys.argv[2], "skewed-host", 1, float(sys.argv[3]))
    assert claim is not None
    assert jobs.heartbeat(session, claim.job_id, claim.lease_token, float(sys.argv[3])) == jobs.Heartbeat.OK
"""


@pytest.mark.skipif(not pg_available(), reason="no Postgres")
@pytest.mark.skipif(not LIBFAKETIME.exists(), reason=f"needs libfaketime ({LIBFAKETIME}; apt-get install libfaketime)")
@pytest.mark.parametrize("skew", ["-120s", "+120s"])
def test_a_worker_with_a_skewed_clock_holds_a_lease_of_the_right_length(tmp_path: Path, skew: str):
    """A worker whose clock is 2 min behind used to stamp a lease that had already expired for the
    sweeper on a correct host (the live job re-queued: run twice); 2 min ahead, a dead worker's job
    stayed held 2 min too long. Leases are stamped by the database's clock (server.db.db_now): a
    real worker process whose clock libfaketime shifts claims and renews, and the lease ends one TTL
    after the database's now."""
    ttl = 30.0
    with fresh_pg_database() as url:
        engine = make_engine(url)
        SQLModel.metadata.create_all(engine)
        try:
            with Session(engine, expire_on_commit=False) as session:
                job = add_round(session, seed_run(session, tmp_path), tmp_path)
            env = {**os.environ, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": skew, "DONT_FAKE_MONOTONIC": "1"}
            env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
            seen = subprocess.run(
                [sys.executable, "-c", "import datetime; print(datetime.datetime.now(datetime.UTC).timestamp())"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            assert abs(float(seen.stdout) - time.time() - float(skew[:-1])) < 10  # the clock really is shifted
            subprocess.run(
                [sys.executable, "-c", _SKEWED_WORKER, url, job.id, str(ttl)], env=env, check=True, timeout=120
            )
            with Session(engine, expire_on_commit=False) as session:
                assert jobs.expire_leases(session) == []  # the sweeper, on this (correct) clock
                j = reload(session, job.id)
                left = (j.lease_expires_at - utcnow()).total_seconds()
                assert j.status == JobStatus.running and ttl - 20 < left <= ttl + 1, left
        finally:
            engine.dispose()

"""Real processes, embedded mode: `halos worker` (Celery, solo pool) on the SQLite broker, the real
runner launching the fake trainer through the real `accelerate launch`, short lease timings.

Fault tests print: trials, recovery time, jobs lost, duplicate (overlapping) attempts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from sqlmodel import select

from halos_core.run_dir import RunDir, read_manifest
from server import jobs, queue
from server.models import Checkpoint, JobStatus, MetricPoint, Round
from tests.worker.conftest import Env
from tests.worker.support import (
    TERMINAL,
    WorkerProc,
    add_round,
    attempts,
    overlapping_attempts,
    pid_alive,
    reload,
    trainer_starts,
    wait_for,
    wait_status,
)
from worker.monitor import find_orphans

pytestmark = pytest.mark.e2e


def report(name: str, **figures) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _run_dir(env: Env, job_id: str) -> Path:
    return env.settings.runs_dir / job_id


def _no_orphans(env: Env, job_id: str) -> None:
    pids = [s["pid"] for s in trainer_starts(_run_dir(env, job_id))]
    gc = _run_dir(env, job_id) / "grandchildren.json"
    if gc.exists():
        pids += json.loads(gc.read_text())
    alive = [p for p in pids if pid_alive(p)]
    assert not alive, f"processes still alive: {alive}"
    assert find_orphans(env.settings) == {}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    env = Env(tmp_path_factory.mktemp("shared"))
    worker = WorkerProc(env.settings, env.root / "worker.log").wait_ready()
    yield env, worker
    worker.stop()
    env.close()


# --------------------------------------------------------------------------- the happy path


def test_two_rounds_succeed_with_metrics_checkpoint_and_lineage(shared):
    env, worker = shared
    s = env.session
    r1 = add_round(s, env.run, env.root, {"steps": 6, "sleep": 0.15})
    r2 = add_round(s, env.run, env.root, {"steps": 4, "sleep": 0.15}, parent=r1)
    assert reload(s, r2.id).status == JobStatus.waiting
    t0 = time.monotonic()
    queue.publish(r1.id, env.settings)
    j1 = wait_status(s, r1.id, TERMINAL, 60)
    assert j1.status == JobStatus.succeeded, j1.error
    j2 = wait_status(s, r2.id, TERMINAL, 60)  # promoted and published by the worker
    assert j2.status == JobStatus.succeeded, j2.error
    elapsed = time.monotonic() - t0

    # metrics streamed into the DB
    points = s.exec(select(MetricPoint).where(MetricPoint.job_id == r1.id).order_by(MetricPoint.step)).all()
    assert [p.step for p in points] == [1, 2, 3, 4, 5, 6]
    assert (j1.step, j1.examples, j1.latest_metrics["round_step"]) == (6, 6, 6)
    # final checkpoint registered, verifiable, chained
    rnd1 = s.exec(select(Round).where(Round.job_id == r1.id)).one()
    rnd2 = s.exec(select(Round).where(Round.job_id == r2.id)).one()
    c1, c2 = s.get(Checkpoint, rnd1.checkpoint_id), s.get(Checkpoint, rnd2.checkpoint_id)
    s.commit()
    assert c1.path == str((_run_dir(env, r1.id) / "final").resolve())
    assert read_manifest(c1.path).sha256 == c1.manifest_sha256 and c1.step == 6
    assert c2.parent_id == c1.id and rnd2.parent_checkpoint_id == c1.id and c2.model_id == env.run.model_id
    assert j2.spec["init_from"] == c1.path and (c2.step, c2.examples) == (10, 10)  # counters carried on
    assert trainer_starts(_run_dir(env, r2.id))[0]["init_from"] == c1.path
    # run dir contract
    rd = RunDir(_run_dir(env, r1.id))
    assert rd.read_config().job_id == r1.id and rd.accelerate_yaml.exists()
    assert [a.outcome for a in attempts(s, r1.id)] == ["succeeded"]
    _no_orphans(env, r1.id)
    report("success", jobs=2, seconds=f"{elapsed:.1f}")


def test_trainer_error_is_failed_with_traceback_tail(shared):
    env, _ = shared
    s = env.session
    job = add_round(s, env.run, env.root, {"steps": 5, "sleep": 0.05, "mode": "fail", "at": 2})
    queue.publish(job.id, env.settings)
    j = wait_status(s, job.id, TERMINAL, 60)
    assert j.status == JobStatus.failed
    assert j.error.startswith("training exited with code 1: ValueError: fake trainer failure at step 2")
    assert "Traceback" in j.error
    assert [a.outcome for a in attempts(s, job.id)] == ["failed"]  # a deterministic error is not retried


def test_exit_zero_without_result_is_crashed_and_retried(shared):
    env, _ = shared
    s = env.session
    job = add_round(s, env.run, env.root, {"steps": 5, "sleep": 0.05, "mode": "exit0", "at": 2})
    jobs_max = 2
    from sqlalchemy import update

    from server.models import Job

    s.exec(update(Job).where(Job.id == job.id).values(max_attempts=jobs_max))
    s.commit()
    queue.publish(job.id, env.settings)
    j = wait_status(s, job.id, TERMINAL, 90)
    assert j.status == JobStatus.failed and j.error == "crashed 2 times: exited 0 without writing result.json"


# --------------------------------------------------------------------------- Q4, Q5, Q6


def test_q4_commit_without_publish_runs_within_the_sweeper_period(shared):
    env, _ = shared
    s = env.session
    t0 = time.monotonic()
    job = add_round(s, env.run, env.root, {"steps": 2, "sleep": 0.05})  # committed, never published
    assert reload(s, job.id).published_at is None
    wait_for(lambda: attempts(s, job.id), 30, what="claim")
    recovery = time.monotonic() - t0
    j = wait_status(s, job.id, TERMINAL, 60)
    assert j.status == JobStatus.succeeded
    assert recovery <= env.settings.sweep_interval_s + 3.0
    report(
        "Q4",
        trials=1,
        recovery_s=f"{recovery:.1f}",
        jobs_lost=0,
        duplicate_attempts=overlapping_attempts(attempts(s, job.id)) + len(attempts(s, job.id)) - 1,
    )


def test_q5_cancel_kills_grandchildren_within_grace(shared):
    env, _ = shared
    s = env.session
    job = add_round(s, env.run, env.root, {"steps": 200, "sleep": 0.2, "mode": "grandchildren"})
    queue.publish(job.id, env.settings)
    gc_file = _run_dir(env, job.id) / "grandchildren.json"
    wait_for(gc_file.exists, 60, what="grandchildren")
    start = trainer_starts(_run_dir(env, job.id))[0]
    pids = [start["pid"], *json.loads(gc_file.read_text())]
    assert all(pid_alive(p) for p in pids)
    t0 = time.monotonic()
    assert jobs.request_cancel(s, job.id).status == JobStatus.cancelling
    wait_for(
        lambda: not any(pid_alive(p) for p in pids),
        env.settings.kill_grace_s + 5,
        interval=0.05,
        what="all descendants gone",
    )
    gone = time.monotonic() - t0
    j = wait_status(s, job.id, TERMINAL, 30)
    assert j.status == JobStatus.cancelled
    # the SIGTERM-ignoring grandchild needed the SIGKILL after the grace period
    assert gone <= env.settings.heartbeat_interval_s + env.settings.kill_grace_s + 2.0
    assert [a.outcome for a in attempts(s, job.id)] == ["cancelled"]
    _no_orphans(env, job.id)
    report(
        "Q5",
        trials=1,
        descendants=len(pids),
        all_gone_after_s=f"{gone:.1f}",
        grace_s=env.settings.kill_grace_s,
        jobs_lost=0,
    )


def test_q6_trainer_always_killed_fails_after_max_attempts(shared):
    env, _ = shared
    s = env.session
    job = add_round(s, env.run, env.root, {"steps": 10, "sleep": 0.05, "mode": "sigkill", "at": 2})
    t0 = time.monotonic()
    queue.publish(job.id, env.settings)
    j = wait_status(s, job.id, TERMINAL, 120)
    elapsed = time.monotonic() - t0
    rows = attempts(s, job.id)
    assert j.status == JobStatus.failed
    assert j.error == "crashed 3 times: a training process was killed by SIGKILL (out of memory?)"
    assert [a.outcome for a in rows] == ["crashed"] * 3 and overlapping_attempts(rows) == 0
    time.sleep(env.settings.sweep_interval_s * 2)
    assert len(attempts(s, job.id)) == 3 and reload(s, job.id).status == JobStatus.failed  # no loop
    _no_orphans(env, job.id)
    report(
        "Q6",
        trials=1,
        attempts=len(rows),
        seconds_to_failed=f"{elapsed:.1f}",
        jobs_lost=0,
        duplicate_attempts=overlapping_attempts(rows),
    )


# --------------------------------------------------------------------------- Q1: SIGKILL the worker


def _first_checkpoint(env: Env, job_id: str, min_step: int = 2) -> int:
    rd = RunDir(_run_dir(env, job_id))

    def ready():
        m = rd.latest_checkpoint() if rd.checkpoints.is_dir() else None
        return m.step if m is not None and m.step >= min_step else None

    return wait_for(ready, 60, interval=0.1, what="a complete checkpoint")


def test_q1_sigkill_worker_mid_job_resumes_on_restarted_worker(make_env):
    trials, recoveries, lost, dups = 2, [], 0, 0
    for trial in range(trials):
        env = make_env(f"q1-{trial}")
        s = env.session
        w1 = WorkerProc(env.settings, env.root / "w1.log").wait_ready()
        # trial 1: the trainer also has grandchildren, one in a session of its own (like torchrun ranks)
        fake = {"steps": 14, "sleep": 0.25, "checkpoint_every": 2, "mode": "grandchildren" if trial else "ok"}
        job = add_round(s, env.run, env.root, fake)
        queue.publish(job.id, env.settings)
        ckpt_step = _first_checkpoint(env, job.id, min_step=2 + 2 * trial)
        first = trainer_starts(_run_dir(env, job.id))[0]
        gc_file = _run_dir(env, job.id) / "grandchildren.json"
        doomed = [first["pid"], first["pgid"], *(json.loads(gc_file.read_text()) if trial else [])]
        t_kill = time.monotonic()
        w1.kill(signal.SIGKILL)  # the worker process and its runner (solo pool: one process)
        w1.stop()
        # its watchdog stops every process of the orphaned attempt within the grace period (I6)
        wait_for(
            lambda: not any(pid_alive(p) for p in doomed),
            env.settings.kill_grace_s + 3,
            interval=0.05,
            what="orphaned trainer gone",
        )
        orphan_gone = time.monotonic() - t_kill
        assert find_orphans(env.settings) == {}
        w2 = WorkerProc(env.settings, env.root / "w2.log").wait_ready()
        try:
            wait_for(lambda: len(attempts(s, job.id)) >= 2, 60, what="second attempt")
            recovery = time.monotonic() - t_kill
            j = wait_status(s, job.id, TERMINAL, 90)
        finally:
            w2.stop()
        rows = attempts(s, job.id)
        assert j.status == JobStatus.succeeded, j.error
        assert [a.outcome for a in rows] == ["crashed", "succeeded"]
        assert rows[0].error.startswith("lease expired")
        assert rows[1].resumed_from_step is not None and rows[1].resumed_from_step >= ckpt_step  # I3
        starts = trainer_starts(_run_dir(env, job.id))
        assert len(starts) == 2 and starts[1]["overlap"] == [] and starts[1]["resume_round_step"] >= ckpt_step
        assert overlapping_attempts(rows) == 0  # I2
        steps = [p.step for p in s.exec(select(MetricPoint).where(MetricPoint.job_id == job.id)).all()]
        s.commit()
        assert max(steps) == 14 and j.step == 14
        _no_orphans(env, job.id)
        recoveries.append(recovery)
        dups += overlapping_attempts(rows)
        report(
            f"Q1 trial {trial}",
            processes_killed=len(doomed) - 1,
            killed_after_ckpt_step=ckpt_step,
            resumed_from=rows[1].resumed_from_step,
            orphan_gone_s=f"{orphan_gone:.1f}",
            recovery_s=f"{recovery:.1f}",
        )
    report(
        "Q1",
        trials=trials,
        recovery_s=" / ".join(f"{r:.1f}" for r in recoveries),
        jobs_lost=lost,
        duplicate_attempts=dups,
    )


# --------------------------------------------------------------------------- Q8: warm shutdown


def test_q8_sigterm_worker_releases_and_another_worker_resumes(make_env):
    env = make_env("q8")
    s = env.session
    wa = WorkerProc(env.settings, env.root / "wa.log").wait_ready()
    wb = WorkerProc(env.settings, env.root / "wb.log").wait_ready()
    workers = {wa.pid: wa, wb.pid: wb}
    try:
        job = add_round(s, env.run, env.root, {"steps": 14, "sleep": 0.25, "checkpoint_every": 2})
        queue.publish(job.id, env.settings)
        ckpt_step = _first_checkpoint(env, job.id, min_step=4)
        holder = attempts(s, job.id)[0].pid
        other = next(p for p in workers if p != holder)
        first = trainer_starts(_run_dir(env, job.id))[0]
        t_term = time.monotonic()
        os.kill(holder, signal.SIGTERM)
        rc = workers[holder].proc.wait(timeout=env.settings.kill_grace_s + 20)
        assert rc == 0, workers[holder].log_tail()
        assert not pid_alive(first["pid"])
        wait_for(lambda: len(attempts(s, job.id)) >= 2, 60, what="second attempt")
        recovery = time.monotonic() - t_term
        j = wait_status(s, job.id, TERMINAL, 90)
        if j.status == JobStatus.succeeded:
            # issue 12: the worker removes a succeeded round's intermediate checkpoints after its finish
            rd = RunDir(_run_dir(env, job.id))
            wait_for(lambda: not rd.checkpoints.exists(), 20, what="intermediate checkpoints removed")
            assert read_manifest(rd.final).step == j.step  # the final checkpoint stays
    finally:
        wa.stop()
        wb.stop()
    rows = attempts(s, job.id)
    assert j.status == JobStatus.succeeded, j.error
    assert [a.outcome for a in rows] == ["released", "succeeded"]
    assert rows[1].pid == other and rows[1].resumed_from_step >= ckpt_step
    assert overlapping_attempts(rows) == 0
    starts = trainer_starts(_run_dir(env, job.id))
    assert len(starts) == 2 and starts[1]["overlap"] == []
    assert j.error is None or "crash" not in j.error  # the release consumed no retry
    _no_orphans(env, job.id)
    report(
        "Q8",
        trials=1,
        released_after_ckpt_step=ckpt_step,
        resumed_from=rows[1].resumed_from_step,
        recovery_s=f"{recovery:.1f}",
        jobs_lost=0,
        duplicate_attempts=overlapping_attempts(rows),
    )


def test_worker_concurrency_two_runs_jobs_side_by_side(make_env):
    env = make_env("conc")
    s = env.session
    w = WorkerProc(env.settings, env.root / "w.log", concurrency=2).wait_ready()
    try:
        ids = [add_round(s, env.run, env.root, {"steps": 10, "sleep": 0.3}).id for _ in range(2)]
        for job_id in ids:
            queue.publish(job_id, env.settings)
        final = [wait_status(s, job_id, TERMINAL, 90) for job_id in ids]
    finally:
        w.stop()
    assert [j.status for j in final] == [JobStatus.succeeded] * 2
    a, b = (attempts(s, job_id)[0] for job_id in ids)
    assert a.started_at < b.ended_at and b.started_at < a.ended_at  # they overlapped: two slots
    assert a.pid == b.pid == w.pid

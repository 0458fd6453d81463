"""The lease keeper (worker/lease.py) and what the task does around the runner (worker/tasks.py):
the lease is renewed while the worker hashes checkpoints outside the training's lifetime, the
fence fires on its own timer while a database call hangs, setup errors end the job at once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import update

import halos_core.run_dir as rd
from halos_core.run_dir import RunDir, write_manifest
from server import jobs, sweeper
from server.db import session_scope
from server.models import Job, JobStatus
from tests.worker.support import REPO, add_round, attempts, pid_alive, reload, trainer_starts, wait_for
from worker import tasks


@pytest.fixture(autouse=True)
def _pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the launched fake trainer is under tests/


class Sweeper:
    """The sweeper's loop in a thread (expire leases, no publishing)."""

    def __init__(self, settings, every: float = 0.2):
        self.settings, self.every = settings, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            with session_scope(self.settings) as session:
                sweeper.sweep_once(session, self.settings, publish=False)
            self.stop.wait(self.every)

    def __enter__(self) -> Sweeper:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)


def _slow_hashing(monkeypatch, seconds: float) -> Counter:
    """Hashing in THIS (runner) process takes `seconds` per file (stands in for tens of GB)."""
    calls: Counter = Counter()
    real = rd.sha256_file

    def slow(path, chunk=1 << 20):
        calls[str(Path(path).resolve())] += 1
        time.sleep(seconds)
        return real(path, chunk)

    monkeypatch.setattr(rd, "sha256_file", slow)
    return calls


def test_lease_is_renewed_while_final_is_hashed_after_the_exit(make_env, monkeypatch):
    """Reviewer's repro_verify: final/ verification (exit_codes.classify) used to run with no
    heartbeat: the lease expired, a succeeded training became crash → retry → … → failed."""
    env = make_env("verify", lease_ttl_s=4.0, heartbeat_interval_s=0.25, retry_backoff_s=0.1)
    job = add_round(env.session, env.run, env.root, {"steps": 2, "sleep": 0.05, "checkpoint_every": 100})
    _slow_hashing(monkeypatch, 2.4)  # final/ has 2 files: 4.8 s of hashing > the 4 s lease
    with Sweeper(env.settings):
        assert tasks.execute(job.id, env.settings) == "succeeded"
    j = reload(env.session, job.id)
    assert j.status == JobStatus.succeeded and j.attempt == 1, j.error
    assert [a.outcome for a in attempts(env.session, job.id)] == ["succeeded"]


def test_retry_verifies_intermediate_checkpoints_once_under_a_live_lease(make_env, monkeypatch):
    """Before a retry the runner cleans partial checkpoints (hashing every complete one) and picks
    the latest: under the keeper's lease, and every file is hashed once, not twice."""
    env = make_env("retry", lease_ttl_s=4.0, heartbeat_interval_s=0.25, retry_backoff_s=0.0)
    job = add_round(env.session, env.run, env.root, {"steps": 6, "sleep": 0.01})
    run = RunDir(env.settings.runs_dir / job.id).create()
    for step in (2, 4):
        d = run.checkpoint_path(step)
        d.mkdir()
        (d / "model.safetensors").write_text(str(step))
        (d / "optimizer.pt").write_text(str(step))
        write_manifest(d, step, step, round_step=step)
    c1 = jobs.claim(env.session, job.id, "h", 1, env.settings.lease_ttl_s, run_dir=str(run.path))
    jobs.finish(env.session, job.id, c1.lease_token, jobs.Outcome("crashed", error="test"), retry_backoff_s=0)
    calls = _slow_hashing(monkeypatch, 1.2)  # 4 checkpoint files: 4.8 s > the 4 s lease
    with Sweeper(env.settings):
        assert tasks.execute(job.id, env.settings) == "succeeded"
    ckpt_calls = {p: n for p, n in calls.items() if "/checkpoints/" in p}
    assert len(ckpt_calls) == 4 and set(ckpt_calls.values()) == {1}, ckpt_calls
    assert trainer_starts(run.path)[0]["resume_round_step"] == 4
    assert [a.outcome for a in attempts(env.session, job.id)] == ["crashed", "succeeded"]


def test_fence_fires_while_database_calls_hang(make_env, monkeypatch):
    """Reviewer's repro_fence: a heartbeat (and a metrics write) blocked like a TCP read to an
    unreachable database host used to block the in-loop fence check; the sweeper re-queued the job
    and a 2nd attempt could start while the 1st trainer still ran. The keeper's fence is its own
    timer: the trainer dies 3/4 of the lease TTL after the last successful heartbeat."""
    # The TTL leaves room for a loaded 2-core CI box: with 2 s, heartbeats stalled 1.5 s by load
    # alone fenced the attempt before its trainer started, and the test waited for a start in vain.
    env = make_env("fence", lease_ttl_s=6.0, heartbeat_interval_s=0.25, retry_backoff_s=0.0)
    job = add_round(env.session, env.run, env.root, {"steps": 200, "sleep": 0.1, "checkpoint_every": 1000})
    release, hang = threading.Event(), threading.Event()
    real_hb, real_rp = jobs.heartbeat, jobs.record_progress
    hung = {}

    def heartbeat(*a, **kw):
        if hang.is_set():  # once the trainer runs, the next heartbeat hangs
            hung.setdefault("since", time.monotonic())
            release.wait(20)
            raise OSError("connection timed out")
        return real_hb(*a, **kw)

    def record_progress(*a, **kw):
        if "since" in hung:
            release.wait(20)
            raise OSError("connection timed out")
        return real_rp(*a, **kw)

    monkeypatch.setattr(jobs, "heartbeat", heartbeat)
    monkeypatch.setattr(jobs, "record_progress", record_progress)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("status", tasks.execute(job.id, env.settings)))
    thread.start()
    try:
        run_dir = env.settings.runs_dir / job.id
        start = wait_for(lambda: trainer_starts(run_dir), 60, what="trainer start")[0]
        hang.set()
        wait_for(lambda: "since" in hung, 10, interval=0.05, what="the hanging heartbeat")
        wait_for(lambda: not pid_alive(start["pid"]), env.settings.lease_ttl_s, interval=0.05, what="trainer fenced")
        fenced_after = time.monotonic() - hung["since"]
        assert fenced_after < env.settings.lease_ttl_s  # before the lease can expire
        time.sleep(env.settings.lease_ttl_s)  # the lease expires; the sweeper re-queues the job
        with session_scope(env.settings) as session:
            sweeper.sweep_once(session, env.settings, publish=False)
        with session_scope(env.settings) as session:
            second = jobs.claim(session, job.id, "B", 2, env.settings.lease_ttl_s)
        assert second is not None and second.attempt == 2
        assert not pid_alive(start["pid"])  # no overlap with the new attempt (I2)
    finally:
        release.set()
        thread.join(30)
    assert box["status"] == "lost"
    print(f"\n[fence] heartbeat hung -> trainer killed after {fenced_after:.2f}s (lease {env.settings.lease_ttl_s}s)")


def test_bad_python_executable_fails_the_job_at_once(make_env):
    """Reviewer's repro_popen: Popen raising in the runner left the job running until its lease
    expired, with a misleading "lease expired" reason, and burnt every retry."""
    env = make_env("popen", python_executable="/nonexistent/bin/python3.11")
    job = add_round(env.session, env.run, env.root, {"steps": 2})
    assert tasks.execute(job.id, env.settings) == "failed"
    j = reload(env.session, job.id)
    assert j.status == JobStatus.failed and j.attempt == 1
    assert j.error.startswith("worker error: cannot start the trainer with '/nonexistent/bin/python3.11'"), j.error
    assert "lease expired" not in j.error


def test_transient_setup_errors_crash_and_retry_at_once(make_env, monkeypatch):
    """ENOSPC writing run.json (or any OSError / bug before the launch): crashed now, retried."""
    import errno

    env = make_env("enospc", retry_backoff_s=0.0)
    job = add_round(env.session, env.run, env.root, {"steps": 2})

    def full(self, config):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunDir, "write_config", full)
    assert tasks.execute(job.id, env.settings) == "queued"
    j = reload(env.session, job.id)
    assert "worker error: OSError: [Errno 28] No space left on device" in j.error
    assert [a.outcome for a in attempts(env.session, job.id)] == ["crashed"]

    def broken(*a, **kw):
        raise RuntimeError("reaping failed")

    monkeypatch.setattr("worker.runner.reap_orphans", broken)
    assert tasks.execute(job.id, env.settings) == "queued"
    assert "worker error: RuntimeError: reaping failed" in reload(env.session, job.id).error
    monkeypatch.undo()
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert tasks.execute(job.id, env.settings) == "succeeded"


def test_worker_rechecks_the_submit_time_checks_against_its_own_settings(make_env):
    """The API checked the round against ITS HALOS_NUM_PROCESSES / HALOS_FSDP; a worker configured
    otherwise fails the round at claim time with the same reason instead of launching it."""
    env = make_env("mismatch", num_processes=2)
    job = add_round(env.session, env.run, env.root, {"steps": 2})  # batch_size 1, microbatch 1
    assert tasks.execute(job.id, env.settings) == "failed"
    j = reload(env.session, job.id)
    assert j.error.startswith(
        "this worker cannot run the round: batch_size 1 is not divisible by microbatch_size 1 x num_processes 2"
    ), j.error
    assert "HALOS_NUM_PROCESSES=2" in j.error and j.attempt == 1
    assert trainer_starts(env.settings.runs_dir / job.id) == []

    fsdp = make_env("fsdp", fsdp=True)
    job = add_round(fsdp.session, fsdp.run, fsdp.root, {"steps": 2})
    spec = {**job.spec, "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj"]}}
    fsdp.session.exec(update(Job).where(Job.id == job.id).values(spec=spec))
    fsdp.session.commit()
    assert tasks.execute(job.id, fsdp.settings) == "failed"
    j = reload(fsdp.session, job.id)
    assert (
        j.error == "this worker cannot run the round: LoRA runs are not supported with FSDP workers (HALOS_FSDP=true);"
        " use DDP or full fine-tuning"
    )
    assert trainer_starts(fsdp.settings.runs_dir / job.id) == []


def test_compose_shares_the_submit_time_settings_between_api_and_workers():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name in ("api", "worker"):
        environment = compose["services"][name]["environment"]
        assert environment["HALOS_NUM_PROCESSES"] == compose["x-halos-env"]["HALOS_NUM_PROCESSES"]
        assert environment["HALOS_FSDP"] == compose["x-halos-env"]["HALOS_FSDP"]


def test_survivors_of_a_self_exited_trainer_block_finish(make_env, monkeypatch):
    """The launcher exited by itself but processes of its attempt survive SIGKILL: the task does
    not finish (the next attempt or round would start beside them); the lease expires instead."""
    env = make_env("survivors", lease_ttl_s=4.0, heartbeat_interval_s=0.25, retry_backoff_s=0.0)
    job = add_round(env.session, env.run, env.root, {"steps": 2, "sleep": 0.05})
    import worker.monitor as monitor

    real = monitor.job_processes
    monkeypatch.setattr(
        monitor, "job_processes", lambda pgid, marker=None: real(pgid, marker) or {999_999_999}
    )  # an unkillable leftover
    monkeypatch.setattr(monitor, "kill_group", lambda *a, **kw: False)
    assert tasks.execute(job.id, env.settings) == "group-survived"
    j = reload(env.session, job.id)
    assert j.status == JobStatus.running and attempts(env.session, job.id)[0].outcome is None
    time.sleep(env.settings.lease_ttl_s + 0.2)  # nobody renews the lease any more
    with session_scope(env.settings) as session:
        assert sweeper.sweep_once(session, env.settings, publish=False).expired == [job.id]
    j = reload(env.session, job.id)
    assert j.status == JobStatus.queued and "lease expired" in j.error

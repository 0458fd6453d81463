"""docs/RELIABILITY.md Q1 with the REAL trainer: `halos serve` (embedded: SQLite + embedded broker, its own
`halos worker` child and sweeper), a DPO round on the tiny model through the real trainer
(`python -m halos_core.train`: one process, no launcher), SIGKILL of the worker (solo pool: the worker process IS
the runner) once the round's first intermediate checkpoint is complete.

The serve process does not restart its worker child, so a replacement `halos worker` is started.
Asserted: the job ends `succeeded` (I1) with exactly 2 attempts that do not overlap (I2), the
second resumed from >= the checkpoint seen before the kill (I3), every process of attempt 1
(trainer — and its launcher when several ranks train —, watchdog) is gone within the kill grace
(I6), and the training is exactly that of an uninterrupted launch of the same run.json: per-step
losses (run dir and API) and bit-identical final weights and Adam state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlmodel import Session

from halos_core.job_spec import RunConfig
from halos_core.run_dir import RunDir
from halos_core.synthetic import pairwise_records, to_jsonl_bytes
from server.db import make_engine
from tests.e2e.conftest import embedded_deployment
from tests.worker.support import attempts, overlapping_attempts
from worker.monitor import ENV_ATTEMPT, ENV_JOB
from worker.watchdog import proc_stat, read_environ

pytestmark = pytest.mark.e2e

EVERY = 4
STEPS = 40
HYPERPARAMS = {
    "lr": 1e-3,
    "batch_size": 8,
    "microbatch_size": 4,
    "warmup_steps": 6,
    "max_length": 64,
    "max_prompt_length": 32,
    "checkpoint_every": EVERY,
    "seed": 1,
}
FAST = {  # short recovery timings (the defaults are 60/5/10/30 s)
    "HALOS_LEASE_TTL_S": "3",
    "HALOS_HEARTBEAT_INTERVAL_S": "0.5",
    "HALOS_SWEEP_INTERVAL_S": "0.5",
    "HALOS_KILL_GRACE_S": "2",
    "HALOS_RETRY_BACKOFF_S": "0.2",
    "HALOS_REPUBLISH_AFTER_S": "1",
    "HALOS_MAX_ATTEMPTS": "3",
}


def fast_embedded_deployment(data_dir: Path):
    """`embedded_deployment` with the short lease/heartbeat/sweep settings."""
    return embedded_deployment(data_dir, FAST)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _live(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _children(ppid: int) -> list[int]:
    return [p for p in _pids() if (st := proc_stat(p)) is not None and st[1] == ppid and st[0] not in ("Z", "X")]


def _attempt_processes(job_id: str, attempt: int) -> set[int]:
    """Every live process carrying the attempt's environment markers (launcher, ranks)."""
    found = set()
    for pid in _pids():
        env = read_environ(pid)
        if env.get(ENV_JOB) == job_id and env.get(ENV_ATTEMPT) == str(attempt) and _live(pid):
            found.add(pid)
    return found


def _watchdogs_of(runner_pid: int) -> set[int]:
    return {
        p
        for p in _pids()
        if (c := _cmdline(p))[1:3] == ["-m", "worker.watchdog"] and c[3] == str(runner_pid) and _live(p)
    }


def _wait(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _train_lines(rd: RunDir) -> list[dict]:
    return [m for m in rd.read_metrics()[0] if m.get("split") != "eval"]


def _by_step(lines: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for m in lines:  # after a resume the log repeats steps: the later line wins
        out[m["step"]] = m
    return out


def test_q1_real_trainer_sigkill_worker_after_checkpoint(tmp_path, tiny_model_dir):
    with fast_embedded_deployment(tmp_path / "data") as dep:
        client = dep.client()
        serve = dep.procs[0]
        worker_pid = _wait(
            lambda: next((p for p in _children(serve.pid) if "worker" in _cmdline(p)), None),
            30,
            "the `halos worker` child of `halos serve`",
        )
        model = client.post("/v1/models", json={"name": "tiny", "path": str(tiny_model_dir)}).json()
        run = client.post(
            "/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo", "beta": 0.1}, "hyperparams": HYPERPARAMS}
        ).json()
        body = to_jsonl_bytes(pairwise_records(STEPS * HYPERPARAMS["batch_size"], seed=3))
        fb = client.post("/v1/feedback", content=body, headers={"Content-Type": "application/x-ndjson"})
        assert fb.status_code == 201, fb.text
        r = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb.json()["id"]]})
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        rd = RunDir(dep.data_dir / "runs" / job_id)
        engine = make_engine(f"sqlite:///{(dep.data_dir / 'halos.db').resolve()}")
        session = Session(engine, expire_on_commit=False)
        try:
            # ---- attempt 1 runs in the worker child. Its monitor ingests metrics.jsonl once per
            # heartbeat; a kill can land at any point of that cycle. Pin the worst case instead of
            # leaving it to chance: freeze the runner (SIGSTOP) at the first metrics line, so the
            # lines written up to the checkpoint are never ingested by attempt 1, and SIGKILL it
            # once the first intermediate checkpoint is complete (well within the 3 s lease).
            _wait(
                lambda: _train_lines(rd) if rd.metrics_jsonl.is_file() else None, 120, "the first step", interval=0.01
            )
            os.kill(worker_pid, signal.SIGSTOP)
            ckpt = _wait(
                lambda: (m := rd.latest_checkpoint() if rd.checkpoints.is_dir() else None) and m,
                120,
                "the first complete intermediate checkpoint",
                interval=0.02,
            )
            doomed = _attempt_processes(job_id, 1) | _watchdogs_of(worker_pid)
            config1 = RunConfig.model_validate_json(rd.run_json.read_text())
            rows = attempts(session, job_id)
            assert len(rows) == 1 and rows[0].pid == worker_pid  # the runner is the worker process (solo pool)
            # the trainer (one process: run directly, no launcher) and its watchdog
            assert config1.resume_from is None and len(doomed) >= 2
            t_kill = time.monotonic()
            os.kill(worker_pid, signal.SIGKILL)
            killed_at = _train_lines(rd)[-1]["step"]
            assert killed_at < STEPS and rd.read_result() is None

            # the serve process does not restart its worker: start a replacement (same env)
            dep.spawn("worker", "--no-sweeper", log_name="worker2.log")

            # ---- meanwhile, the uninterrupted reference: the same run.json, launched the same way
            base = RunDir(tmp_path / "uninterrupted").create()
            base.write_config(
                config1.model_copy(
                    update={"run_dir": str(base.path), "reference_cache_dir": str(tmp_path / "refcache")}
                )
            )
            base.accelerate_yaml.write_text(rd.accelerate_yaml.read_text())
            with open(base.path / "launch.log", "wb") as log:
                baseline = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "accelerate.commands.launch",
                        "--config_file",
                        str(base.accelerate_yaml),
                        "-m",
                        "halos_core.train",
                        "--config",
                        str(base.run_json),
                    ],
                    cwd=base.path,
                    env=dep.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

            # ---- I6: the watchdog stops every process of attempt 1 within the grace period
            _wait(lambda: not any(_live(p) for p in doomed), 2 + 5, "attempt 1's processes gone")
            orphans_gone = time.monotonic() - t_kill
            pre_kill = _train_lines(rd)  # attempt 1 may have run a few more steps before the watchdog struck
            ckpt_before_retry = max(m.step for m in rd.complete_checkpoints())

            # ---- recovery: lease expires, sweeper requeues, the replacement claims and resumes
            def running_again():
                job = client.get(f"/v1/jobs/{job_id}").json()
                return job if job["attempt"] >= 2 and job["status"] in ("running", "succeeded") else None

            _wait(running_again, 60, "the job running again (attempt 2)", interval=0.1)
            t_running = time.monotonic() - t_kill
            deadline = time.monotonic() + 180
            while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
            t_done = time.monotonic() - t_kill
            assert job["status"] == "succeeded", (job, dep.logs())
            assert job["attempt"] == 2 and job["progress"]["step"] == STEPS

            rows = attempts(session, job_id)
            assert [a.outcome for a in rows] == ["crashed", "succeeded"], [(a.outcome, a.error) for a in rows]
            assert rows[0].error.startswith("lease expired")
            assert rows[0].ended_at is not None and rows[0].ended_at <= rows[1].started_at  # I2
            assert overlapping_attempts(rows) == 0
            assert rows[1].pid != worker_pid
            assert rows[1].resumed_from_step is not None and rows[1].resumed_from_step >= ckpt.step  # I3
            assert rows[1].resumed_from_step == ckpt_before_retry  # the latest complete one
            assert not _attempt_processes(job_id, 1) and not _watchdogs_of(worker_pid)  # I6, still
            assert not _live(worker_pid)

            # ---- the resumed training equals the uninterrupted one
            assert baseline.wait(timeout=180) == 0, (base.path / "launch.log").read_text()[-3000:]
            a = _by_step(_train_lines(base))
            lines = _train_lines(rd)
            after = lines[len(pre_kill) :]
            resumed = rows[1].resumed_from_step
            assert [m["step"] for m in after] == list(range(resumed + 1, STEPS + 1))
            b = _by_step(lines)
            assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
            keys = ("loss", "lr", "grad_norm", "examples", "rewards/chosen", "rewards/rejected")
            for m in pre_kill:  # what attempt 1 logged, up to the kill
                assert all(m[k] == a[m["step"]][k] for k in keys), m["step"]
            for s in a:  # the run dir after the retry (later lines win)
                assert all(b[s][k] == a[s][k] for k in keys), s
            # the API series: one point per step, the latest attempt's (equal to the reference)
            api = {
                p["step"]: p
                for p in client.get(f"/v1/jobs/{job_id}/metrics", params={"split": "train"}).json()["items"]
            }
            assert all(p["data"]["loss"] == a[s]["loss"] for s, p in api.items())
            assert all(api[s]["attempt"] == 2 for s in range(resumed + 1, STEPS + 1))  # attempt 2 recorded all it ran
            # steps up to the resume point were run by attempt 1; lines its monitor had not yet
            # recorded when it was killed are backfilled from metrics.jsonl by attempt 2's runner
            assert all(p["attempt"] in (1, 2) for s, p in api.items() if s <= resumed)
            missing_in_api = sorted(set(range(1, STEPS + 1)) - set(api))
            assert missing_in_api == [], f"steps {missing_in_api} never reached the database"

            result = rd.read_result()
            assert result.resumed.optimizer_step == resumed and result.step == STEPS
            wa, wb = load_file(str(base.final / "model.safetensors")), load_file(str(rd.final / "model.safetensors"))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
            oa = torch.load(base.final / "optimizer.pt", weights_only=True)
            ob = torch.load(rd.final / "optimizer.pt", weights_only=True)
            for idx in oa["state"]:
                assert int(ob["state"][idx]["step"]) == STEPS
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(oa["state"][idx][k], ob["state"][idx][k]), (idx, k)
        finally:
            session.close()
            engine.dispose()
            if "baseline" in locals() and baseline.poll() is None:
                os.killpg(baseline.pid, signal.SIGKILL)
        print(
            f"\n[Q1 real trainer] killed worker {worker_pid} after checkpoint step {ckpt.step} "
            f"(training at step {killed_at}); attempt 1 processes gone after {orphans_gone:.1f}s; "
            f"resumed from step {resumed}; recovery: kill→running {t_running:.1f}s, kill→succeeded {t_done:.1f}s; "
            f"jobs lost={int(job['status'] != 'succeeded')}, duplicate attempts={overlapping_attempts(rows)}; "
            f"API metric steps missing={missing_in_api}"
        )

"""T1 through a real kill: the trainer launched as the worker launches it
(`accelerate launch --config_file accelerate.yaml -m halos_core.train --config run.json`, own
session), SIGKILLed (whole process group) after its step-N checkpoint, then relaunched with
`resume_from` = the latest complete checkpoint, equals an uninterrupted 2N-step launch: the same
loss / lr / grad norm at every step, bit-identical final weights and Adam state, Adam step 2N.
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
import yaml
from safetensors.torch import load_file

from halos_core.checkpoint import load_checkpoint, optimizer_state_digest
from halos_core.run_dir import RunDir
from halos_core.synthetic import pairwise_records, write_jsonl

from .conftest import make_config
from .test_train_cli import accelerate_config

ROOT = Path(__file__).resolve().parents[2]
N = 8  # checkpoint_every; the round has 2N steps
HP = dict(checkpoint_every=N, warmup_steps=N + 3, lr=1e-3, batch_size=8, microbatch_size=4, seed=5)


def _start(rd: RunDir) -> subprocess.Popen:
    rd.accelerate_yaml.write_text(yaml.safe_dump(accelerate_config(1)))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(rd.accelerate_yaml),
        "-m",
        "halos_core.train",
        "--config",
        str(rd.run_json),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "TOKENIZERS_PARALLELISM": "false",
        "ACCELERATE_USE_CPU": "true",
    }
    log = open(rd.path / "launch.log", "ab")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def _finish(rd: RunDir, proc: subprocess.Popen, timeout: float = 180) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, (rd.path / "launch.log").read_text()[-4000:]


def _lines(rd: RunDir) -> list[dict]:
    records, _ = rd.read_metrics()
    return [m for m in records if m.get("split") != "eval"]


def _by_step(lines: list[dict]) -> dict[int, dict]:
    """One record per step; after a resume the log repeats steps and the later line wins."""
    out: dict[int, dict] = {}
    for m in lines:
        out[m["step"]] = m
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(rest[2]) == pgid and rest[0] not in ("Z", "X"):
            return True
    return False


def test_sigkill_after_checkpoint_then_resume_equals_straight_run(tmp_path, tiny_model_dir, tiny_sha):
    fb = write_jsonl(pairwise_records(2 * N * 8, seed=7), tmp_path / "pairs.jsonl")
    straight = RunDir(tmp_path / "straight").create()
    straight.write_config(make_config(straight.path, tiny_model_dir, tiny_sha, fb, job_id="straight", **HP))
    killed = RunDir(tmp_path / "killed").create()
    cfg = make_config(killed.path, tiny_model_dir, tiny_sha, fb, job_id="killed", **HP)
    killed.write_config(cfg)

    t0 = time.monotonic()
    p_straight = _start(straight)  # runs beside the doomed one (timing does not enter the numbers)
    p_killed = _start(killed)

    # ---- wait for the step-N checkpoint to be complete AND training to be past it, then SIGKILL
    deadline = time.monotonic() + 180
    while True:
        assert time.monotonic() < deadline, "no step past the first checkpoint within 180 s"
        assert p_killed.poll() is None, (
            "the run ended before it could be killed:\n" + (killed.path / "launch.log").read_text()[-3000:]
        )
        lines = _lines(killed)
        if lines and lines[-1]["step"] > N:
            break
        time.sleep(0.01)
    os.killpg(p_killed.pid, signal.SIGKILL)
    p_killed.wait()
    t_kill = time.monotonic()
    while _group_alive(p_killed.pid):
        assert time.monotonic() - t_kill < 10, "process group survived SIGKILL"
        time.sleep(0.02)
    assert p_killed.returncode == -signal.SIGKILL
    pre_kill = _lines(killed)
    killed_at = pre_kill[-1]["step"]
    assert N < killed_at < 2 * N and killed.read_result() is None, "killed mid-round, before result.json"

    # ---- resume as the worker does: drop partial checkpoint dirs, take the latest complete one
    killed.clean_partial_checkpoints()
    latest = killed.latest_checkpoint()
    assert latest is not None and latest.step == N
    killed.write_config(cfg.model_copy(update={"resume_from": str(latest.path)}))
    p_resumed = _start(killed)
    _finish(straight, p_straight)
    _finish(killed, p_resumed)
    elapsed = time.monotonic() - t0

    # ---- per-step numbers: the pre-kill lines and the resumed ones both equal the straight run
    a = _by_step(_lines(straight))
    all_lines = _lines(killed)
    after = all_lines[len(pre_kill) :]
    assert [m["step"] for m in after] == list(range(N + 1, 2 * N + 1))  # resumed at N+1, not at killed_at+1
    b = _by_step(all_lines)
    assert sorted(a) == sorted(b) == list(range(1, 2 * N + 1))
    keys = ("loss", "lr", "grad_norm", "examples", "round_step", "rewards/chosen", "rewards/rejected")
    for s in a:
        for key in keys:
            assert b[s][key] == a[s][key], (s, key, a[s][key], b[s][key])
    for m in pre_kill:  # the lines written before the kill, too (steps N+1..killed_at were redone)
        for key in keys:
            assert m[key] == a[m["step"]][key], (m["step"], key)
    assert [a[s]["lr"] for s in (1, N, N + 1, 2 * N)] == pytest.approx(
        [1e-3 * min(1, k / (N + 3)) for k in (1, N, N + 1, 2 * N)]
    )  # warmup spans the kill point

    # ---- final weights, Adam state (step 2N), scheduler: identical
    ra, rb = straight.read_result(), killed.read_result()
    assert ra.step == rb.step == 2 * N and ra.examples == rb.examples == 2 * N * 8
    assert rb.resumed.optimizer_step == N and rb.resumed.scheduler_last_epoch == N
    assert rb.resumed.optimizer_state_digest == optimizer_state_digest(
        torch.load(latest.path / "optimizer.pt", weights_only=True)
    )
    wa, wb = load_file(str(straight.final / "model.safetensors")), load_file(str(killed.final / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = load_checkpoint(straight.final).optimizer_state, load_checkpoint(killed.final).optimizer_state
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for idx in oa["state"]:
        assert int(oa["state"][idx]["step"]) == int(ob["state"][idx]["step"]) == 2 * N
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa["state"][idx][key], ob["state"][idx][key]), (idx, key)
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]
    sa = torch.load(straight.final / "scheduler.pt", weights_only=True)
    sb = torch.load(killed.final / "scheduler.pt", weights_only=True)
    assert sa["last_epoch"] == sb["last_epoch"] == 2 * N and sa["_last_lr"] == sb["_last_lr"]
    print(
        f"\n[T1 sigkill] N={N}, killed after step {killed_at} (checkpoint {latest.step}), "
        f"steps redone={killed_at - N}, wall={elapsed:.1f}s"
    )

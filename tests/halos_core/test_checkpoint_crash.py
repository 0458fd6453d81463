"""T3: SIGKILL during checkpoint saves at many random offsets ⇒ resume always uses the last
complete checkpoint (docs/RELIABILITY.md I3, I4, trap 5).

A fork server (`_checkpoint_writer.py`) loads a tiny model + AdamW once and forks one writer per
trial; the writer saves steps start, start+1, ... with the REAL `save_checkpoint` and
`prune_checkpoints` (keep_last=2, as the trainer), printing `saved N` after each save returns.
Each trial SIGKILLs it either after a seeded random delay, or (to hit the narrow windows: manifest
written but not renamed, renamed but not reported, mid-prune) right before a seeded random
os.fsync / os.replace / os.unlink / os.rmdir call inside the child. Then, as the worker's retry
would see it:

* every directory `RunDir.complete_checkpoints()` returns passes the real `load_checkpoint`
  (sha256 of every file, `weights_only` loads) and holds exactly what the writer saved for that
  step (weights, Adam moments and step count, scheduler position, trainer state);
* no completed save is lost: every reported step is still complete unless `keep_last` newer
  complete ones exist (pruning), so the latest complete step is ≥ the last reported one;
* `clean_partial_checkpoints()` removes every temporary / partial directory and no complete one.

The next trial continues from the latest complete step + 1 in the same run directory (a retry).
At the end a real `run(config, resume_from=<latest complete>)` trains on from the writer's last
checkpoint. The content of step N is a pure function of N (see `_checkpoint_writer`).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halos_core.checkpoint import load_checkpoint, optimizer_step_count
from halos_core.run_dir import META_FILE, TMP_PREFIX, CheckpointError, RunDir, read_manifest
from halos_core.train import run
from halos_core.training import Stopped, load_examples

try:
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except Exception:
    pass

from ._checkpoint_writer import BATCH_SIZE, KEEP_LAST, Writer, expected_moments, expected_weights
from .conftest import make_config, read_jsonl

WRITER = Path(__file__).with_name("_checkpoint_writer.py")
REPO = Path(__file__).resolve().parents[2]
JOB = "t3"
SEED = 20240603
TRIALS = 40
N_EPOCHS = 20  # 6 steps per epoch on `pairwise_file`: the writer's checkpoints claim a 120-step round
BUDGET_S = 45.0  # stop starting trials after this long (2 busy cores); at least MIN_TRIALS run
MIN_TRIALS = 20


# --------------------------------------------------------------------------- content checks


def check_content(manifest, base: dict[str, torch.Tensor], from_pretrained: bool = False) -> None:
    """`manifest`'s directory loads with the real loader and holds what the writer saved for its step."""
    step = manifest.step
    ck = load_checkpoint(manifest.path)  # verifies every sha256 first, then weights_only loads
    ts = ck.trainer_state
    assert (ts["step"], ts["round_step"], ts["examples"], ts["data_position"]) == (
        step,
        step,
        step * BATCH_SIZE,
        step * BATCH_SIZE,
    ), manifest.path
    assert ts["job_id"] == JOB and ck.manifest.extra["round_step"] == step
    assert ck.scheduler_state["last_epoch"] == step
    assert ck.rng_state is not None
    # optimizer: every parameter's Adam state is the one of this step
    opt = ck.optimizer_state
    names = ts["optimizer_params"]
    assert len(opt["state"]) == len(names) == len(base) and optimizer_step_count(opt) == step
    for index, name in enumerate(names):
        saved = opt["state"][index]
        want = expected_moments(index, base[name.removeprefix("lm.")], step)
        assert set(saved) == set(want), (manifest.path, index)
        for key in want:
            assert torch.equal(saved[key], want[key]), (manifest.path, name, key)
    # weights: the safetensors file, and what the trainer's loader (from_pretrained) makes of it
    want = expected_weights(base, step)
    got = load_file(str(manifest.path / "model.safetensors"))
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), (manifest.path, name)
    if from_pretrained:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(manifest.path, dtype=torch.float32)
        state = model.state_dict()
        for name in want:
            assert torch.equal(state[name], want[name]), (manifest.path, name)


def kill_phase(checkpoints: Path, reported: list[int], complete: list) -> str:
    """Where the kill landed, read from what it left behind."""
    tmps = [d for d in checkpoints.iterdir() if d.is_dir() and d.name.startswith(TMP_PREFIX)]
    if not tmps:
        if complete and (not reported or complete[-1].step > reported[-1]):
            return "renamed, not yet reported"
        if {d.name for d in checkpoints.iterdir()} - {m.path.name for m in complete}:
            return "pruning: a half-deleted old checkpoint"
        return "outside a save"  # setting the next step's state, reporting, before/after a prune
    assert len(tmps) == 1, tmps
    d = tmps[0]
    if (d / META_FILE).is_file():
        return "mid-save: manifest written, not renamed"
    if (d / f"{TMP_PREFIX}{META_FILE}").exists():
        return "mid-save: writing the manifest"
    if (d / "trainer_state.json").exists():
        return "mid-save: fsync / hashing"
    return "mid-save: writing files"


# --------------------------------------------------------------------------- the fork server


class WriterServer:
    def __init__(self, model_dir: Path, sha: str, total_steps: int, log: Path):
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.log = log
        self.child: int | None = None
        self._stderr = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(model_dir), JOB, str(total_steps), sha],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        assert self._read(120) == "ready"

    def _read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"writer server gave no answer; log:\n{self.log.read_text()[-3000:]}")
        return line.strip()

    def ask(self, line: str, timeout: float = 60) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def start(self, run_dir: Path, first: int, last: int, progress: Path, log: Path, kill_at: int = 0) -> int:
        answer = self.ask(f"run {run_dir} {first} {last} {progress} {log} {kill_at}")
        assert answer.startswith("pid "), answer
        self.child = int(answer.split()[1])
        return self.child

    def wait(self) -> int:
        answer = self.ask("wait")
        assert answer.startswith("status "), answer
        self.child = None
        return int(answer.split()[1])

    def close(self) -> None:
        if self.child is not None:  # a failed check between start and wait: don't leave a writer running
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def progress_lines(progress: Path) -> list[str]:
    return progress.read_text().splitlines() if progress.is_file() else []


def reported_steps(progress: Path) -> list[int]:
    return [int(line.split()[1]) for line in progress_lines(progress) if line.startswith("saved ")]


# --------------------------------------------------------------------------- T3


def test_kill_during_checkpoint_save_never_loses_a_complete_checkpoint(
    tmp_path, tiny_model_dir, tiny_sha, pairwise_file
):
    started = time.monotonic()
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    probe = make_config(tmp_path / "probe", tiny_model_dir, tiny_sha, pairwise_file, job_id=JOB, n_epochs=N_EPOCHS)
    total = len(load_examples(probe, "paired").train) // BATCH_SIZE * N_EPOCHS
    last_allowed = total - 3  # the final resume trains 2 steps and must stop before the round's end
    server = WriterServer(tiny_model_dir, tiny_sha, total, tmp_path / "writer.log")
    rng = random.Random(SEED)
    phases: Counter[str] = Counter()
    lost = killed = finished = 0
    runs = 0
    rd = progress = None
    try:
        # calibration: one uninterrupted writer saves 3 steps; offsets are drawn from 0..3 saves
        cal = RunDir(tmp_path / "calibration").create()
        t0 = time.monotonic()
        server.start(cal.path, 1, 3, tmp_path / "calibration.progress", tmp_path / "child.log")
        assert server.wait() == 0, (tmp_path / "child.log").read_text()[-3000:]
        save_s = (time.monotonic() - t0) / 3
        assert reported_steps(tmp_path / "calibration.progress") == [1, 2, 3]
        done, trace = progress_lines(tmp_path / "calibration.progress")[-1].split(":")  # "done N ops: op op | op ..."
        ops = int(done.split()[1])
        # the narrow windows of a save, as op numbers of a writer child (its first save starts at op 1):
        # before the manifest's rename, before the directory's rename, before the fsync after it
        # (renamed, not reported), before the prune's first unlink (reported, not pruned)
        first_save = trace.split("|")[0].split()
        targeted = [i for i, name in enumerate(first_save, 1) if name == "replace"] + [
            len(first_save),
            len(first_save) + 1,
        ]
        assert len(targeted) == 4 and first_save[-1] == "fsync", first_save
        assert [m.step for m in cal.complete_checkpoints()] == [2, 3]  # pruned to keep_last
        for m in cal.complete_checkpoints():
            check_content(m, base)

        trial = 0
        while trial < TRIALS and (trial < MIN_TRIALS or time.monotonic() - started < BUDGET_S):
            if rd is None or (rd.latest_checkpoint() and rd.latest_checkpoint().step >= last_allowed):
                runs += 1  # a fresh run directory (the previous one reached the round's end)
                rd = RunDir(tmp_path / f"run{runs}").create()
                progress = tmp_path / f"run{runs}.progress"
            latest = rd.latest_checkpoint()
            first = latest.step + 1 if latest else 1
            if rng.random() < 0.5:  # SIGKILL from outside after a random delay
                how = "timer"
                offset = rng.uniform(0.0, 3.0 * save_s)
                pid = server.start(rd.path, first, last_allowed, progress, tmp_path / "child.log")
                time.sleep(offset)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            else:  # the child SIGKILLs itself right before a random fsync/replace/unlink/rmdir
                how = "op"
                kill_at = targeted.pop(0) if targeted else rng.randint(1, ops)
                server.start(rd.path, first, last_allowed, progress, tmp_path / "child.log", kill_at)
            status = server.wait()
            assert status in (-signal.SIGKILL, 0), (status, (tmp_path / "child.log").read_text()[-3000:])
            if status == 0:
                finished += 1  # reached last_allowed before the kill
            else:
                killed += 1
            if how == "op":  # the child killed itself where asked
                assert status == -signal.SIGKILL and progress_lines(progress)[-1].startswith("kill before "), trial

            # ---- what a retry sees
            reported = reported_steps(progress)
            before = {d.name for d in rd.checkpoints.iterdir()}
            complete = rd.complete_checkpoints()
            steps = [m.step for m in complete]
            phase = kill_phase(rd.checkpoints, reported, complete)
            last_line = progress_lines(progress)[-1] if progress_lines(progress) else ""
            if how == "op" and last_line.startswith("kill before "):
                phase += f" (before {last_line.split()[-1]})"
            phases[phase] += 1
            for m in complete:
                check_content(m, base, from_pretrained=m is complete[-1])
            # a reported step may only be gone if keep_last newer complete ones replaced it (pruning)
            gone = [r for r in reported if r not in steps and sum(x > r for x in steps) < KEEP_LAST]
            lost += len(gone)
            assert not gone, f"trial {trial}: reported {reported[-4:]}, complete {steps}, lost {gone}"
            if reported:
                assert rd.latest_checkpoint().step >= reported[-1]
            # the temp / partial leftovers go, every complete checkpoint stays
            complete_names = {m.path.name for m in complete}
            removed = {p.name for p in rd.clean_partial_checkpoints()}
            assert removed == before - complete_names, (trial, sorted(before), sorted(complete_names))
            assert {d.name for d in rd.checkpoints.iterdir()} == complete_names
            assert [m.step for m in rd.complete_checkpoints()] == steps
            trial += 1
    finally:
        server.close()

    mid_save = sum(n for phase, n in phases.items() if phase.startswith("mid-save"))
    print(
        f"\nT3: {trial} trials ({killed} kills, {finished} writers finished first), {mid_save} kills landed "
        f"mid-save (temp dir left), checkpoints lost: {lost}; save ≈ {save_s * 1000:.0f} ms, {ops} fs ops "
        f"in 3 saves, {runs} run dir(s)"
    )
    for phase, n in sorted(phases.items()):
        print(f"T3:   {n:3d}  {phase}")
    assert lost == 0
    assert trial >= MIN_TRIALS and mid_save >= 5, phases  # the kills really do land inside saves

    # ---- a real resume from the latest complete checkpoint the kills left
    latest = rd.latest_checkpoint()
    assert latest is not None
    s = latest.step
    cfg = make_config(
        rd.path,
        tiny_model_dir,
        tiny_sha,
        pairwise_file,
        job_id=JOB,
        n_epochs=N_EPOCHS,
        checkpoint_every=1,
        resume_from=str(latest.path),
    )
    metrics_before = len(read_jsonl(rd.metrics_jsonl)) if rd.metrics_jsonl.is_file() else 0
    with pytest.raises(Stopped):
        run(cfg, stop_after=s + 2)
    lines = read_jsonl(rd.metrics_jsonl)[metrics_before:]
    assert [m["step"] for m in lines] == [s + 1, s + 2]
    assert [m["examples"] for m in lines] == [(s + 1) * BATCH_SIZE, (s + 2) * BATCH_SIZE]
    assert [m.step for m in rd.complete_checkpoints()] == [s + 1, s + 2]  # the trainer pruned the writer's
    after = load_checkpoint(rd.latest_checkpoint().path)
    # Adam's step count continued from the writer's (a fresh optimizer would say 2), LR schedule too
    assert optimizer_step_count(after.optimizer_state) == s + 2
    assert after.scheduler_state["last_epoch"] == s + 2
    assert after.trainer_state["data_position"] == (s + 2) * BATCH_SIZE
    print(
        f"T3: resumed from step {s} of the last run dir, trained steps {s + 1}, {s + 2}; "
        f"total {time.monotonic() - started:.1f} s"
    )


# --------------------------------------------------------------------------- torn file, intact manifest


@pytest.mark.parametrize(
    "damage", ["truncate model.safetensors", "truncate optimizer.pt", "empty trainer_state.json", "delete scheduler.pt"]
)
def test_torn_file_with_intact_manifest_is_not_selected(tmp_path, tiny_model_dir, tiny_sha, damage):
    """A `step-` directory whose meta.json is intact but a listed file was torn (a rename is no
    promise about contents after a crash) is refused on verify; the previous complete one is used."""
    writer = Writer(tiny_model_dir, JOB, 120, tiny_sha)
    base = writer.base
    rd = RunDir(tmp_path / "run").create()
    for step in (2, 4):
        writer.save(rd.checkpoint_path(step), step)
    torn = rd.checkpoint_path(4)
    action, name = damage.split()
    file = torn / name
    if action == "truncate":
        size = file.stat().st_size
        with open(file, "r+b") as fh:
            fh.truncate(size // 2)
    elif action == "empty":
        file.write_bytes(b"")
    else:
        file.unlink()
    assert (torn / META_FILE).is_file()

    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        read_manifest(torn)
    with pytest.raises(CheckpointError):
        load_checkpoint(torn)
    assert read_manifest(torn, verify=False).step == 4  # the manifest itself is intact
    assert [m.step for m in rd.complete_checkpoints()] == [2]
    latest = rd.latest_checkpoint()
    assert latest.step == 2 and latest.path == rd.checkpoint_path(2)
    check_content(latest, base, from_pretrained=True)

    removed = rd.clean_partial_checkpoints()
    assert removed == [torn] and not torn.exists()
    assert (torn.parent / rd.checkpoint_path(2).name).is_dir()
    assert [m.step for m in rd.complete_checkpoints()] == [2]

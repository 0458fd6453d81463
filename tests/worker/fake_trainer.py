"""A stand-in for `python -m halos_core.train --config run.json`, for the queue tests.

Launched by the real runner (settings.trainer_module): directly with one process, through the real
`accelerate launch` with several (worker.launch.command). It
honours the run-directory contract (halos_core/run_dir.py): metrics.jsonl lines, complete
checkpoints (files, then meta.json via write_manifest, under a temp name renamed into place),
resume from `resume_from`, final/ and result.json last.

What it does is read from the first feedback file, a JSON object:
    {"fake": {"steps": 6, "sleep": 0.2, "checkpoint_every": 2, "keep_last": null,
              "mode": "ok" | "fail" | "sigkill" | "exit0" | "hang" | "grandchildren",
              "at": 3}}
- keep_last: after each checkpoint, delete all but the newest `keep_last` (as the real trainer
  prunes; default: keep every one)
- fail: raise ValueError at step `at` (exit code > 0 ⇒ failed)
- sigkill: SIGKILL itself at step `at` (OOM-like ⇒ crashed)
- exit0: exit 0 at step `at` without result.json (⇒ crashed)
- hang: stop writing anything at step `at` and sleep (a rank stuck in a collective)
- grandchildren: spawn three grandchildren at start (two ignore SIGTERM, one of them in a session of
  its own, like torchrun's ranks), pids appended to grandchildren.json; they outlive the trainer
  unless the worker stops them
Under torch.distributed.run only RANK 0 trains; the other ranks just live as long as the run.

A round with `init_from` verifies that checkpoint first, as the real trainer does.

Every start appends to starts.jsonl: pid, attempt, resume step, and whether a process of an
earlier start of this job was still alive (physical overlap of attempts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from halos_core.job_spec import RunConfig
from halos_core.round_result import RoundResult
from halos_core.run_dir import TMP_PREFIX, RunDir, read_manifest, write_manifest


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return False


def _write_checkpoint(target: Path, step: int, examples: int, round_step: int) -> None:
    tmp = target.with_name(TMP_PREFIX + target.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(os.urandom(2048))
    (tmp / "optimizer.pt").write_bytes(json.dumps({"step": step}).encode())
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "round_step": round_step}))
    write_manifest(tmp, step, examples, round_step=round_step)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    config = RunConfig.model_validate_json(Path(args.config).read_text())
    rd = RunDir(config.run_dir)
    directives = json.loads(Path(config.feedback[0].path).read_text()).get("fake", {})
    steps = int(directives.get("steps", 6))
    pause = float(directives.get("sleep", 0.2))
    every = int(directives.get("checkpoint_every") or config.hyperparams.checkpoint_every or 2)
    mode = directives.get("mode", "ok")
    at = int(directives.get("at", 3))
    per_step = config.hyperparams.batch_size

    base_step, base_examples = config.counters.step, config.counters.examples
    start = 0
    if config.resume_from:
        manifest = read_manifest(config.resume_from)
        start = int(manifest.extra.get("round_step", manifest.step - base_step))
    elif config.init_from:
        # like the real trainer (halos_core.checkpoint.load_checkpoint): every file's sha256 is
        # verified before anything is loaded; CheckpointError ⇒ exit 1 ⇒ the job fails with it
        read_manifest(config.init_from, verify=True)

    starts = rd.path / "starts.jsonl"
    previous = []
    if starts.exists():
        previous = [json.loads(line) for line in starts.read_text().splitlines() if line.strip()]
    overlap = [p["pid"] for p in previous if _alive(p["pid"])]
    rank = int(os.environ.get("RANK", "0"))
    with open(starts, "a") as fh:
        fh.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "pgid": os.getpgid(0),
                    "sid": os.getsid(0),
                    "rank": rank,
                    "attempt": os.environ.get("HALOS_SUPERVISED_ATTEMPT"),
                    "resume_round_step": start,
                    "resume_from": config.resume_from,
                    "init_from": config.init_from,
                    "overlap": overlap if rank == 0 else [],
                    "t": time.time(),
                }
            )
            + "\n"
        )
    if rank != 0:  # other ranks (torchrun): take part in nothing, live as long as the run
        time.sleep((steps - start) * pause + 2)
        return 0

    if mode == "grandchildren":
        ignore_term = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        same_group = subprocess.Popen([sys.executable, "-c", ignore_term])
        plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        # like torch.distributed.run's ranks: in a session of its own, out of the launcher's group
        own_session = subprocess.Popen([sys.executable, "-c", ignore_term], start_new_session=True)
        gc = rd.path / "grandchildren.json"
        known = json.loads(gc.read_text()) if gc.exists() else []
        gc.write_text(json.dumps(known + [same_group.pid, plain.pid, own_session.pid]))

    for rs in range(start + 1, steps + 1):
        time.sleep(pause)
        if rs == at and mode == "fail":
            raise ValueError(f"fake trainer failure at step {rs}")
        if rs == at and mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if rs == at and mode == "exit0":
            return 0
        if rs == at and mode == "hang":
            time.sleep(3600)
        step, examples = base_step + rs, base_examples + rs * per_step
        rd.append_metrics(
            {
                "step": step,
                "round_step": rs,
                "total_steps": base_step + steps,
                "examples": examples,
                "epoch": 0,
                "loss": 1.0 / rs,
                "lr": 1e-5,
                "grad_norm": 0.5,
            }
        )
        if rs % every == 0 and rs < steps:
            _write_checkpoint(rd.checkpoint_path(step), step, examples, rs)
            rd.log_checkpoint(step, rd.checkpoint_path(step).name)
            if directives.get("keep_last"):  # what halos_core.checkpoint.prune_checkpoints does (no torch here)
                for old in rd.complete_checkpoints(verify=False)[: -int(directives["keep_last"])]:
                    shutil.rmtree(old.path)

    step, examples = base_step + steps, base_examples + steps * per_step
    final = rd.final
    tmp = final.with_name(TMP_PREFIX + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(os.urandom(2048))
    (tmp / "optimizer.pt").write_bytes(b"final")
    write_manifest(tmp, step, examples, round_step=steps)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    manifest = read_manifest(final)
    rd.write_result(
        RoundResult(
            job_id=config.job_id,
            final_dir=str(final.resolve()),
            manifest_sha256=manifest.sha256,
            step=step,
            examples=examples,
            round_step=steps,
            total_steps=step,
            loss=config.loss.name,
            reference_sha256=config.reference_sha256,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

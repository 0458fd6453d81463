"""Checkpoint writer for the kill-during-save test (T3, `test_checkpoint_crash.py`).

A fork server: the process imports torch/transformers and loads the tiny model ONCE, then forks
one writer child per trial, so each trial costs a fork rather than a ~2-4 s interpreter start.
The child saves checkpoints in a loop with the real `halos_core.checkpoint.save_checkpoint` and
`prune_checkpoints` (as the trainer does), appending `saved N` to a progress file right after
each save returns; the test SIGKILLs it at a random moment, or the child kills itself right
before a randomly chosen filesystem operation (to hit the narrow windows too).

Everything a checkpoint holds is a pure function of its step (`expected_*` below), so the test
can check any surviving checkpoint's content against what the writer saved for that step. The
trainer state is shaped like `Trainer.trainer_state` (same optimizer layout and parameter
names), so a real `run(config, resume_from=...)` can continue from it.

Protocol (one line per command on stdin, one answer line on stdout):

    run RUN_DIR START STOP PROGRESS LOG KILL_AT  ->  pid PID    (child saves steps START..STOP; KILL_AT > 0:
                                                    it SIGKILLs itself before its KILL_AT-th os.fsync/
                                                    replace/unlink/rmdir call, see `_kill_at_op`)
    wait                                         ->  status S   (S = -9 when SIGKILLed, 0 when done)
    quit                                         ->  (exits)

    python tests/halos_core/_checkpoint_writer.py MODEL_DIR JOB_ID TOTAL_STEPS REFERENCE_SHA256
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

BATCH_SIZE = 8  # conftest.make_config's default
LR = 1e-3  # conftest.make_config's default
WEIGHT_DECAY = 0.0  # Hyperparams' default
KEEP_LAST = 2  # halos_core.checkpoint.DEFAULT_KEEP_LAST
WEIGHT_DELTA = 1e-3
MOMENT_DELTA = 1e-4


# --------------------------------------------------------------------------- content of step s


def expected_weights(base: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The policy weights of step `step` (names as in model.safetensors)."""
    return {name: t + step * WEIGHT_DELTA for name, t in base.items()}


def expected_moments(index: int, like: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state of step `step` for parameter number `index`."""
    return {
        "step": torch.tensor(float(step)),
        "exp_avg": torch.full_like(like, step * MOMENT_DELTA + index * 1e-7),
        "exp_avg_sq": torch.full_like(like, (step * MOMENT_DELTA) ** 2),
    }


class Writer:
    """A tiny model + AdamW + LambdaLR laid out like the trainer's (DPO, full weights, no head)."""

    def __init__(self, model_dir: str | Path, job_id: str, total_steps: int, reference_sha256: str | None = None):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from halos_core.logprobs import DEFAULT_CHUNK_TOKENS, TokenLogprobModel
        from halos_core.training import warmup_lambda

        self.job_id, self.total_steps, self.reference_sha256 = job_id, total_steps, reference_sha256
        self.base = load_file(str(Path(model_dir) / "model.safetensors"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.policy.config.use_cache = False
        wrapped = TokenLogprobModel(self.policy, DEFAULT_CHUNK_TOKENS, head=None)
        trained = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in trained]
        self.params = [p for _, p in trained]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_lambda(0))
        for p in self.params:  # one real step so AdamW's state has its real structure
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_step(self, step: int) -> None:
        weights = expected_weights(self.base, step)
        with torch.no_grad():
            for name, tensor in self.policy.state_dict(keep_vars=True).items():
                if name in weights:
                    tensor.copy_(weights[name])
        for index, p in enumerate(self.params):
            self.optimizer.state[p] = expected_moments(index, p, step)
        self.scheduler.last_epoch = step
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def trainer_state(self, step: int) -> dict[str, Any]:
        return {
            "kind": "intermediate",
            "job_id": self.job_id,
            "step": step,
            "examples": step * BATCH_SIZE,
            "round_step": step,
            "data_position": step * BATCH_SIZE,
            "epoch": step / 6,
            "total_steps": self.total_steps,
            "batch_size": BATCH_SIZE,
            "seed": 0,
            "loss": "dpo",
            "reference_sha256": self.reference_sha256,
            "init_from": None,
            "lr": LR,
            "restored": None,
            "reference_param_digest": None,
            "lora": None,
            "head": None,
            "optimizer_params": self.param_names,
        }

    def save(self, target: Path, step: int):
        from halos_core.checkpoint import SaveRequest, save_checkpoint

        self.set_step(step)
        request = SaveRequest(
            model=self.policy,
            tokenizer=self.tokenizer,
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            trainer_state=self.trainer_state(step),
        )
        extra = {
            "kind": "intermediate",
            "job_id": self.job_id,
            "round_step": step,
            "total_steps": self.total_steps,
            "reference_sha256": self.reference_sha256,
            "parent": None,
            "lora": False,
            "merged": False,
            "head": None,
        }
        return save_checkpoint(target, request, manifest_extra=extra)


# --------------------------------------------------------------------------- fork server


FS_OPS = ("fsync", "replace", "unlink", "rmdir")  # the durability/visibility points of a save and a prune


def _kill_at_op(kill_at: int, fd: int) -> list[str]:
    """Record calls of `os.<FS_OPS>` in this (forked, test-only) process and SIGKILL it right
    before call number `kill_at` (0: never). Production code is untouched: only the child's
    `os` module attributes are wrapped, which is what halos_core and shutil call through."""
    trace: list[str] = []
    count = [0]
    kill, getpid, write = os.kill, os.getpid, os.write

    def wrap(name: str):
        real = getattr(os, name)

        def op(*args, **kwargs):
            trace.append(name)
            count[0] += 1
            if count[0] == kill_at:
                write(fd, f"kill before {name}\n".encode())
                kill(getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return op

    for name in FS_OPS:
        setattr(os, name, wrap(name))
    return trace


def _child(writer: Writer, run_dir: str, start: int, stop: int, progress: str, log_file: str, kill_at: int) -> None:
    """Save steps start..stop (prune after each, like the trainer); never returns."""
    code = 1
    try:
        log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        from halos_core.checkpoint import prune_checkpoints
        from halos_core.run_dir import RunDir

        rd = RunDir(run_dir)
        fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        trace = _kill_at_op(kill_at, fd)
        for step in range(start, stop + 1):
            writer.save(rd.checkpoint_path(step), step)
            os.write(fd, f"saved {step}\n".encode())  # the save returned: this step must never be lost
            trace.append("|")  # (not an op: marks where a save returned in the trace)
            prune_checkpoints(rd, KEEP_LAST)
        ops = [name for name in trace if name != "|"]
        os.write(fd, f"done {len(ops)} ops: {' '.join(trace)}\n".encode())
        code = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(writer: Writer) -> None:
    out = sys.stdout
    pid = None
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "run":
            run_dir, start, stop, progress, log_file, kill_at = args
            pid = os.fork()
            if pid == 0:
                _child(writer, run_dir, int(start), int(stop), progress, log_file, int(kill_at))
            out.write(f"pid {pid}\n")
        elif cmd == "wait":
            _, status = os.waitpid(pid, 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            out.write(f"status {code}\n")
            pid = None
        elif cmd == "quit":
            break
        else:
            out.write(f"error unknown command {cmd!r}\n")
        out.flush()


def main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:
        pass
    model_dir, job_id, total_steps, sha = argv
    writer = Writer(model_dir, job_id, int(total_steps), sha or None)
    # warm up every lazy import and code path of a save before forking (not in any run dir)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        writer.save(Path(scratch) / "step-000000", 0)
    serve(writer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""How the training benchmarks measure a round: steady tokens/s from the trainer's own metrics,
MFU, and peak memory. Used by `bench/train_throughput.py` and `bench/gpu_round.py`.

- tokens/s: the trainer writes one metrics.jsonl line per optimizer step with `tokens` (non-pad
  tokens of the trained streams: chosen + rejected for a pair, KTO's KL stream not counted) and
  `tokens_per_s` (those over the step's wall time: collation, forward + backward, the reference
  forward unless cached, clipping, the optimizer step). The steady figure leaves out the first
  `warmup` steps and divides their summed tokens by their summed time.
- MFU: FLOPs per token / peak FLOP/s, with 6·N FLOPs per trained token (forward 2N, backward 4N)
  when every weight trains, and 4·N when the base is frozen (LoRA: no weight gradients for it;
  the adapters' own FLOPs are negligible and not counted). N = parameters that do matmuls (all but
  the input embedding table; a tied table counts once, as the LM head). Reference forwards,
  recomputation (gradient checkpointing) and attention's quadratic term are not counted (the
  usual convention): a switch that adds recomputation lowers tokens/s and so MFU.
- peak memory: on CUDA `torch.cuda.max_memory_allocated` (reset at `start`); on the CPU the peak
  RSS (`VmHWM` of /proc/self/status, reset at `start` through /proc/self/clear_refs where the
  kernel allows it, else the process-wide peak), which includes the Python/torch baseline.
- memory over time (`MemorySampler`): the same quantity (allocated CUDA bytes, or RSS) read every
  20 ms on a thread, so that the peak of one phase of a round (its training steps) can be told
  apart from the round's peak (e.g. a final checkpoint's export); a peak shorter than the interval
  can be missed, so the sampled figure is a lower bound.
"""

from __future__ import annotations

import gc
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

H100_BF16_DENSE_TFLOPS = 989.0


def read_metrics(run_dir: Path) -> list[dict]:
    """The training-step lines of a run's metrics.jsonl (eval lines left out)."""
    from halos_core.run_dir import RunDir

    path = RunDir(run_dir).metrics_jsonl
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in lines if m.get("split") != "eval"]


@dataclass
class Steady:
    """The steps after the warmup ones: how many, their tokens, their summed wall time."""

    steps: int
    tokens: int
    seconds: float
    step_times: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def steady(steps: list[dict], warmup: int) -> Steady:
    """`steps`: metrics lines of training steps; the first `warmup` are left out (all are kept
    when there are no more than `warmup`)."""
    measured = steps[warmup:] if len(steps) > warmup else steps
    times = [m["tokens"] / m["tokens_per_s"] for m in measured if m.get("tokens_per_s")]
    return Steady(len(measured), sum(m["tokens"] for m in measured), sum(times), times)


def mfu(matmul_params: int, tokens_per_s: float, peak_tflops: float, *, frozen_base: bool = False) -> float:
    flops_per_token = (4 if frozen_base else 6) * matmul_params
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


def _vm_hwm_bytes() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        m = None
    if m:
        return int(m.group(1)) * 1024
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kB
    except Exception:
        return None


def _reset_cpu_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of what runs between `start()` and `stop()` (see the module docstring)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.reset = False

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            gc.collect()
            self.reset = _reset_cpu_peak()

    def stop(self) -> tuple[int | None, str]:
        """(peak bytes, what the figure is)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
        kind = "peak RSS (VmHWM, reset per run)" if self.reset else "peak RSS (process-wide)"
        return _vm_hwm_bytes(), kind


class MemorySampler:
    """Reads the memory in use every `interval` seconds on a thread while in its `with` block."""

    def __init__(self, cuda: bool, interval: float = 0.02):
        self.cuda = cuda
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (time.time(), bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _read(self) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated())
        with open("/proc/self/statm") as fh:  # resident pages are the second field
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._read()))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_between(self, start: float, end: float) -> int | None:
        """The largest sample taken in [start, end] (time.time() values); None if none was."""
        inside = [b for t, b in self.samples if start <= t <= end]
        return max(inside) if inside else None

"""What the training bench scripts' command lines share: torch and the device set up, the work
directory, the JSON report. Used by `train_throughput.py`, `gpu_round.py` and `learning_signal.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def set_up_torch(device: str, threads: int | None) -> str:
    """Quiet the trainer's info logs and the download-style progress bars, apply `threads`, and
    resolve `device` (auto | cpu | cuda) to cpu or cuda; on the CPU the trainer is told so
    (ACCELERATE_USE_CPU: it picks CUDA whenever there is one)."""
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    logging.getLogger("halos_core").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    return device


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"


@contextlib.contextmanager
def work_dir(path: str | None, prefix: str) -> Iterator[Path]:
    """`path` (created; kept), or a temporary directory removed at the end."""
    if path:
        work = Path(path)
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def write_report(path: str | None, report: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")

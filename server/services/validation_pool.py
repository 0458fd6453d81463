"""Feedback validation off the API's event loop and interpreter: a small pool of worker processes.

An upload is staged to a temp file first (`server.storage`); then this pool proves it valid with
the compiled fast path (`halos_core.feedback.fast`), the file cut into one line-aligned segment per
worker for files over `PARALLEL_MIN_BYTES`, and the segments merged in a worker too. Whatever the
fast path cannot prove goes to the detailed scanner (`validate_file(fast=False)`) in a worker,
which returns the summary or raises `FeedbackValidationError` with the record-level report.

- Workers come from a forkserver: safe to start from a threaded server, and all of them share one
  hash secret, which the segments' prompt tables rely on (`Segment.fingerprint` checks it).
- Workers run at a lower CPU priority (nice +10): on a busy box, other requests' handling in the
  API process goes first, and a big upload only takes what is left.
- Memory: a worker reads at most `max_record_bytes` (≤ 8 MiB) at a time plus a table of one small
  entry per distinct prompt_id; the API process holds only the temp file's path.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from halos_core.feedback import FeedbackLimits, FeedbackSummary, validate_file
from halos_core.feedback.fast import merge, plan, scan_segment

T = TypeVar("T")
PARALLEL_MIN_BYTES = 16 * 1024 * 1024  # below this one segment: a pool round trip costs more than it saves
WORKER_NICE = 10


def _lower_priority() -> None:
    try:
        os.nice(WORKER_NICE)
    except OSError:  # not permitted here: run at the normal priority
        pass


class ValidationPool:
    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["halos_core.feedback.fast"])
        self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=_lower_priority)

    def validate(self, path: Path, limits: FeedbackLimits) -> FeedbackSummary:
        """Blocks the calling thread (never the event loop) until a worker has an answer."""
        parts = self.workers if os.path.getsize(path) >= PARALLEL_MIN_BYTES else 1
        planned = self._executor.submit(plan, path, parts).result()
        if planned is not None:
            fmt, ranges = planned
            futures = [self._executor.submit(scan_segment, path, start, end, *fmt, limits) for start, end in ranges]
            segments = [f.result() for f in futures]
            if all(s is not None for s in segments):
                summary = self._executor.submit(merge, segments, limits).result()
                if summary is not None:
                    return summary
        return self._executor.submit(validate_file, path, limits, fast=False).result()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker (a picklable, module-level `fn`); blocks the calling thread."""
        return self._executor.submit(fn, *args).result()

    def warm_up(self) -> None:
        """Start every worker now (at API startup), not during the first upload."""
        for future in [self._executor.submit(os.getpid) for _ in range(self.workers)]:
            future.result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

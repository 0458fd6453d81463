"""Feedback validation off the API's event loop and interpreter: a small pool of worker processes.

An upload is staged to a temp file first (`server.storage`); then this pool proves it valid and
finds its data-quality findings with the compiled fast path (`halos_core.feedback.fast`), the file
cut into one line-aligned segment per worker for files over `PARALLEL_MIN_BYTES`, and the segments
merged in a worker too. Whatever the fast path cannot prove goes to the detailed scanner and
`quality.find` (`quality.detailed_check`) in a worker, which returns the summary and the findings
or raises `FeedbackValidationError` with the record-level report.

- Workers come from a forkserver: safe to start from a threaded server, and all of them share one
  hash secret, which the segments' prompt tables rely on (`Segment.fingerprint` checks it).
- Workers run at a lower CPU priority (nice +10): on a busy box, other requests' handling in the
  API process goes first, and a big upload only takes what is left.
- Memory: a worker reads at most `max_record_bytes` (≤ 8 MiB) at a time plus two tables of one
  small entry per distinct prompt_id and per distinct record (the detailed pass keeps the same);
  the API process holds the temp file's path and, between the segments and their merge, their
  tables packed (16 bytes an entry).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from halos_core.feedback import FeedbackLimits, FeedbackSummary
from halos_core.feedback.fast import merge, plan, scan_segment
from halos_core.feedback.quality import Findings, detailed_check

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

    def check(self, path: Path, limits: FeedbackLimits) -> tuple[FeedbackSummary, Findings]:
        """`quality.check` in the workers: blocks the calling thread (never the event loop) until
        they have an answer."""
        parts = self.workers if os.path.getsize(path) >= PARALLEL_MIN_BYTES else 1
        planned = self._executor.submit(plan, path, parts).result()
        if planned is not None:
            fmt, ranges = planned
            futures = [self._executor.submit(scan_segment, path, start, end, *fmt, limits) for start, end in ranges]
            segments = [f.result() for f in futures]
            if all(s is not None for s in segments):
                checked = self._executor.submit(merge, segments, limits).result()
                if checked is not None:
                    return checked
        return self._executor.submit(detailed_check, path, limits).result()

    def warm_up(self) -> None:
        """Start every worker now (at API startup), not during the first upload."""
        for future in [self._executor.submit(os.getpid) for _ in range(self.workers)]:
            future.result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

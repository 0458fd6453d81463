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
- Overlap: while an upload is still arriving, each `SEGMENT_BYTES` of it that have been written
  (cut at a line end) go to a worker at once (`Pipeline`, fed by the upload's writer), so most of
  a big file is checked by the time its last byte is on disk; `check` then scans only the rest.
- Memory: a worker reads at most `max_record_bytes` (≤ 8 MiB) at a time plus two tables of one
  small entry per distinct prompt_id and per distinct record (the detailed pass keeps the same);
  it writes them packed (32 bytes a record) to a file beside the staged upload (`tables_path`),
  which the merging worker reads and sorts as int64 arrays, so the API process holds the temp
  file's path and each segment's counters and first examples only. The table files go when the
  check ends (`discard_tables`); those of a worker that died after writing them stay until the
  API's startup sweep of stale uploads (older than a day).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from halos_core.feedback import FeedbackLimits, FeedbackSummary
from halos_core.feedback.fast import Segment, merge, plan, scan_range, scan_segment, split_points
from halos_core.feedback.quality import Findings, detailed_check

PARALLEL_MIN_BYTES = 16 * 1024 * 1024  # below this one segment: a pool round trip costs more than it saves
SEGMENT_BYTES = 32 * 1024 * 1024  # while an upload arrives, each this many bytes become a segment
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

    def pipeline(self, limits: FeedbackLimits) -> Pipeline:
        """A `Pipeline` to feed with an upload's writes (`storage.receive_upload(on_flush=...)`)."""
        return Pipeline(self._executor, limits)

    def check(
        self, path: Path, limits: FeedbackLimits, pipeline: Pipeline | None = None
    ) -> tuple[FeedbackSummary, Findings]:
        """`quality.check` in the workers (with the segments `pipeline` started while the file was
        written): blocks the calling thread (never the event loop) until they have an answer."""
        size = os.path.getsize(path)
        early = pipeline.started(path, limits) if pipeline is not None else None
        futures: list[Future[Segment | None]] = []
        try:
            if early is not None:
                start, futures = early
                parts = self.workers if size - start >= PARALLEL_MIN_BYTES else 1
                tail = split_points(path, parts, start, size) if start < size else []
                futures += [self._executor.submit(scan_range_spilled, path, a, b, limits) for a, b in tail]
            else:
                planned = self._executor.submit(plan, path, self.workers if size >= PARALLEL_MIN_BYTES else 1).result()
                if planned is not None:
                    fmt, ranges = planned
                    futures = [self._executor.submit(scan_segment_spilled, path, a, b, *fmt, limits) for a, b in ranges]
            if futures:
                segments = [f.result() for f in futures]
                if all(s is not None for s in segments):
                    checked = self._executor.submit(merge, segments, limits).result()
                    if checked is not None:
                        return checked
            return self._executor.submit(detailed_check, path, limits).result()
        finally:
            discard_tables(futures)

    def warm_up(self) -> None:
        """Start every worker now (at API startup), not during the first upload."""
        for future in [self._executor.submit(os.getpid) for _ in range(self.workers)]:
            future.result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Pipeline:
    """Validation that starts while an upload is still arriving. `flushed` (the upload writer's
    `on_flush`, called on the event loop: submitting never blocks) sends each `SEGMENT_BYTES` of a
    JSONL file, cut after its last complete line so far, to a worker; `ValidationPool.check`
    collects them. A file that does not start with `{` (a JSON array, a byte-order mark, blank
    lines first: the fast path would decline it) is left to `check` alone."""

    def __init__(self, executor: ProcessPoolExecutor, limits: FeedbackLimits) -> None:
        self._executor = executor
        self.limits = limits
        self.path: Path | None = None
        self.start = 0  # where the next segment begins (a line start)
        self.futures: list[Future[Segment | None]] = []
        self.active = True

    def flushed(self, path: Path, offset: int, data: bytes) -> None:
        if not self.active:
            return
        if offset == 0:
            self.path = path
            if not data.startswith(b"{"):
                self.active = False
                return
        end = offset + len(data)
        if end - self.start < SEGMENT_BYTES:
            return
        cut = data.rfind(b"\n")
        if cut < 0:
            return
        boundary = offset + cut + 1
        self.futures.append(self._executor.submit(scan_range_spilled, path, self.start, boundary, self.limits))
        self.start = boundary

    def started(self, path: Path, limits: FeedbackLimits) -> tuple[int, list[Future[Segment | None]]] | None:
        """(where the segments started so far end, their futures) for this file, or None."""
        if not self.active or not self.futures or self.path != Path(path) or self.limits != limits:
            return None
        return self.start, list(self.futures)

    def cancel(self) -> None:
        """The upload failed or is done: nothing more to start; segments not yet running are dropped
        (and the tables of those still running removed once they are written)."""
        self.active = False
        for future in self.futures:
            future.cancel()
        discard_tables(self.futures)


def tables_path(upload: str | Path, start: int, end: int) -> Path:
    """Where the segment [start, end) of `upload` keeps its tables: beside the staged upload,
    named like it (upload-….part), so `storage.cleanup_stale_uploads` sweeps a leftover."""
    p = Path(upload)
    return p.with_name(f"{p.stem}.tables-{start}-{end}{p.suffix}")


def scan_range_spilled(path: Path, start: int, end: int, limits: FeedbackLimits) -> Segment | None:
    """`scan_range` in a worker, its tables left in a file (`Segment.spill`): the API process
    collects only counters and examples, the merging worker reads the tables."""
    return _spilled(scan_range(path, start, end, limits), tables_path(path, start, end))


def scan_segment_spilled(
    path: Path, start: int, end: int, family: str, kind: str, limits: FeedbackLimits
) -> Segment | None:
    return _spilled(scan_segment(path, start, end, family, kind, limits), tables_path(path, start, end))


def _spilled(seg: Segment | None, target: Path) -> Segment | None:
    if seg is not None:
        try:
            seg.spill(target)
        except OSError:  # a full disk: the tables travel packed through the API process, as before
            target.unlink(missing_ok=True)
    return seg


def discard_tables(futures: list[Future[Segment | None]]) -> None:
    """Remove the segments' table files: now for finished segments, on completion for the others."""
    for future in futures:
        future.add_done_callback(_discard_one)


def _discard_one(future: Future[Segment | None]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    seg = future.result()
    if seg is not None and seg.tables_path is not None:
        Path(seg.tables_path).unlink(missing_ok=True)

"""Supervising one training process group: metrics, cancel, self-fencing, shutdown.

The lease is renewed by the job's `worker.lease.LeaseKeeper` (started by the task right after
the claim, stopped after finish/release); the monitor reads its state every poll:

- `CANCEL`: SIGTERM the process group, wait `kill_grace_s` (the keeper keeps the lease alive),
  SIGKILL; the outcome is `cancelled`.
- fenced (`LOST`: another attempt owns the job now; or no successful heartbeat for 3/4 of the
  lease TTL): the keeper has SIGKILLed the attempt's processes on its own timer; report nothing.
- warm shutdown of the worker (`shutdown` event): stop the group (SIGTERM, grace, SIGKILL) and
  `jobs.release` the job: it goes back to `queued` without consuming a retry and the next worker
  resumes from the last complete checkpoint.
- stall (`stall_timeout_s` without a byte added to this node's output, the metrics or the
  checkpoint log): stop the group; the outcome is `crashed` (retried, resuming from the last
  checkpoint): a hung trainer does not hold its job `running` for ever.

Every `heartbeat_interval_s` it streams new `metrics.jsonl` lines into the database
(`jobs.record_progress`) and reports the intermediate checkpoints the trainer logged as complete in
checkpoints.jsonl (`jobs.record_checkpoint_saved`: a `job.checkpoint_saved` event; the log, not the
checkpoint directory, so one pruned again before the next poll is reported too). When the launcher exits by itself, any
process left in its group is stopped too, then the exit is mapped to an outcome by `worker.exit_codes.classify`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from halos_core.run_dir import RunDir
from server import jobs
from server.db import session_scope
from server.jobs import Claim, Outcome
from server.settings import Settings
from worker import exit_codes
from worker.lease import LeaseKeeper
from worker.watchdog import MARKER_PREFIX, job_processes, kill_group, pid_alive, proc_stat, read_environ

log = logging.getLogger(__name__)

MAX_RECORDS_PER_CALL = 1000

# Environment markers put on every training process (used to find orphans of dead runners)
ENV_JOB = f"{MARKER_PREFIX}JOB_ID"
ENV_ATTEMPT = f"{MARKER_PREFIX}ATTEMPT"
ENV_DB = f"{MARKER_PREFIX}DB"
ENV_RUNNER = f"{MARKER_PREFIX}RUNNER"  # "<pid>:<starttime>"
ENV_NODE = f"{MARKER_PREFIX}NODE"  # a multi-node attempt's machine rank: one host may run several nodes


@dataclass
class RunReport:
    """What the runner did. `outcome` is None when there is nothing to `finish` (lost / released)."""

    action: str  # finish | lost | released | left (a node > 0 of a gang whose trainer exited 0)
    outcome: Outcome | None = None
    detail: str = ""
    group_gone: bool = True


def db_identity(settings: Settings) -> str:
    return hashlib.sha256(settings.db_url.encode()).hexdigest()[:16]


def runner_identity() -> str:
    st = proc_stat(os.getpid())
    return f"{os.getpid()}:{st[3] if st else 0}"


def supervised_env(claim: Claim, settings: Settings) -> dict[str, str]:
    return {**attempt_marker(claim, settings), ENV_RUNNER: runner_identity()}


def attempt_marker(claim: Claim, settings: Settings) -> dict[str, str]:
    """The environment items that identify this attempt's processes (ranks live in other sessions);
    a gang member's also name its node, so it never signals another node's trainer on the same host."""
    marker = {ENV_JOB: claim.job_id, ENV_ATTEMPT: str(claim.attempt), ENV_DB: db_identity(settings)}
    if claim.gang:
        marker[ENV_NODE] = str(claim.rank)
    return marker


def find_orphans(settings: Settings, job_id: str | None = None) -> dict[int, str]:
    """Process groups of training runs of THIS database whose runner process is dead: {pgid: job_id}."""
    if not os.path.isdir("/proc"):
        return {}
    me = db_identity(settings)
    orphans: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        env = read_environ(pid)
        if env.get(ENV_DB) != me or (job_id is not None and env.get(ENV_JOB) != job_id):
            continue
        try:
            rpid, rstart = (int(x) for x in env.get(ENV_RUNNER, "0:0").split(":"))
        except ValueError:
            continue
        if rpid and pid_alive(rpid, rstart):
            continue
        st = proc_stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        orphans.setdefault(st[2], env.get(ENV_JOB, "?"))  # keyed by process group
    return orphans


def reap_orphans(settings: Settings, job_id: str | None = None, grace_s: float | None = None) -> list[int]:
    """Stop training process groups left behind by dead runners on this host (I6 backstop)."""
    killed = []
    for pgid, orphan_job in find_orphans(settings, job_id).items():
        log.warning("stopping orphaned training process group %d of job %s", pgid, orphan_job)
        kill_group(pgid, settings.kill_grace_s if grace_s is None else grace_s)
        killed.append(pgid)
    return killed


def _size(path: os.PathLike[str] | str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


class MetricsTail:
    """Tolerant tail of metrics.jsonl: complete lines only; a malformed line is skipped, not fatal.

    Lines read but not yet recorded stay `pending` until `record` succeeds for them (a database
    hiccup loses no line): they are retried on the next ingest with `skip_recorded`, so a write
    that committed but reported an error is not doubled. A batch the database refuses for its
    content (not for being unreachable) is dropped after `MAX_CONTENT_FAILURES` tries, with an
    error, so one bad line cannot stall the series; at most `MAX_PENDING` lines are kept.
    """

    MAX_PENDING = 100_000
    MAX_CONTENT_FAILURES = 3

    def __init__(self, run_dir: RunDir, offset: int = 0):
        self.run_dir = run_dir
        self.offset = offset
        self.pending: list[dict[str, Any]] = []
        self.failures = 0
        self.dropped = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            records, self.offset = self.run_dir.read_metrics(self.offset)
        except OSError as exc:
            log.warning("reading %s failed: %s", self.run_dir.metrics_jsonl, exc)
            return []
        return records

    def ingest(self, record: Callable[[list[dict[str, Any]], bool], None]) -> int:
        """Read new lines and `record(batch, retry)` every pending one; returns how many were recorded."""
        self.pending += self.read()
        if len(self.pending) > self.MAX_PENDING:
            extra = len(self.pending) - self.MAX_PENDING
            log.error(
                "dropping %d unrecorded metric lines of %s (database unavailable too long)",
                extra,
                self.run_dir.path.name,
            )
            del self.pending[:extra]
            self.dropped += extra
        done = 0
        while self.pending:
            batch = self.pending[:MAX_RECORDS_PER_CALL]
            try:
                record(batch, self.failures > 0)
            except Exception as exc:
                self.failures += 1
                if _transient(exc) or self.failures < self.MAX_CONTENT_FAILURES:
                    log.warning(
                        "recording metrics of %s failed (%d lines kept for a retry): %s",
                        self.run_dir.path.name,
                        len(self.pending),
                        exc,
                    )
                    return done
                log.error(
                    "dropping %d metric lines of %s the database refuses: %s", len(batch), self.run_dir.path.name, exc
                )
                self.dropped += len(batch)
            else:
                done += len(batch)
            del self.pending[: len(batch)]
            self.failures = 0
        return done


def _transient(exc: BaseException) -> bool:
    """The database was unreachable / busy / too slow (retry), as opposed to refusing the data."""
    from sqlalchemy import exc as sa_exc

    return isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, OSError))


class Supervisor:
    """Watches one launched attempt. The lease is NOT renewed here: `keeper` (worker.lease) owns
    the heartbeats and the self-fencing timer; the loop reads its state."""

    def __init__(
        self,
        claim: Claim,
        settings: Settings,
        run_dir: RunDir,
        proc: subprocess.Popen,
        shutdown: threading.Event,
        metrics_offset: int = 0,
        log_offset: int = 0,
        *,
        keeper: LeaseKeeper,
    ):
        self.claim = claim
        self.settings = settings
        self.run_dir = run_dir
        self.proc = proc
        self.pgid = proc.pid  # start_new_session=True: the launcher leads its own group
        self.marker = attempt_marker(claim, settings)
        self.shutdown = shutdown
        self.metrics = MetricsTail(run_dir, metrics_offset)
        self.log_offset = log_offset
        self.keeper = keeper
        # from the start of the log: an earlier attempt's checkpoints are deduplicated by step
        self.checkpoint_log_offset = 0
        # a multi-node attempt: node 0's worker reports the shared run directory's progress (the
        # process group's rank 0 writes it from whichever node it runs on); the others only watch
        self.node_rank = claim.rank if claim.gang else 0
        self.log_path = run_dir.node_log(self.node_rank)
        self._progress_mark: tuple[int, ...] = ()
        self._progress_at = time.monotonic()

    # ---- database calls (each in its own short transaction)
    def _record(self, batch: list[dict[str, Any]], retry: bool) -> None:
        with session_scope(self.settings) as session:
            jobs.record_progress(session, self.claim.job_id, self.claim.lease_token, batch, skip_recorded=retry)

    def _ingest(self) -> None:
        if self.node_rank:
            return
        self.metrics.ingest(self._record)
        self._report_checkpoints()

    def _report_checkpoints(self) -> None:
        """Every checkpoint line the trainer appended since the last poll (it appends one after the
        checkpoint is complete, before pruning); a line is consumed only once it is recorded."""
        try:
            lines, end = self.run_dir.read_checkpoint_log(self.checkpoint_log_offset)
        except OSError as exc:
            log.warning("reading %s failed: %s", self.run_dir.checkpoints_jsonl, exc)
            return
        for line in lines:
            try:
                step, name = int(line["step"]), str(line["name"])
            except (KeyError, TypeError, ValueError):
                log.warning("skipping a malformed line of %s: %r", self.run_dir.checkpoints_jsonl, line)
                continue
            try:
                with session_scope(self.settings) as session:
                    jobs.record_checkpoint_saved(session, self.claim.job_id, self.claim.lease_token, step, name)
            except Exception as exc:  # the database: this line and the rest are read again next poll
                log.warning("reporting checkpoint %s of %s failed: %s", line.get("name"), self.claim.job_id, exc)
                return
        self.checkpoint_log_offset = end

    def _reap_child(self) -> None:
        self.proc.poll()

    def _stop_group(self, grace: float) -> bool:
        gone = kill_group(self.pgid, grace, marker=self.marker, reap=self._reap_child)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if not gone:
            log.error("process group %d of job %s survived SIGKILL", self.pgid, self.claim.job_id)
        return gone

    # ---- the loop
    def run(self) -> RunReport:
        interval = self.settings.heartbeat_interval_s
        poll = max(0.05, min(0.2, interval / 2))
        next_ingest = time.monotonic() + interval
        while True:
            try:
                rc = self.proc.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                pass
            if self.keeper.fired.is_set():
                return self._fenced()
            if self.shutdown.is_set():
                return self._on_shutdown()
            if self.keeper.cancel_requested:
                return self._on_cancel()
            if time.monotonic() >= next_ingest:
                next_ingest = time.monotonic() + interval
                self._ingest()
                if self._stalled():
                    return self._on_stall()
        if self.keeper.fired.is_set():  # the exit was the fence's SIGKILL
            return self._fenced()
        # the launcher exited by itself: nothing of its group may outlive it
        gone = True
        if job_processes(self.pgid, self.marker):
            log.warning(
                "job %s: processes left behind by launcher %d after it exited; stopping them",
                self.claim.job_id,
                self.pgid,
            )
            gone = self._stop_group(min(self.settings.kill_grace_s, 5.0))
        self._ingest()
        if self.node_rank and rc == 0:
            # node 0's worker reports the result (the ranks' last barrier follows result.json)
            return RunReport("left", None, detail=f"node {self.node_rank} done", group_gone=gone)
        outcome = exit_codes.classify(
            rc, self.run_dir, log_offset=self.log_offset, kind=self.claim.kind, log=self.log_path
        )
        return RunReport("finish", outcome, group_gone=gone)

    def _stalled(self) -> bool:
        """No byte added for `stall_timeout_s` to this node's output, the run's metrics (every node
        sees them: rank 0 writes them in the shared run directory) or its checkpoint log."""
        mark = tuple(_size(p) for p in (self.log_path, self.run_dir.metrics_jsonl, self.run_dir.checkpoints_jsonl))
        now = time.monotonic()
        if mark != self._progress_mark:
            self._progress_mark, self._progress_at = mark, now
            return False
        limit = self.settings.stall_timeout_s
        return limit > 0 and now - self._progress_at > limit

    def _on_stall(self) -> RunReport:
        why = (
            f"no progress for {self.settings.stall_timeout_s:g}s: no output, metric or checkpoint from the"
            " trainer (hung, e.g. in a collective waiting for a rank that is gone); stopped"
        )
        log.error("job %s attempt %d: %s; stopping group %d", self.claim.job_id, self.claim.attempt, why, self.pgid)
        gone = self._stop_group(self.settings.kill_grace_s)
        self._ingest()
        return RunReport("finish", Outcome("crashed", error=why), group_gone=gone)

    def _fenced(self) -> RunReport:
        """The keeper fenced (lease lost, or no successful heartbeat for 3/4 of the TTL): it has
        killed the attempt's processes; report nothing to the database."""
        self.keeper.wait_fenced()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        gone = self.keeper.group_gone and not job_processes(self.pgid, self.marker)
        return RunReport("lost", None, detail=self.keeper.reason, group_gone=gone)

    def _on_cancel(self) -> RunReport:
        rc = self.proc.poll()
        if rc is not None:  # it finished just as the cancel arrived: report what really happened
            if job_processes(self.pgid, self.marker):
                self._stop_group(0)
            self._ingest()
            if self.node_rank and rc == 0:
                return RunReport("left", None, detail=f"node {self.node_rank} done")
            return RunReport(
                "finish",
                exit_codes.classify(
                    rc, self.run_dir, log_offset=self.log_offset, kind=self.claim.kind, log=self.log_path
                ),
            )
        log.info("job %s: cancel requested; stopping group %d", self.claim.job_id, self.pgid)
        gone = self._stop_group(self.settings.kill_grace_s)
        self._ingest()
        return RunReport("finish", Outcome("cancelled", error="cancelled by request"), group_gone=gone)

    def _on_shutdown(self) -> RunReport:
        log.warning(
            "job %s: worker shutting down; stopping group %d and releasing the job", self.claim.job_id, self.pgid
        )
        gone = self._stop_group(self.settings.kill_grace_s)
        self._ingest()
        if not gone:
            # the group could not be stopped: do not hand the job to another worker (I2); the
            # lease will expire and the sweeper decides
            return RunReport("lost", None, detail="process group survived SIGKILL", group_gone=False)
        if self.proc.poll() is not None:
            self.keeper.detach()  # reaped: a fence after the release must not signal a reused pgid
        try:
            with session_scope(self.settings) as session:
                ok = jobs.release(
                    session,
                    self.claim.job_id,
                    self.claim.lease_token,
                    "worker shutting down",
                    member_token=self.claim.member_token,
                )
        except Exception as exc:
            log.warning("releasing %s failed: %s", self.claim.job_id, exc)
            ok = False
        return RunReport("released" if ok else "lost", None, detail="worker shutting down")

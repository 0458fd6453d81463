"""The lease keeper: the ONE owner of a claimed job's heartbeats, and its self-fencing timer.

`worker.tasks` starts a `LeaseKeeper` right after `jobs.claim` and stops it only after `finish` /
`release` has returned, so the lease is renewed during everything the runner does outside the
training process's lifetime as well: reaping leftovers, hashing checkpoints before a retry,
verifying a previous attempt's result, hashing `final/` after the exit.

Two daemon threads:

- the beater renews the lease every `heartbeat_interval_s` (`jobs.heartbeat`) and records the
  answer: `OK`, `CANCEL` (sticky; the supervisor stops the training and reports `cancelled`) or
  `LOST` (the token is no longer ours: fence at once);
- the fence timer checks, independently of the beater and of the runner's main loop (either may
  be blocked in a database call that hangs), that a heartbeat succeeded within 3/4 of the lease
  TTL; otherwise it fences: it SIGKILLs the attempt's processes (the launcher's group plus every
  process carrying the attempt's environment markers, `worker.watchdog.kill_group`) before the
  sweeper can hand the job to another worker (docs/RELIABILITY.md trap 9, I2).

Once fenced the keeper never renews the lease again. The runner asks `usable()` right before it
starts the training (`attach` registers the process group for the fence) and the task asks it
again right before `finish`.
"""

from __future__ import annotations

import logging
import threading
import time

from server import jobs
from server.db import session_scope
from server.jobs import Claim, Heartbeat
from server.settings import Settings
from worker.watchdog import kill_group

log = logging.getLogger(__name__)

FENCE_FRACTION = 0.75  # of the lease TTL without a successful heartbeat


class LeaseKeeper:
    def __init__(self, claim: Claim, settings: Settings):
        self.claim = claim
        self.settings = settings
        self.interval = max(0.01, float(settings.heartbeat_interval_s))
        self.fence_after = float(settings.lease_ttl_s) * FENCE_FRACTION
        self.last_ok = time.monotonic()  # the claim itself renewed the lease
        self.state: Heartbeat = Heartbeat.OK
        self.reason = ""
        self.group_gone = True
        self.fired = threading.Event()  # fencing decided (the kill may still be running)
        self.fenced = threading.Event()  # fencing done (the kill has returned)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._target: tuple[int, dict[str, str]] | None = None
        self._threads: list[threading.Thread] = []
        self._ending = False

    # ---- lifecycle
    def start(self) -> LeaseKeeper:
        for name, target in (("beat", self._beat_loop), ("fence", self._fence_loop)):
            thread = threading.Thread(target=target, name=f"lease-{name}-{self.claim.job_id}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Stop renewing (the lease then expires unless finish/release ended it). A beater stuck
        in a hung database call is a daemon thread and is not waited for beyond `timeout`."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def ending(self) -> None:
        """The attempt's processes are gone and the task is recording its end: a LOST answer from
        here on is that record (or another member's), not a reason to fence."""
        with self._lock:
            self._ending = True

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ---- the training process group the fence kills
    def attach(self, pgid: int, marker: dict[str, str]) -> bool:
        """Register the attempt's processes. False when the keeper has already fenced: the caller
        must stop them itself (the fence found nothing to kill)."""
        with self._lock:
            self._target = (pgid, dict(marker))
            return not self.fired.is_set()

    def detach(self) -> None:
        """The launcher has been reaped: its pgid may be reused, so the fence must not signal it."""
        with self._lock:
            self._target = None

    # ---- state
    def usable(self) -> tuple[bool, str]:
        """(True, "") while the lease is ours; else (False, why). Cheap: no database call."""
        if self.fired.is_set():
            return False, self.reason or "self-fenced"
        if self.state == Heartbeat.LOST:
            return False, "lease lost: another attempt owns the job"
        idle = time.monotonic() - self.last_ok
        if idle > self.fence_after:
            return False, f"no successful heartbeat for {idle:.1f}s"
        return True, ""

    @property
    def cancel_requested(self) -> bool:
        return self.state == Heartbeat.CANCEL

    def wait_fenced(self, timeout: float = 30.0) -> bool:
        return self.fenced.wait(timeout)

    # ---- threads
    def beat(self) -> Heartbeat | None:
        """One heartbeat (the beater's body). None when the database call failed."""
        started = time.monotonic()
        try:
            with session_scope(self.settings) as session:
                state = jobs.heartbeat(
                    session,
                    self.claim.job_id,
                    self.claim.lease_token,
                    self.settings.lease_ttl_s,
                    member_token=self.claim.member_token,
                )
        except Exception as exc:
            log.warning("heartbeat of %s failed: %s", self.claim.job_id, exc)
            return None
        with self._lock:
            if state != Heartbeat.LOST and not self.fired.is_set():
                self.last_ok = max(self.last_ok, started)
            if self.state not in (Heartbeat.LOST, Heartbeat.CANCEL) or state == Heartbeat.LOST:
                self.state = state
        if state == Heartbeat.LOST and not self._ending:
            self.fence(
                "lease lost: the gang's attempt ended (another node failed or stopped, or the gang was released)"
                if self.claim.gang
                else "lease lost: another attempt owns the job"
            )
        return state

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.fired.is_set():
                return
            self.beat()

    def _fence_loop(self) -> None:
        poll = max(0.02, min(0.2, self.interval / 2, self.fence_after / 10))
        while not self._stop.wait(poll):
            if self.fired.is_set():
                return
            idle = time.monotonic() - self.last_ok
            if idle > self.fence_after:
                self.fence(f"no successful heartbeat for {idle:.1f}s")
                return

    def fence(self, why: str) -> None:
        """Stop renewing and SIGKILL the attempt's processes at once (idempotent)."""
        with self._lock:
            if self.fired.is_set():
                return
            self.reason = why
            self.fired.set()
            target = self._target
        # a gang member told by the database that its attempt ended: the end (another node's failure,
        # the round's success, a released gang) is recorded already; stopping here is routine
        level = logging.WARNING if self.claim.gang and self.state == Heartbeat.LOST else logging.ERROR
        try:
            if target is not None:
                pgid, marker = target
                log.log(
                    level,
                    "job %s attempt %d: self-fencing (%s): killing group %d",
                    self.claim.job_id,
                    self.claim.attempt,
                    why,
                    pgid,
                )
                self.group_gone = kill_group(pgid, 0, marker=marker)
            else:
                log.log(
                    level,
                    "job %s attempt %d: self-fencing (%s); no training process running",
                    self.claim.job_id,
                    self.claim.attempt,
                    why,
                )
        except Exception:
            log.exception("fencing job %s failed", self.claim.job_id)
            self.group_gone = False
        finally:
            self.fenced.set()

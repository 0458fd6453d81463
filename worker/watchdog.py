"""Process-group helpers and the per-job watchdog (standard library only: it starts in ~50 ms).

The runner starts the training launcher in its own session (pgid = the launcher's pid). If the
runner dies without cleaning up (SIGKILL, OOM killer), nobody would stop that group, so the runner
also starts this watchdog, in a session of its own:

    python -m worker.watchdog RUNNER_PID PGID GRACE_S

It polls every 0.2 s; when its parent (the runner) is gone it sends SIGTERM to the group, waits
GRACE_S, sends SIGKILL, and exits when no member of the group is left (docs/RELIABILITY.md I6). It
exits quietly when the group is gone or when the runner stops it with SIGTERM.

Group membership is read from /proc (zombies do not count: an orphan's zombie is reaped by
init, and `kill(pid, 0)` would report it alive until then).

A process group is not the whole job: torch.distributed.run (accelerate's multi-process launcher)
starts every rank with `start_new_session=True`, so a SIGKILL to the launcher's group would leave
the ranks running. Every training process therefore carries environment markers (job id, attempt,
database; see worker.monitor.supervised_env) and "the job's processes" are the launcher's group
plus every live process whose environment carries the attempt's markers.

    python -m worker.watchdog RUNNER_PID PGID GRACE_S [MARKER_JSON]
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", errors="replace")
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[1]), int(rest[2]), int(rest[19])
    except (IndexError, ValueError):
        return None


def _have_proc() -> bool:
    return os.path.isdir("/proc/self")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    if not _have_proc():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = proc_stat(int(name))
        if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
            members.append(int(name))
    return members


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return bool(group_members(pgid))


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    st = proc_stat(pid) if _have_proc() else None
    if st is None:
        if _have_proc():
            return False
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    if st[0] in ("Z", "X"):
        return False
    return starttime is None or st[3] == starttime


# Every training process carries environment variables named with this prefix (worker/monitor.py
# sets them: job, attempt, database, runner); they find an attempt's processes after its runner died.
MARKER_PREFIX = "HALOS_SUPERVISED_"


def read_environ(pid: int, prefix: bytes = MARKER_PREFIX.encode()) -> dict[str, str]:
    """The `prefix…` variables of a process's environment ({} if unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        if item.startswith(prefix) and b"=" in item:
            k, _, v = item.partition(b"=")
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def marked_pids(marker: dict[str, str] | None) -> list[int]:
    """Live processes whose environment carries every item of `marker`."""
    if not marker or not _have_proc():
        return []
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        env = read_environ(pid)
        if env and all(env.get(k) == v for k, v in marker.items()):
            st = proc_stat(pid)
            if st is not None and st[0] not in ("Z", "X"):
                found.append(pid)
    return found


def job_processes(pgid: int, marker: dict[str, str] | None = None) -> set[int]:
    """The launcher's group plus every process carrying the attempt's markers."""
    pids = set(group_members(pgid)) if group_alive(pgid) else set()
    return pids | set(marked_pids(marker))


def _signal_all(pgid: int, pids: set[int], sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_group(
    pgid: int,
    grace_s: float,
    *,
    marker: dict[str, str] | None = None,
    tick: Callable[[], None] | None = None,
    tick_every: float = 1.0,
    poll: float = 0.05,
    reap: Callable[[], object] | None = None,
) -> bool:
    """SIGTERM the job's processes (group + marked), wait up to `grace_s`, SIGKILL what is left;
    True when nothing is left.

    `tick` is called every `tick_every` seconds while waiting (the runner keeps its lease alive);
    `reap` is called while polling (the runner waits on its direct child so it is not a zombie).
    """
    if marker:
        poll = max(poll, 0.1)  # scanning environments costs more than a group check
    if grace_s > 0:
        _signal_all(pgid, job_processes(pgid, marker), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        next_tick = time.monotonic() + tick_every
        while time.monotonic() < deadline:
            if reap:
                reap()
            if not job_processes(pgid, marker):
                return True
            if tick and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + tick_every
                try:
                    tick()
                except Exception:
                    pass
            time.sleep(poll)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        left = job_processes(pgid, marker)
        if not left:
            return True
        _signal_all(pgid, left, signal.SIGKILL)
        if reap:
            reap()
        time.sleep(poll)
    return not job_processes(pgid, marker)


def main(argv: list[str]) -> int:
    import json

    runner_pid, pgid, grace = int(argv[0]), int(argv[1]), float(argv[2])
    marker = json.loads(argv[3]) if len(argv) > 3 else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    n = 0
    while True:
        if os.getppid() != runner_pid:
            kill_group(pgid, grace, marker=marker)
            return 0
        if n % 10 == 0 and not group_alive(pgid) and not marked_pids(marker):
            return 0
        n += 1
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

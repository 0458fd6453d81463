"""Job slots of one worker process: which GPUs and which rendezvous port each running job gets.

A worker with `concurrency` > 1 runs that many jobs at once (Celery threads pool). Each slot gets
a disjoint `CUDA_VISIBLE_DEVICES` set: slot i gets the visible GPUs
[i * num_processes, (i + 1) * num_processes). The visible GPUs are read from
`CUDA_VISIBLE_DEVICES` when set (ids or UUIDs, in that order), else counted with `nvidia-smi -L`
(the worker never imports torch). A worker without enough GPUs for every slot refuses to start
(`SlotError`). With `use_cpu` (tests, CPU boxes) nothing is assigned; with concurrency 1 the job
sees every GPU, as before.

Multi-process jobs rendezvous on `main_process_port`: a configured port is used only when the
worker runs one job at a time; otherwise every job gets a free port.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.settings import Settings

log = logging.getLogger(__name__)


class SlotError(RuntimeError):
    """This worker cannot give every slot its own GPUs."""


def visible_gpus(environ: Mapping[str, str] | None = None, nvidia_smi: str = "nvidia-smi") -> tuple[list[str], str]:
    """(the GPU ids a process started by this worker can see, where that came from)."""
    env = os.environ if environ is None else environ
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids: list[str] = []
        for item in cvd.split(","):
            item = item.strip()
            if not item or item == "-1":  # CUDA stops at the first invalid entry
                break
            ids.append(item)
        return ids, f"CUDA_VISIBLE_DEVICES={cvd!r}"
    try:
        out = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return [], f"`{nvidia_smi} -L` failed: {exc}"
    if out.returncode != 0:
        return [], f"`{nvidia_smi} -L` exited with {out.returncode}"
    count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(count)], f"`{nvidia_smi} -L` lists {count}"


def slot_devices(slot: int, num_processes: int, gpus: list[str]) -> list[str]:
    """The GPUs of slot `slot`: gpus[slot * n : (slot + 1) * n]."""
    n = max(1, int(num_processes))
    chunk = gpus[slot * n : (slot + 1) * n]
    if slot < 0 or len(chunk) < n:
        raise SlotError(f"slot {slot} needs GPUs {slot * n}..{(slot + 1) * n - 1}; only {len(gpus)} visible")
    return chunk


def plan(concurrency: int, num_processes: int, gpus: list[str], source: str = "") -> list[list[str]]:
    """Every slot's GPUs, or SlotError when there are not enough for `concurrency` disjoint sets."""
    n = max(1, int(num_processes))
    need = concurrency * n
    if len(gpus) < need:
        raise SlotError(
            f"worker concurrency {concurrency} x HALOS_NUM_PROCESSES {n} needs {need} GPUs, one set per job;"
            f" {len(gpus)} visible ({source or 'no GPUs found'}). Lower HALOS_WORKER_CONCURRENCY / --concurrency,"
            " or run one worker per GPU set (HALOS_USE_CPU=true runs on CPU)."
        )
    return [slot_devices(i, n, gpus) for i in range(concurrency)]


@dataclass(frozen=True)
class Slot:
    index: int
    devices: list[str] | None = None  # None: no restriction (concurrency 1, or CPU)
    configured_port: int | None = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices)} if self.devices is not None else {}

    def main_process_port(self) -> int | None:
        """The configured port (one job at a time only); None: a free port per job."""
        return self.configured_port


class Slots:
    def __init__(
        self,
        settings: Settings,
        concurrency: int,
        *,
        environ: Mapping[str, str] | None = None,
        nvidia_smi: str = "nvidia-smi",
    ):
        self.concurrency = max(1, int(concurrency))
        self.devices: list[list[str]] | None = None
        if self.concurrency > 1 and not settings.use_cpu:
            gpus, source = visible_gpus(environ, nvidia_smi)
            self.devices = plan(self.concurrency, settings.num_processes, gpus, source)
        self.port = settings.main_process_port if self.concurrency == 1 else None
        if settings.main_process_port and self.concurrency > 1:
            log.warning(
                "HALOS_MAIN_PROCESS_PORT=%s ignored: %d jobs run at once, each gets a free port",
                settings.main_process_port,
                self.concurrency,
            )
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(self.concurrency):
            self._free.put(i)

    def acquire(self) -> Slot:
        index = self._free.get()  # the pool runs at most `concurrency` tasks: never waits long
        return Slot(index, self.devices[index] if self.devices is not None else None, self.port)

    def release(self, slot: Slot) -> None:
        self._free.put(slot.index)


_lock = threading.Lock()
_current: Slots | None = None


def configure(settings: Settings, concurrency: int) -> Slots:
    """Set up this worker process's slots (raises SlotError: the worker must not start)."""
    global _current
    slots = Slots(settings, concurrency)
    with _lock:
        _current = slots
    if slots.devices is not None:
        log.info(
            "job slots: %s", "; ".join(f"{i}: CUDA_VISIBLE_DEVICES={','.join(d)}" for i, d in enumerate(slots.devices))
        )
    return slots


def current(settings: Settings) -> Slots:
    """The configured slots; a worker started without `halos worker` configures them here from
    HALOS_WORKER_CONCURRENCY."""
    with _lock:
        if _current is not None:
            return _current
    return configure(settings, settings.worker_concurrency)

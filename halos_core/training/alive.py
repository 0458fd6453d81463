"""Lines that say a long phase without optimizer steps is still moving.

The worker stops a trainer that writes nothing for `HALOS_STALL_TIMEOUT_S` (a hung rank holds its
job `running` otherwise; worker/monitor.py). Steps write metric lines, but some phases write none
for as long as the round is big: the reference pass before the first step on an accelerator, an
evaluation. Each ticks one of these, which logs `<phase>: <done>/<total>` at most once a minute.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("halos_core.training")

EVERY_S = 60.0  # far below any sensible stall timeout, and rare enough not to flood the log


class PhaseProgress:
    def __init__(self, phase: str, total: int | None = None, every_s: float = EVERY_S):
        self.phase = phase
        self.total = total
        self.every_s = every_s
        self.done = 0
        self.last = time.monotonic()

    def tick(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            log.info("%s: %d%s microbatches done", self.phase, self.done, of)

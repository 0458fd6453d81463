"""Per-key request rate limit: an in-process sliding window (one log of timestamps per key).

Scope and limits, on purpose: the window lives in this API process's memory, so with N API
processes behind a load balancer a key gets up to N x the limit, and a restart forgets the
window. Good enough to stop a runaway client; a shared limiter (Redis) would be the next step.
Memory: at most `limit` timestamps per active key; idle keys are dropped as they are seen.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable


class SlidingWindowLimiter:
    def __init__(self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._last_gc = clock()

    def hit(self, key: str) -> float | None:
        """Record one request for `key`. Returns None if allowed, else seconds until one is allowed."""
        if self.limit <= 0:
            return None
        now = self.clock()
        with self._lock:
            self._gc(now)
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            if len(hits) >= self.limit:
                return max(hits[0] + self.window_s - now, 0.001)
            hits.append(now)
            return None

    def _gc(self, now: float) -> None:
        if now - self._last_gc < self.window_s:
            return
        self._last_gc = now
        for key in [k for k, v in self._hits.items() if not v or v[-1] <= now - self.window_s]:
            del self._hits[key]


def retry_after_header(seconds: float) -> int:
    return max(1, math.ceil(seconds))

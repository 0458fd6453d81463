"""The sweeper's storage pass.

Every sweep: finish deletion intents a killed process left open (cheap: one indexed query), once
they are `INTENT_GRACE_S` old (a younger one is most likely being carried out by its request).
Every `retention_interval_s` (0: never from here): apply every run's retention, remove the
intermediate checkpoints of succeeded rounds a worker died before removing, and trim the reference
log-prob cache to its cap.
"""

from __future__ import annotations

import logging

from sqlmodel import Session

from server.settings import Settings
from server.storage_lifecycle import files, retention, usage

log = logging.getLogger("halos.storage")


INTENT_GRACE_S = 60.0  # an intent younger than this may still be carried out by the request that wrote it


def finish_intents(session: Session, settings: Settings, min_age_s: float = INTENT_GRACE_S) -> list[int]:
    return files.finish_open_intents(session, settings, min_age_s)


def periodic(session: Session, settings: Settings) -> dict[str, int]:
    report = {
        "pruned": retention.apply_all(session, settings),
        "intermediate_bytes": retention.sweep_intermediates(session, settings),
        "reference_cache_bytes": usage.evict_reference_cache(settings),
    }
    if any(report.values()):
        log.info("storage pass: %s", report)
    return report

"""The sweeper: what makes I1 (accepted ⇒ terminal) hold when workers die and brokers forget.

Every `sweep_interval_s`:
1. `jobs.expire_leases`: running/cancelling jobs whose lease expired become crashed → a new
   queued attempt after backoff, or failed after `max_attempts` crashes; waiting children of
   jobs that already finished are promoted or failed.
2. re-publish `jobs.claimable_unheld`: queued jobs past their backoff that were never published
   (a crash between commit and publish) or not claimed `republish_after_s` after their last
   publish (a broker that lost the message). Duplicate messages are harmless: the claim is a
   conditional UPDATE.

3. storage: deletion intents a killed process left open are finished (server/storage_lifecycle);
   every `retention_interval_s`, every run's retention is applied, intermediate checkpoints of
   succeeded rounds are removed and the reference log-prob cache is trimmed to its cap.

Besides, at most every `PRUNE_EVERY_S` the embedded broker's delivered messages are pruned, and
at most every `PURGE_IDEMPOTENCY_EVERY_S` idempotency records older than `idempotency_ttl_hours`
are deleted (`idempotency.purge_expired`; a lookup already ignores them, this bounds the table).

Several sweepers (one per `halos worker`, one in `halos serve`) may run at once: every step is
a conditional update (or an idempotent delete), so they only duplicate messages, never transitions.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import Session

from server import jobs, queue
from server.db import db_now, get_engine
from server.services import idempotency
from server.settings import Settings, get_settings
from server.storage_lifecycle import maintenance

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 600.0  # delivered messages in the embedded broker are deleted after an hour
PURGE_IDEMPOTENCY_EVERY_S = 3600.0


@dataclass
class SweepReport:
    expired: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)


def sweep_once(
    session: Session, settings: Settings | None = None, now: datetime | None = None, *, publish: bool = True
) -> SweepReport:
    settings = settings or get_settings()
    now = now or db_now(session)
    report = SweepReport()
    report.expired = jobs.expire_leases(
        session, now, retry_backoff_s=settings.retry_backoff_s, gang_form_timeout_s=settings.gang_form_timeout_s
    )
    if report.expired:
        log.warning("sweeper: lease expired / resolved: %s", report.expired)
    candidates = jobs.claimable_unheld(session, now, older_than=settings.republish_after_s)
    if candidates and publish:
        sent = queue.publish_many(candidates, settings)
        report.republished = candidates
        log.info("sweeper: published %d/%d queued job(s)", sent, len(candidates))
    return report


def purge_idempotency_records(session: Session, settings: Settings) -> int:
    """Delete idempotency records past `idempotency_ttl_hours`; returns how many."""
    purged = idempotency.purge_expired(session, settings.idempotency_ttl_hours)
    if purged:
        log.info("sweeper: purged %d expired idempotency record(s)", purged)
    return purged


def run_forever(settings: Settings | None = None, stop_event: threading.Event | None = None) -> None:
    settings = settings or get_settings()
    stop_event = stop_event or threading.Event()
    engine = get_engine(settings)
    last_prune = last_purge = last_storage = float("-inf")  # all run on the first pass (monotonic() may start near 0)
    while not stop_event.is_set():
        try:
            with Session(engine, expire_on_commit=False) as session:
                sweep_once(session, settings)
        except Exception:
            log.exception("sweeper pass failed")
        try:
            with Session(engine, expire_on_commit=False) as session:
                maintenance.finish_intents(session, settings)
        except Exception:
            log.exception("storage pass (open removals) failed")
        try:
            if settings.retention_interval_s and time.monotonic() - last_storage > settings.retention_interval_s:
                last_storage = time.monotonic()
                with Session(engine, expire_on_commit=False) as session:
                    maintenance.periodic(session, settings)
        except Exception:
            log.exception("storage pass (retention, cache) failed")
        if time.monotonic() - last_prune > PRUNE_EVERY_S:
            last_prune = time.monotonic()
            queue.prune_embedded_broker(settings)
        if time.monotonic() - last_purge > PURGE_IDEMPOTENCY_EVERY_S:
            last_purge = time.monotonic()
            try:
                with Session(engine, expire_on_commit=False) as session:
                    purge_idempotency_records(session, settings)
            except Exception:
                log.exception("purging idempotency records failed")
        stop_event.wait(settings.sweep_interval_s)


def start_thread(
    settings: Settings | None = None, stop_event: threading.Event | None = None
) -> tuple[threading.Thread, threading.Event]:
    stop_event = stop_event or threading.Event()
    thread = threading.Thread(target=run_forever, args=(settings, stop_event), name="halos-sweeper", daemon=True)
    thread.start()
    return thread, stop_event

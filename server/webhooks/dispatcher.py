"""The webhook dispatcher: sends the outbox rows (`OutboundDelivery`) after their transaction committed.

A loop run by `halos serve` and `halos worker` (beside the sweeper). Several may run at once:

1. claim: one UPDATE sets a lease (`lease_owner`, `lease_expires_at`) on up to
   `webhook_batch_size` due pending rows — chosen with `FOR UPDATE SKIP LOCKED` on Postgres
   (SQLite serialises writers), and only rows whose lease is free or expired;
2. send each (threads; connect+read timeout `webhook_timeout_s`; to the address checked by
   `addresses.pinned_target`; no redirects), signed per Standard Webhooks (`signing.py`);
3. record: a `WebhookAttempt` row, and the delivery becomes `delivered` (2xx), or pending again
   with exponential backoff, or `failed` once older than `webhook_max_age_s` — a conditional
   UPDATE on our lease, so a dispatcher whose lease expired records nothing.

Delivery is at least once: a process killed after the receiver answered but before step 3 sends
it again after the lease expires, with the same `webhook-id` and body, which receivers use to
deduplicate (docs/RELIABILITY.md S4).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from server.db import db_now, get_engine
from server.models import OutboundDelivery, WebhookAttempt, WebhookEndpoint, utcnow
from server.settings import Settings, get_settings
from server.webhooks import addresses, signing

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 1000
SEND_THREADS = 8


@dataclass(frozen=True)
class Claimed:
    id: str
    body: str
    url: str
    secrets: tuple[str, ...]
    attempt: int  # the number this attempt gets (1 = first)
    endpoint_gone: bool


@dataclass(frozen=True)
class Sent:
    ok: bool
    status_code: int | None
    error: str | None
    started_at: datetime
    duration_ms: int


def claim(session: Session, owner: str, settings: Settings, now: datetime | None = None) -> list[Claimed]:
    now = now or db_now(session)
    due = (
        select(OutboundDelivery.id)
        .where(
            OutboundDelivery.status == "pending",
            OutboundDelivery.next_attempt_at <= now,
            or_(col(OutboundDelivery.lease_expires_at).is_(None), col(OutboundDelivery.lease_expires_at) < now),
        )
        .order_by(col(OutboundDelivery.next_attempt_at))
        .limit(settings.webhook_batch_size)
        .with_for_update(skip_locked=True)
    )
    try:
        ids = (
            session.exec(
                update(OutboundDelivery)
                .where(col(OutboundDelivery.id).in_(due.scalar_subquery()))
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=settings.webhook_lease_s))
                .returning(col(OutboundDelivery.id))
            )
            .scalars()
            .all()
        )
        claimed = []
        for delivery_id in ids:
            d = session.get(OutboundDelivery, delivery_id)
            endpoint = session.get(WebhookEndpoint, d.endpoint_id) if d else None
            if d is None or endpoint is None:
                continue
            keys = [endpoint.secret]
            if (
                endpoint.previous_secret
                and endpoint.previous_secret_expires_at
                and endpoint.previous_secret_expires_at > now
            ):
                keys.append(endpoint.previous_secret)
            claimed.append(
                Claimed(d.id, d.body, endpoint.url, tuple(keys), d.attempts + 1, endpoint.deleted_at is not None)
            )
        session.commit()
        return claimed
    except Exception:
        session.rollback()
        raise


def send(claimed: Claimed, settings: Settings, client: httpx.Client) -> Sent:
    started = utcnow()
    t0 = time.monotonic()

    def done(ok: bool, status: int | None, error: str | None) -> Sent:
        return Sent(
            ok, status, error[:MAX_ERROR_CHARS] if error else None, started, int((time.monotonic() - t0) * 1000)
        )

    try:
        target = addresses.pinned_target(claimed.url, settings.webhook_allowed_networks)
    except addresses.AddressRefused as exc:
        return done(False, None, f"refused: {exc}")
    headers = signing.headers(claimed.id, claimed.body, utcnow(), claimed.secrets)
    headers["host"] = target.host_header
    try:
        resp = client.post(
            target.url, content=claimed.body.encode(), headers=headers, extensions=target.extensions or None
        )
    except httpx.HTTPError as exc:
        return done(False, None, f"{type(exc).__name__}: {exc}")
    if 200 <= resp.status_code < 300:
        return done(True, resp.status_code, None)
    if 300 <= resp.status_code < 400:
        return done(False, resp.status_code, f"redirect to {resp.headers.get('location', '?')!r} not followed")
    return done(False, resp.status_code, f"HTTP {resp.status_code}: {resp.text[:200]}")


def record(
    session: Session, claimed: Claimed, sent: Sent, owner: str, settings: Settings, now: datetime | None = None
) -> str | None:
    """Log the attempt and move the delivery on (only while `owner` holds its lease). Returns the
    delivery's new status, or None when the lease was lost (another dispatcher has it now)."""
    now = now or db_now(session)
    try:
        d = session.exec(
            select(OutboundDelivery)
            .where(
                OutboundDelivery.id == claimed.id,
                OutboundDelivery.lease_owner == owner,
                OutboundDelivery.status == "pending",
            )
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one_or_none()
        if d is None:
            session.rollback()
            return None
        attempts = d.attempts + 1
        session.add(
            WebhookAttempt(
                delivery_id=d.id,
                attempt=attempts,
                started_at=sent.started_at,
                duration_ms=sent.duration_ms,
                status_code=sent.status_code,
                error=sent.error,
                ok=sent.ok,
            )
        )
        values: dict = {
            "attempts": attempts,
            "last_status_code": sent.status_code,
            "last_error": sent.error,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if sent.ok:
            values |= {"status": "delivered", "finished_at": now}
        else:
            delay = min(settings.webhook_backoff_s * 2 ** (attempts - 1), settings.webhook_backoff_max_s)
            delay *= 1 + secrets.randbelow(1000) / 10000  # up to +10%: receivers recovering are not hit all at once
            next_at = now + timedelta(seconds=delay)
            if (next_at - d.created_at).total_seconds() > settings.webhook_max_age_s:
                values |= {"status": "failed", "finished_at": now}
            else:
                values["next_attempt_at"] = next_at
        session.exec(update(OutboundDelivery).where(col(OutboundDelivery.id) == d.id).values(**values))
        session.commit()
        return values.get("status", "pending")
    except Exception:
        session.rollback()
        raise


def give_up_deleted(session: Session, claimed: Claimed, owner: str) -> None:
    session.exec(
        update(OutboundDelivery)
        .where(
            col(OutboundDelivery.id) == claimed.id,
            col(OutboundDelivery.lease_owner) == owner,
            col(OutboundDelivery.status) == "pending",
        )
        .values(
            status="failed",
            last_error="endpoint deleted",
            finished_at=utcnow(),
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    session.commit()


def dispatch_once(settings: Settings, client: httpx.Client, pool: ThreadPoolExecutor | None = None) -> int:
    """One pass: claim, send, record. Returns how many deliveries were attempted."""
    owner = secrets.token_hex(8)
    engine = get_engine(settings)
    with Session(engine, expire_on_commit=False) as session:
        batch = claim(session, owner, settings)
    if not batch:
        return 0

    def one(claimed: Claimed) -> None:
        with Session(engine, expire_on_commit=False) as session:
            if claimed.endpoint_gone:
                give_up_deleted(session, claimed, owner)
                return
            sent = send(claimed, settings, client)
            status = record(session, claimed, sent, owner, settings)
            if not sent.ok:
                log.warning(
                    "webhook %s attempt %d to %s failed: %s (now %s)",
                    claimed.id,
                    claimed.attempt,
                    claimed.url,
                    sent.error,
                    status,
                )

    if pool is None:
        for claimed in batch:
            one(claimed)
    else:
        for future in [pool.submit(one, c) for c in batch]:
            future.result()
    return len(batch)


def make_client(settings: Settings) -> httpx.Client:
    # no redirects (a 3xx could point anywhere), no proxies from the environment (the address check
    # must see the real destination), bounded timeouts
    return httpx.Client(timeout=httpx.Timeout(settings.webhook_timeout_s), follow_redirects=False, trust_env=False)


def run_forever(settings: Settings | None = None, stop_event: threading.Event | None = None) -> None:
    settings = settings or get_settings()
    stop_event = stop_event or threading.Event()
    with make_client(settings) as client, ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="halos-webhook") as pool:
        while not stop_event.is_set():
            try:
                busy = dispatch_once(settings, client, pool) >= settings.webhook_batch_size
            except Exception:
                log.exception("webhook dispatch pass failed")
                busy = False
            if not busy:
                stop_event.wait(settings.webhook_dispatch_interval_s)


def start_thread(
    settings: Settings | None = None, stop_event: threading.Event | None = None
) -> tuple[threading.Thread, threading.Event]:
    stop_event = stop_event or threading.Event()
    thread = threading.Thread(target=run_forever, args=(settings, stop_event), name="halos-webhooks", daemon=True)
    thread.start()
    return thread, stop_event

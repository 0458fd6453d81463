"""Publishing job ids to Celery (the broker only wakes workers; the database holds the state).

`publish(job_id)` is called AFTER the transaction that created/queued the job has committed. It
sends the task by name (`halos.run_job`), so the server never imports the worker. A broker
error is logged and swallowed: the job stays `queued` with `published_at` unset and the sweeper
publishes it again (docs/RELIABILITY.md Q4).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from contextlib import closing
from datetime import datetime, timedelta
from typing import Any

from celery import Celery

from server.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_NAME = "halos.run_job"
QUEUE_NAME = "halos"

_apps: dict[str, Celery] = {}
_lock = threading.Lock()


def broker_options(settings: Settings) -> dict[str, Any]:
    """Transport options for the configured broker (shared by the producer and the worker)."""
    url = settings.broker
    if url.startswith(("redis://", "rediss://", "redis+socket://")):
        vis = max(1, int(settings.redis_visibility_timeout_s))
        return {
            "visibility_timeout": vis,
            # how often idle consumers look for unacked messages older than visibility_timeout
            # (kombu's default sweep is every ~100 s); a redelivery is a no-op thanks to the claim
            "unacked_restore_interval": max(1, min(10, vis // 10)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "retry_on_timeout": True,
        }
    if url.startswith(("sqla+sqlite", "sqlalchemy+sqlite")):
        # kombu hands these to sqlalchemy.create_engine: wait on the SQLite write lock instead of
        # failing with "database is locked" when the API and the worker publish/poll at once.
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    return {}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Configuration common to the producer (server) and the consumer (worker)."""
    return {
        "broker_url": settings.broker,
        "broker_transport_options": broker_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": QUEUE_NAME,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_routes": {TASK_NAME: {"queue": QUEUE_NAME}},
    }


def producer_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    key = settings.broker
    with _lock:
        app = _apps.get(key)
        if app is None:
            if settings.broker.startswith("sqla+sqlite"):
                settings.data_dir.mkdir(parents=True, exist_ok=True)
            app = Celery("halos-producer", set_as_current=False)
            app.conf.update(celery_config(settings))
            _apps[key] = app
        return app


def send(job_id: str, settings: Settings | None = None) -> None:
    """Send the task; raises on a broker error."""
    producer_app(settings).send_task(
        TASK_NAME,
        args=[job_id],
        queue=QUEUE_NAME,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0},
    )


def publish(job_id: str, settings: Settings | None = None) -> bool:
    """Publish one job id; record `published_at`. False (logged) on a broker error."""
    return publish_many([job_id], settings) == 1


def publish_many(job_ids: Iterable[str], settings: Settings | None = None) -> int:
    from server import jobs
    from server.db import session_scope

    settings = settings or get_settings()
    sent: list[str] = []
    for job_id in job_ids:
        try:
            send(job_id, settings)
            sent.append(job_id)
        except Exception as exc:
            log.warning("publishing job %s failed (the sweeper will retry): %s", job_id, exc)
    if sent:
        try:
            with session_scope(settings) as session:
                jobs.mark_published(session, sent)
        except Exception as exc:
            log.warning("recording published_at for %s failed: %s", sent, exc)
    return len(sent)


def prune_embedded_broker(settings: Settings | None = None, older_than_s: float = 3600.0) -> int:
    """Delete long-delivered messages from the embedded SQLite broker.

    kombu's SQLAlchemy transport never deletes a message: delivery only marks it invisible (acks
    are kept in memory), so broker.db would grow by one row per publish forever. A message
    delivered more than `older_than_s` ago is of no further use (an unacked one that a worker
    gives back on shutdown is re-inserted as a new row). Returns the number of rows removed.
    """
    settings = settings or get_settings()
    prefix = "sqla+sqlite:///"
    if not settings.broker.startswith(prefix):
        return 0
    path = settings.broker[len(prefix) :]
    if not path or not os.path.exists(path):
        return 0
    cutoff = (datetime.now() - timedelta(seconds=older_than_s)).strftime("%Y-%m-%d %H:%M:%S.%f")  # kombu: local time
    try:
        with closing(sqlite3.connect(path, timeout=30)) as conn:
            cur = conn.execute(
                "DELETE FROM kombu_message WHERE visible = 0 AND timestamp IS NOT NULL AND timestamp < ?", (cutoff,)
            )
            conn.commit()
            return cur.rowcount
    except sqlite3.Error as exc:
        log.warning("pruning the embedded broker failed: %s", exc)
        return 0


def reset() -> None:
    """Close the cached producer connections (tests, fork)."""
    with _lock:
        for app in _apps.values():
            try:
                app.close()
            except Exception:
                pass
        _apps.clear()

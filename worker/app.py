"""The Celery application of the worker (`celery -A worker.app worker`, or `halos worker`).

The broker only wakes workers; the database is the source of truth (docs/ARCHITECTURE.md):
- `task_acks_late=True` + `worker_prefetch_multiplier=1`: a worker holds one message per slot.
- `task_reject_on_worker_lost=False`: a job whose worker died is NOT redelivered by the broker;
  its lease expires and the sweeper re-queues it (trap 2) — that path is the only one.
- `task_ignore_result=True`: job state is never read from a result backend.
- Celery never stops training (no revoke, no time limits): the monitor kills the process group.

Warm shutdown (SIGTERM/SIGINT to the worker): the `worker_shutting_down` signal sets
`worker.runner.SHUTDOWN`; running jobs stop their training group and are released (re-queued
without consuming a retry), then the worker exits.
"""

from __future__ import annotations

import logging

from celery import Celery, signals

from server.queue import QUEUE_NAME, celery_config
from server.settings import get_settings

log = logging.getLogger(__name__)

settings = get_settings()

app = Celery("halos", include=["worker.tasks"])
app.conf.update(celery_config(settings))
app.conf.update(
    task_acks_late=True,
    task_acks_on_failure_or_timeout=True,
    task_reject_on_worker_lost=False,
    worker_prefetch_multiplier=1,
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    task_default_queue=QUEUE_NAME,
    task_time_limit=None,
    task_soft_time_limit=None,
    broker_connection_retry=True,
    broker_connection_max_retries=None,
    worker_enable_remote_control=False,
)


@signals.worker_shutting_down.connect
def _on_shutting_down(sig=None, how=None, exitcode=None, **_kw) -> None:
    from worker.runner import SHUTDOWN

    SHUTDOWN.set()


@signals.worker_ready.connect
def _on_ready(**_kw) -> None:
    # training groups left by a runner that died on this host (its watchdog normally handles it)
    from worker.monitor import reap_orphans

    try:
        killed = reap_orphans(get_settings())
        if killed:
            log.warning("stopped %d orphaned training process group(s) at startup", len(killed))
    except Exception:
        log.exception("orphan reaping at startup failed")

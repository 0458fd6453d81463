"""The background loops of `halos serve` and `halos worker` (each in a daemon thread, each safe to
run in several processes at once): the sweeper, the webhook dispatcher and the tracking exporter."""

from __future__ import annotations

import threading

from server.settings import Settings


def start(settings: Settings, stop: threading.Event) -> None:
    from server import sweeper

    sweeper.start_thread(settings, stop)
    if settings.webhooks_enabled:
        from server.webhooks import dispatcher

        dispatcher.start_thread(settings, stop)
    if settings.tracking_enabled:
        from server.tracking import exporter

        exporter.start_thread(settings, stop)

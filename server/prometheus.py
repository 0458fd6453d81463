"""`GET /metrics`: Prometheus text format (prometheus-client), outside `/v1`, no API key;
`HALOS_METRICS_ENABLED=false` removes it.

Two kinds of series, so that several API processes and workers report correctly:

- **computed from the database at scrape time** (`DatabaseCollector`): jobs by status, queue depth
  and the age of the oldest queued job, attempts by outcome, lease expiries, retries, per running
  job its step, step time, tokens/s and seconds since its last step (a stuck trainer shows),
  webhook deliveries by status and failed delivery attempts. Every API process answers the same
  numbers (counters come from append-only tables: attempts, events, webhook attempts), so scrape
  any one of them — or all, and aggregate with `max`.
- **per process** (`halos_http_*`): request counts and latency by route template. Each API process
  counts its own requests: scrape every process (one target each), or, when several processes
  share a host (e.g. gunicorn/uvicorn workers), set `PROMETHEUS_MULTIPROC_DIR` to an empty
  directory before they start and any of them exports the sum (prometheus-client's multiprocess
  mode).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import Session, col, select

from halos_client.event_models import EventType
from server.db import get_engine
from server.models import Attempt, Event, Job, JobStatus, MetricPoint, OutboundDelivery, Round, WebhookAttempt, utcnow
from server.settings import Settings

REQUESTS = Counter(
    "halos_http_requests_total",
    "HTTP requests by method, route template and status (this process)",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "halos_http_request_duration_seconds",
    "HTTP request duration by route template (this process)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class RequestMetrics:
    """Pure ASGI middleware (a BaseHTTPMiddleware would buffer the SSE stream): counts every request
    under its route *template* (`/v1/jobs/{job_id}`), never the raw path, so ids add no series."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            REQUESTS.labels(scope.get("method", "?"), route, str(status[0])).inc()
            LATENCY.labels(scope.get("method", "?"), route).observe(time.perf_counter() - start)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class DatabaseCollector(Collector):
    """Series read from the database at each scrape (the same in every process)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        with Session(get_engine(self.settings), expire_on_commit=False) as session:
            yield from self._jobs(session)
            yield from self._running(session)
            yield from self._webhooks(session)
            yield from self._storage(session)
            session.commit()

    def _jobs(self, session: Session) -> Iterator[Metric]:
        by_status = dict(session.exec(select(Job.status, func.count()).group_by(Job.status)).all())
        jobs = GaugeMetricFamily("halos_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status, 0))
        yield jobs
        depth, oldest = session.exec(
            select(func.count(), func.min(Job.queued_at)).where(Job.status == JobStatus.queued)
        ).one()
        yield GaugeMetricFamily("halos_queue_depth", "Jobs queued (waiting for a worker)", value=depth)
        age = (utcnow() - _aware(oldest)).total_seconds() if oldest else 0.0
        yield GaugeMetricFamily("halos_queue_oldest_age_seconds", "Age of the oldest queued job", value=age)
        attempts = CounterMetricFamily("halos_attempts", "Ended attempts by outcome", labels=["outcome"])
        for outcome, n in session.exec(
            select(Attempt.outcome, func.count()).where(col(Attempt.outcome).is_not(None)).group_by(Attempt.outcome)
        ).all():
            attempts.add_metric([outcome or ""], n)  # never None (filtered above)
        yield attempts
        expiries = session.exec(
            select(func.count())
            .select_from(Attempt)
            .where(Attempt.outcome == "crashed", col(Attempt.error).like("lease expired%"))
        ).one()
        yield CounterMetricFamily("halos_lease_expiries", "Attempts ended by an expired lease", value=expiries)
        retries = session.exec(
            select(func.count()).select_from(Event).where(Event.type == EventType.job_retry_scheduled.value)
        ).one()
        yield CounterMetricFamily("halos_retries", "Retries scheduled after a crashed attempt", value=retries)

    def _running(self, session: Session) -> Iterator[Metric]:
        labels = ["job_id", "run_id"]
        step = GaugeMetricFamily("halos_job_step", "Global step of a running job", labels=labels)
        step_time = GaugeMetricFamily("halos_job_step_seconds", "Wall time of the last optimizer step", labels=labels)
        tokens = GaugeMetricFamily("halos_job_tokens_per_second", "Training tokens/s of the last step", labels=labels)
        since = GaugeMetricFamily(
            "halos_job_seconds_since_last_step",
            "Seconds since the running job's last step (or its start): a stuck trainer grows",
            labels=labels,
        )
        rows = session.exec(
            select(  # type: ignore[call-overload]  # sqlmodel's select() is typed for at most 4 columns
                Job.id, Job.step, Job.latest_metrics, Job.started_at, Round.run_id
            )
            .join(Round, Round.job_id == Job.id, isouter=True)
            .where(Job.status == JobStatus.running)
        ).all()
        now = time.time()
        for job_id, job_step, latest, started_at, run_id in rows:
            lv = [job_id, run_id or ""]
            step.add_metric(lv, job_step or 0)
            latest = latest or {}
            if (tps := _float(latest.get("tokens_per_s"))) is not None:
                tokens.add_metric(lv, tps)
            last = session.exec(
                select(MetricPoint.data, MetricPoint.created_at)
                .where(MetricPoint.job_id == job_id, MetricPoint.split == "train")
                .order_by(col(MetricPoint.id).desc())
                .limit(2)
            ).all()
            if len(last) == 2:
                (d1, _), (d0, _) = last
                t1, t0 = _float((d1 or {}).get("time")), _float((d0 or {}).get("time"))
                s1, s0 = _float((d1 or {}).get("step")), _float((d0 or {}).get("step"))
                if t1 is not None and t0 is not None and s1 is not None and s0 is not None and s1 > s0:
                    step_time.add_metric(lv, (t1 - t0) / (s1 - s0))
            if last:
                t_last = _float((last[0][0] or {}).get("time")) or _aware(last[0][1]).timestamp()
            else:
                t_last = _aware(started_at).timestamp() if started_at else now
            since.add_metric(lv, max(0.0, now - t_last))
        yield from (step, step_time, tokens, since)

    def _storage(self, session: Session) -> Iterator[Metric]:
        yield from _storage_metrics(session, self.settings)

    def _webhooks(self, session: Session) -> Iterator[Metric]:
        deliveries = GaugeMetricFamily("halos_webhook_deliveries", "Webhook deliveries by status", labels=["status"])
        counts = dict(
            session.exec(select(OutboundDelivery.status, func.count()).group_by(OutboundDelivery.status)).all()
        )
        for status in ("pending", "delivered", "failed"):
            deliveries.add_metric([status], counts.get(status, 0))
        yield deliveries
        failures = session.exec(
            select(func.count()).select_from(WebhookAttempt).where(col(WebhookAttempt.ok).is_(False))
        ).one()
        yield CounterMetricFamily("halos_webhook_delivery_failures", "Failed webhook delivery attempts", value=failures)


def _storage_metrics(session: Session, settings: Settings) -> Iterator[Metric]:
    """Bytes on disk by project and kind (measured; cached for usage.GAUGE_TTL_S), the shared
    reference cache, and the data dir's free space."""
    from server.storage_lifecycle import files, usage

    by_kind = GaugeMetricFamily(
        "halos_storage_bytes", "Bytes in the data dir by project and kind (GET /v1/usage)", labels=["project", "kind"]
    )
    for project, kinds in usage.all_usage(session, settings).items():
        for kind, n in sorted(kinds.items()):
            by_kind.add_metric([project, kind], n)
    yield by_kind
    yield GaugeMetricFamily(
        "halos_reference_cache_bytes",
        "Bytes of the reference log-prob cache (capped by HALOS_REFERENCE_CACHE_MAX_BYTES)",
        value=files.tree_bytes(settings.reference_cache_dir),
    )
    yield GaugeMetricFamily(
        "halos_data_dir_free_bytes",
        "Free bytes on the data dir's filesystem",
        value=files.free_bytes(settings.data_dir),
    )


def _aware(when: Any) -> Any:
    return when if when is None or when.tzinfo is not None else when.replace(tzinfo=UTC)


def build_registry(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # the sum over every process of this host
    else:
        for collector in (REQUESTS, LATENCY):
            registry.register(collector)
    registry.register(DatabaseCollector(settings))
    return registry


def router(settings: Settings) -> APIRouter:
    registry = build_registry(settings)
    api = APIRouter(tags=["operations"])

    @api.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        """Prometheus exposition format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return api

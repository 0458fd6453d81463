"""The tracking exporter: copies each tracked run's metric points and lineage to MLflow / W&B.

A loop run by `halos serve` and `halos worker` (beside the sweeper; `tracking_enabled`). It reads
the database, never a runner's memory, so it is independent of which worker trains a round and
survives restarts. One tracking run per server run, across all rounds and retries: its id is
stored on the run's `TrackingLink` the first time and resumed afterwards.

No point twice: a point is exported only once it is final — a retry resumes from the latest
complete checkpoint and redoes the steps after it, so the steps up to the last
`job.checkpoint_saved` of a live job are final, and every step of a finished job is (the latest
attempt's value of each (step, split), as `GET /v1/jobs/{id}/metrics` shows). Each job's last
exported step is committed after the backend accepted the points; for the window between the two,
the MLflow backend reads back which (metric, step) pairs the run already has and skips them. W&B
drops any step below the run's current step by itself, but an offline run cannot be read back:
after a crash in that window its next process may log one batch again (documented in the README).

Several processes may run the loop: a link is claimed for a pass with a conditional UPDATE of its
`updated_at` (not touched for half an interval), so one process exports a run at a time; every
pass starts from the committed watermarks, so passes of different processes never repeat a point.
(With W&B each process that exports a run appends its own resumed segment; to keep one, leave
`HALOS_TRACKING_ENABLED=true` on one process only.)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from halos_client.event_models import EventType
from server.db import get_engine
from server.models import TERMINAL_STATUSES, Event, Job, JobStatus, MetricPoint, Round, Run, TrackingLink, utcnow
from server.settings import Settings, get_settings

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class Point:
    step: int
    split: str
    values: dict[str, float]  # numeric metrics only
    timestamp_ms: int


class Backend(Protocol):
    def open(self, link: TrackingLink, run: Run, settings: Settings) -> str: ...
    def log(self, points: list[Point]) -> None: ...
    def set_lineage(self, tags: dict[str, str]) -> None: ...
    def close(self) -> None: ...


def _backend(name: str) -> Backend:
    if name == "mlflow":
        from server.tracking.mlflow_backend import MlflowBackend

        return MlflowBackend()
    if name == "wandb":
        from server.tracking.wandb_backend import WandbBackend

        return WandbBackend()
    raise ValueError(f"unknown tracking backend {name!r}")


def final_step(session: Session, job: Job) -> float:
    """Steps up to this one will not be redone by a retry."""
    status = JobStatus(job.status)
    if status in TERMINAL_STATUSES:
        return float("inf")
    if status == JobStatus.waiting:
        return -1
    saved = session.exec(
        select(Event.data).where(Event.job_id == job.id, Event.type == EventType.job_checkpoint_saved.value)
    ).all()
    return max((int((d or {}).get("step") or 0) for d in saved), default=-1)


def final_points(session: Session, job: Job, after: int) -> list[Point]:
    upto = final_step(session, job)
    if upto <= after:
        return []
    rows = session.exec(
        select(MetricPoint)
        .where(MetricPoint.job_id == job.id, MetricPoint.step > after)
        .order_by(col(MetricPoint.step), col(MetricPoint.attempt), col(MetricPoint.id))
    ).all()
    latest: dict[tuple[int, str], MetricPoint] = {}
    for row in rows:
        if row.step <= upto:
            latest[(row.step, row.split)] = row  # ascending attempt: the last attempt's point wins
    order = {"train": 0, "eval": 1}
    out = []
    for (step, split), row in sorted(latest.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 2), kv[0][1])):
        values = {
            k: float(v)
            for k, v in (row.data or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "split", "time")
        }
        out.append(Point(step, split, values, int(row.created_at.timestamp() * 1000)))
    return out


def lineage_tags(session: Session, run: Run, rounds: list[Round], jobs: dict[str, Job]) -> dict[str, str]:
    tags = {"halos.run_id": run.id, "halos.model_id": run.model_id, "halos.loss": str((run.loss or {}).get("name"))}
    for r in rounds:
        job = jobs[r.job_id]
        prefix = f"halos.round.{r.index}"
        tags |= {
            f"{prefix}.round_id": r.id,
            f"{prefix}.job_id": r.job_id,
            f"{prefix}.status": JobStatus(job.status).value,
            f"{prefix}.parent_checkpoint_id": r.parent_checkpoint_id or "sft",
            f"{prefix}.feedback_ids": ",".join(r.feedback_ids or []),
        }
        if r.checkpoint_id:
            tags[f"{prefix}.checkpoint_id"] = r.checkpoint_id
    return tags


class Exporter:
    """Keeps each link's backend open between passes (a W&B run stays one process segment)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.backends: dict[int, Backend] = {}
        self.owner = f"exporter-{id(self)}"

    def close(self) -> None:
        for backend in self.backends.values():
            try:
                backend.close()
            except Exception:
                log.warning("closing a tracking run failed", exc_info=True)
        self.backends.clear()

    def export_once(self) -> int:
        """One pass over every link; returns how many points were exported."""
        engine = get_engine(self.settings)
        with Session(engine, expire_on_commit=False) as session:
            link_ids = [i for i in session.exec(select(TrackingLink.id)).all() if i is not None]  # primary keys
            session.commit()
        total = 0
        for link_id in link_ids:
            with Session(engine, expire_on_commit=False) as session:
                try:
                    total += self._export_link(session, link_id)
                except Exception as exc:
                    session.rollback()
                    log.warning("tracking export of link %s failed: %s", link_id, exc)
                    self.backends.pop(link_id, None)
                    session.exec(
                        update(TrackingLink)
                        .where(col(TrackingLink.id) == link_id)
                        .values(last_error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
                    )
                    session.commit()
        return total

    def _claim(self, session: Session, link_id: int) -> bool:
        now = utcnow()
        stale = now - timedelta(seconds=self.settings.tracking_interval_s / 2)
        claimed = (
            session.exec(
                update(TrackingLink)
                .where(
                    col(TrackingLink.id) == link_id,
                    or_(col(TrackingLink.updated_at) <= stale, col(TrackingLink.updated_at).is_(None)),
                )
                .values(updated_at=now)
            ).rowcount
            == 1
        )
        session.commit()
        return claimed

    def _export_link(self, session: Session, link_id: int) -> int:
        if not self._claim(session, link_id):
            return 0
        link = session.get(TrackingLink, link_id)
        run = session.get(Run, link.run_id) if link else None
        if link is None or run is None:
            session.commit()
            return 0
        rounds = list(session.exec(select(Round).where(Round.run_id == run.id).order_by(col(Round.index))).all())
        jobs = {j.id: j for j in session.exec(select(Job).where(col(Job.id).in_([r.job_id for r in rounds]))).all()}
        exported: dict[str, Any] = dict(link.exported or {})
        steps: dict[str, int] = dict(exported.get("steps") or {})
        batches = [(r.job_id, final_points(session, jobs[r.job_id], steps.get(r.job_id, -1))) for r in rounds]
        tags = lineage_tags(session, run, rounds, jobs)
        session.commit()  # no transaction is held while the backend is called
        new = [(job_id, pts) for job_id, pts in batches if pts]
        if not new and exported.get("tags") == tags and link.tracking_run_id:
            return 0
        backend = self.backends.get(link_id)
        if backend is None:
            backend = _backend(link.backend)
            tracking_run_id = backend.open(link, run, self.settings)
            self.backends[link_id] = backend
            if tracking_run_id != link.tracking_run_id:  # stored at once: every later process resumes it
                session.exec(
                    update(TrackingLink).where(col(TrackingLink.id) == link_id).values(tracking_run_id=tracking_run_id)
                )
                session.commit()
        n = 0
        for job_id, pts in new:
            backend.log(pts)
            steps[job_id] = max(p.step for p in pts)
            n += len(pts)
        backend.set_lineage(tags)
        session.exec(
            update(TrackingLink)
            .where(col(TrackingLink.id) == link_id)
            .values(exported={"steps": steps, "tags": tags}, last_error=None, updated_at=utcnow())
        )
        session.commit()
        if all(JobStatus(j.status) in TERMINAL_STATUSES for j in jobs.values()):
            backend.close()  # a later round resumes the same tracking run
            self.backends.pop(link_id, None)
        return n


def run_forever(settings: Settings | None = None, stop_event: threading.Event | None = None) -> None:
    settings = settings or get_settings()
    stop_event = stop_event or threading.Event()
    exporter = Exporter(settings)
    try:
        while not stop_event.is_set():
            try:
                exporter.export_once()
            except Exception:
                log.exception("tracking export pass failed")
            stop_event.wait(settings.tracking_interval_s)
    finally:
        exporter.close()


def start_thread(
    settings: Settings | None = None, stop_event: threading.Event | None = None
) -> tuple[threading.Thread, threading.Event]:
    stop_event = stop_event or threading.Event()
    thread = threading.Thread(target=run_forever, args=(settings, stop_event), name="halos-tracking", daemon=True)
    thread.start()
    return thread, stop_event

"""`JobOut.percent_done / elapsed_s / eta_s`: from the job's start and the current attempt's step times.

Through the real state machine (claim, record_progress, a lease expiry and a retry that backfills
a line of the crashed attempt) and the real API, plus the edge cases of `jobs_view.timing`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from server import jobs
from server.models import Job, JobStatus, MetricPoint
from server.services.jobs_view import timing


def _train(step: int, at: datetime, total: int = 10, round_step: int | None = None) -> dict:
    return {
        "step": step,
        "round_step": step if round_step is None else round_step,
        "total_steps": total,
        "examples": step * 4,
        "loss": 1.0 / step,
        "time": at.timestamp(),
    }


def test_timing_through_a_crash_and_a_retry(client: TestClient, session: Session, run: dict, pairwise_fb: dict) -> None:
    rnd = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [pairwise_fb["id"]]}).json()
    job_id = rnd["job_id"]
    queued = client.get(f"/v1/jobs/{job_id}").json()
    assert (queued["percent_done"], queued["elapsed_s"], queued["eta_s"]) == (None, None, None)

    t0 = datetime.now(UTC) - timedelta(seconds=3000)
    first = jobs.claim(session, job_id, "host", 1, 60, now=t0)
    assert first is not None
    # attempt 1: a step every second, then it dies after step 4
    jobs.record_progress(
        session, job_id, first.lease_token, [_train(s, t0 + timedelta(seconds=10 + s)) for s in (1, 2, 3, 4)]
    )
    running = client.get(f"/v1/jobs/{job_id}").json()
    assert running["status"] == "running" and running["percent_done"] == 40.0
    assert running["eta_s"] == pytest.approx(6 * 1.0 - 1.0)  # 6 steps left at 1 s/step, minus ≤ one step since
    assert running["elapsed_s"] == pytest.approx(3000, abs=30)

    assert jobs.expire_leases(session, now=t0 + timedelta(seconds=1000))
    retried = client.get(f"/v1/jobs/{job_id}").json()
    assert retried["status"] == "queued" and retried["eta_s"] is None and retried["percent_done"] == 40.0

    second = jobs.claim(session, job_id, "host", 2, 60, now=t0 + timedelta(seconds=2000))
    assert second is not None and second.attempt == 2
    # The retry first backfills the line attempt 1 wrote for step 5 but never recorded (logged at
    # t0+15, before this attempt began: it must not count towards the pace) ...
    jobs.record_progress(
        session, job_id, second.lease_token, [_train(5, t0 + timedelta(seconds=15))], skip_recorded=True
    )
    # ... then trains on at 2 s/step
    jobs.record_progress(
        session, job_id, second.lease_token, [_train(s, t0 + timedelta(seconds=2000 + 2 * s)) for s in (6, 7, 8)]
    )
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["attempt"] == 2 and job["percent_done"] == 80.0
    # 2 steps left at 2 s/step; the last step is long past, so at most one step's time is taken off
    assert job["eta_s"] == pytest.approx(2 * 2.0 - 2.0)
    assert job["elapsed_s"] == pytest.approx(3000, abs=30)  # from the FIRST attempt's start
    listed = {j["id"]: j for j in client.get("/v1/jobs").json()["items"]}
    assert listed[job_id]["eta_s"] == job["eta_s"] and listed[job_id]["percent_done"] == 80.0


def _job(status: JobStatus, **kw) -> Job:
    return Job(id="job_x", project_id="prj_x", status=status, attempt=kw.pop("attempt", 1), **kw)


def _point(step: int, at: datetime, attempt: int = 1, total: int = 10) -> MetricPoint:
    return MetricPoint(job_id="job_x", attempt=attempt, step=step, split="train", data=_train(step, at, total))


NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_succeeded_failed_and_cancelled() -> None:
    started, finished = NOW - timedelta(seconds=100), NOW - timedelta(seconds=40)
    done = timing(
        _job(JobStatus.succeeded, started_at=started, finished_at=finished, round_step=10, total_steps=10), NOW
    )
    assert (done.percent_done, done.elapsed_s, done.eta_s) == (100.0, 60.0, 0.0)
    failed = timing(_job(JobStatus.failed, started_at=started, finished_at=finished, round_step=3, total_steps=10), NOW)
    assert (failed.percent_done, failed.elapsed_s, failed.eta_s) == (30.0, 60.0, None)
    never = timing(_job(JobStatus.cancelled, finished_at=finished), NOW)  # cancelled while queued
    assert (never.percent_done, never.elapsed_s, never.eta_s) == (None, None, None)


def test_eta_needs_two_timed_steps_of_this_attempt() -> None:
    job = _job(JobStatus.running, started_at=NOW - timedelta(seconds=50), round_step=1, total_steps=10)
    one = timing(job, NOW, NOW - timedelta(seconds=50), [_point(1, NOW - timedelta(seconds=1))])
    assert one.eta_s is None and one.percent_done == 10.0 and one.elapsed_s == 50.0
    none_yet = timing(job, NOW, NOW - timedelta(seconds=50), [])
    assert none_yet.eta_s is None


def test_eta_counts_down_between_steps_but_not_past_one_step() -> None:
    start = NOW - timedelta(seconds=60)
    job = _job(JobStatus.running, started_at=start, round_step=4, total_steps=10)
    points = [_point(s, NOW - timedelta(seconds=40 - 4 * s)) for s in (2, 3, 4)]  # 4 s/step; step 4 at NOW-24
    stalled = timing(job, NOW, start, points)
    assert stalled.eta_s == pytest.approx(6 * 4.0 - 4.0)  # 24 s since the last step: only 4 s taken off
    fresh = timing(job, NOW - timedelta(seconds=23), start, points)  # 1 s after step 4
    assert fresh.eta_s == pytest.approx(6 * 4.0 - 1.0)


def test_cancelling_has_no_eta() -> None:
    start = NOW - timedelta(seconds=60)
    job = _job(JobStatus.cancelling, started_at=start, round_step=4, total_steps=10)
    points = [_point(s, NOW - timedelta(seconds=10 - s)) for s in (2, 3, 4)]
    assert timing(job, NOW, start, points).eta_s is None

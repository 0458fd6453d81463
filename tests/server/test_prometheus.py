"""`GET /metrics`: no key needed, Prometheus text format; series computed from the database (the
same in every API process) and per-process request counts by route template; can be disabled."""

from __future__ import annotations

import time
from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server import jobs
from server.app import create_app
from server.models import utcnow
from tests.server._seed import seed_project


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_from_the_database_and_requests_by_route(client, anon, session, settings, tmp_path):
    seeded = seed_project(client, session, settings, tmp_path / "seed", tag="prom")
    # a running job that made two steps 1.5 s apart, its last one 20 s ago (a stalled trainer shows)
    now = time.time()
    claim = jobs.claim(session, seeded.queued_job_id, "h", 1, 60)
    jobs.record_progress(
        session,
        seeded.queued_job_id,
        claim.lease_token,
        [
            {"step": 5, "time": now - 21.5, "tokens_per_s": 100.0, "loss": 0.5},
            {"step": 6, "time": now - 20.0, "tokens_per_s": 120.0, "loss": 0.4},
        ],
    )
    # a second round whose lease expires: one lease expiry, one retry
    r3 = client.post(f"/v1/runs/{seeded.run_id}/rounds", json={"feedback_ids": [seeded.feedback_id]}).json()
    jobs.finish(
        session, seeded.queued_job_id, claim.lease_token, jobs.Outcome("failed", error="x")
    )  # round 3 was waiting on round 2: it fails too
    r4_job = client.post(
        f"/v1/runs/{seeded.run_id}/rounds",
        json={"feedback_ids": [seeded.feedback_id], "parent_checkpoint_id": seeded.checkpoint_id},
    )
    assert r4_job.status_code == 201, r4_job.text
    job4 = r4_job.json()["job_id"]
    jobs.claim(session, job4, "h", 1, 1, now=utcnow() - timedelta(minutes=5))
    jobs.expire_leases(session, utcnow(), retry_backoff_s=0)
    claim4 = jobs.claim(session, job4, "h", 1, 60)
    jobs.record_progress(
        session,
        job4,
        claim4.lease_token,
        [
            {"step": 5, "time": now - 21.5, "tokens_per_s": 100.0},
            {"step": 6, "time": now - 20.0, "tokens_per_s": 120.0},
        ],
    )
    assert r3["status"] == "waiting"
    client.get(f"/v1/jobs/{seeded.done_job_id}")

    resp = anon.get("/metrics")  # no API key
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    s = _samples(resp.text)
    assert s[("halos_jobs", (("status", "running"),))] == 1
    assert s[("halos_jobs", (("status", "succeeded"),))] == 2  # seeded: round 1 and the reward model's round
    assert s[("halos_jobs", (("status", "failed"),))] == 2
    assert s[("halos_queue_depth", ())] == 0
    assert s[("halos_lease_expiries_total", ())] == 1 and s[("halos_retries_total", ())] == 1
    assert s[("halos_attempts_total", (("outcome", "crashed"),))] == 1
    labels = (("job_id", job4), ("run_id", seeded.run_id))
    assert s[("halos_job_step", labels)] == 6
    assert abs(s[("halos_job_step_seconds", labels)] - 1.5) < 1e-6
    assert s[("halos_job_tokens_per_second", labels)] == 120.0
    assert 19 < s[("halos_job_seconds_since_last_step", labels)] < 60
    assert s[("halos_webhook_deliveries", (("status", "pending"),))] >= 1
    assert ("halos_webhook_delivery_failures_total", ()) in s
    # per-process request metrics by route template, never by raw id
    key = ("halos_http_requests_total", (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "200")))
    assert s[key] >= 1
    assert not any(seeded.done_job_id in str(k) for k in s if k[0].startswith("halos_http"))


def test_queue_depth_and_age_and_disabled(client, session, settings, tmp_path):
    seeded = seed_project(client, session, settings, tmp_path / "seed", tag="q")
    time.sleep(0.2)
    s = _samples(client.get("/metrics").text)
    assert s[("halos_queue_depth", ())] == 1  # round 2, queued behind round 1's checkpoint
    assert s[("halos_queue_oldest_age_seconds", ())] >= 0.2
    off = settings.model_copy(update={"metrics_enabled": False})
    with TestClient(create_app(off)) as c:
        assert c.get("/metrics").status_code == 404
    assert seeded.queued_job_id

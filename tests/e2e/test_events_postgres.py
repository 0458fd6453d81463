"""Postgres + Redis with two API processes (each with its own sweeper and webhook dispatcher):

- an event stream opened on API process 2 follows a job created and cancelled through process 1
  (the stream reads the database, not a process's memory) and ends with the job;
- the two dispatchers share one outbox: every delivery reaches the receiver exactly once (claims
  with FOR UPDATE SKIP LOCKED and a lease), signed and verifiable.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from httpx_sse import connect_sse

from halos_core.synthetic import pairwise_records, to_jsonl_bytes
from tests.e2e.conftest import PG_ADMIN, REDIS_URL, Deployment, free_port
from tests.server._receiver import Receiver
from tests.server.conftest import make_model_dir

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
REDIS_DB = 12  # the other e2e tests use 11


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_stream_and_outbox_across_two_api_processes(tmp_path: Path):
    db = f"halos_events_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], check=True, capture_output=True)
    receiver = Receiver().start()
    dep = Deployment(
        tmp_path / "data",
        {
            "HALOS_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{db}",
            "HALOS_BROKER_URL": f"{REDIS_URL}/{REDIS_DB}",
            "HALOS_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.1/32",
            "HALOS_WEBHOOK_DISPATCH_INTERVAL_S": "0.1",
            "HALOS_WEBHOOK_BATCH_SIZE": "2",  # small batches: both dispatchers take part
            "HALOS_EVENTS_POLL_INTERVAL_S": "0.2",
        },
    )
    try:
        dep.halos("migrate")
        dep.key = dep.halos("keys", "create", "--project", "pg").strip()
        port2 = free_port()
        dep.spawn("serve", "--no-worker", "--port", str(dep.port), log_name="api-1.log")
        dep.spawn("serve", "--no-worker", "--no-migrate", "--port", str(port2), log_name="api-2.log")
        dep.wait_ready()
        api1 = dep.client()
        api2 = httpx.Client(
            base_url=f"http://127.0.0.1:{port2}", timeout=60, headers={"Authorization": f"Bearer {dep.key}"}
        )
        _wait(lambda: _ready(api2), 60, "API process 2")
        hook = api1.post("/v1/webhooks", json={"url": receiver.url, "event_types": ["*"]}).json()
        receiver.secret = hook["secret"]

        fb_ids = [
            api1.post(
                "/v1/feedback",
                content=to_jsonl_bytes(pairwise_records(8, seed=s)),
                headers={"Content-Type": "application/x-ndjson"},
            ).json()["id"]
            for s in range(6)
        ]
        model = api1.post(
            "/v1/models", json={"name": "sft", "path": str(make_model_dir(tmp_path / "data" / "models" / "sft"))}
        ).json()
        run = api1.post(
            "/v1/runs",
            json={
                "model_id": model["id"],
                "loss": {"name": "dpo", "beta": 0.1},
                "hyperparams": {"batch_size": 2, "microbatch_size": 2},
            },
        ).json()
        job_id = api1.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": fb_ids[:1]}).json()["job_id"]

        messages: list[tuple[str, dict]] = []

        def follow() -> None:
            with connect_sse(api2, "GET", f"/v1/jobs/{job_id}/events/stream") as src:
                for sse in src.iter_sse():
                    if sse.data:
                        messages.append((sse.event, json.loads(sse.data)))
                        if sse.event == "end":
                            return

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        _wait(lambda: any(e == "job.queued" for e, _ in messages), 30, "the queued event on process 2")
        assert api1.post(f"/v1/jobs/{job_id}/cancel").status_code == 202  # through process 1
        reader.join(30)
        assert [e for e, _ in messages] == ["job.queued", "job.cancelled", "end"]
        assert [d for _, d in messages[:2]] == api1.get(f"/v1/jobs/{job_id}/events").json()["items"]

        expected = 6 + 2  # six feedback.stored, job.queued, job.cancelled
        deliveries = _wait(
            lambda: (
                (ds := api2.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"])
                and len(ds) == expected
                and all(d["status"] == "delivered" for d in ds)
                and ds
            ),
            60,
            f"every delivery delivered\n{dep.logs()}",
        )
        assert sorted(r.webhook_id for r in receiver.raw) == sorted(d["id"] for d in deliveries)  # once each
        assert all(r.verified for r in receiver.raw) and receiver.duplicates == []
        assert all(d["attempts"] == 1 for d in deliveries)
    finally:
        dep.stop()
        receiver.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False

"""S4 end to end: a real `halos serve` delivers signed webhooks to a real receiver on 127.0.0.1
(allowed by HALOS_WEBHOOK_ALLOWED_NETWORKS), the receiver fails for a while, the server is
SIGKILLed mid-retry — once while a delivery's request is in flight — and restarted: every event
is delivered and verifies, and exactly once as seen by the receiver's dedup on `webhook-id`
(the in-flight one arrives twice with the same id and body)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from halos_core.synthetic import pairwise_records, to_jsonl_bytes
from tests.e2e.conftest import Deployment
from tests.server._receiver import Receiver

pytestmark = pytest.mark.e2e


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_deliveries_survive_a_killed_server(tmp_path: Path):
    receiver = Receiver(mode="fail", hang_s=8).start()
    dep = Deployment(
        tmp_path / "data",
        {
            "HALOS_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.1/32",
            "HALOS_WEBHOOK_BACKOFF_S": "0.3",
            "HALOS_WEBHOOK_BACKOFF_MAX_S": "1",
            "HALOS_WEBHOOK_DISPATCH_INTERVAL_S": "0.2",
            "HALOS_WEBHOOK_LEASE_S": "3",  # a claim of the killed server is taken over after this
            "HALOS_WEBHOOK_TIMEOUT_S": "20",
        },
    )
    dep.env.pop("HALOS_DATABASE_URL", None)
    dep.env.pop("HALOS_BROKER_URL", None)
    try:
        dep.halos("migrate")
        dep.key = dep.halos("keys", "create", "--project", "hooks").strip()
        server = dep.spawn("serve", "--no-worker", "--port", str(dep.port), log_name="serve-1.log")
        dep.wait_ready()
        client = dep.client()
        hook = client.post("/v1/webhooks", json={"url": receiver.url, "event_types": ["*"]}).json()
        receiver.secret = hook["secret"]

        # events: three stored feedback files, a round queued (no worker) and cancelled
        fb_ids = []
        for seed in range(3):
            resp = client.post(
                "/v1/feedback",
                content=to_jsonl_bytes(pairwise_records(8, seed=seed)),
                headers={"Content-Type": "application/x-ndjson"},
            )
            assert resp.status_code == 201, resp.text
            fb_ids.append(resp.json()["id"])
        model_dir = tmp_path / "data" / "models" / "sft"  # under the default model root
        from tests.server.conftest import make_model_dir

        make_model_dir(model_dir)
        model = client.post("/v1/models", json={"name": "sft", "path": str(model_dir)}).json()
        run = client.post(
            "/v1/runs",
            json={
                "model_id": model["id"],
                "loss": {"name": "dpo", "beta": 0.1},
                "hyperparams": {"batch_size": 2, "microbatch_size": 2},
            },
        ).json()
        rnd = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": fb_ids[:1]})
        assert rnd.status_code == 201, rnd.text
        assert client.post(f"/v1/jobs/{rnd.json()['job_id']}/cancel").status_code == 202

        def deliveries() -> list[dict]:
            return client.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"limit": 200}).json()["items"]

        _wait(
            lambda: len(deliveries()) == 5 and all(d["attempts"] >= 2 for d in deliveries()),
            60,
            "every delivery to have failed twice",
        )
        assert {d["type"] for d in deliveries()} == {"feedback.stored", "job.queued", "job.cancelled"}

        # the next request is accepted by the receiver but answered late: kill the server meanwhile
        receiver.mode = "hang"
        assert receiver.hung.wait(30), "no retry arrived"
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        in_flight = receiver.hung_id
        assert in_flight in receiver.accepted

        receiver.mode = "ok"
        dep.spawn("serve", "--no-worker", "--port", str(dep.port), log_name="serve-2.log")
        dep.wait_ready()
        final = _wait(
            lambda: (ds := deliveries()) and all(d["status"] == "delivered" for d in ds) and ds,
            60,
            f"every delivery delivered after the restart\n{dep.logs()}",
        )

        ids = {d["id"] for d in final}
        assert set(receiver.accepted) == ids  # each event delivered, exactly once after dedup
        # every complete request verifies (one cut short by the kill is no request: the receiver drops it)
        assert all(r.verified for r in receiver.raw), [(r.error, r.body) for r in receiver.raw if not r.verified]
        assert receiver.truncated <= len(ids), receiver.truncated  # at most the deliveries in flight at the kill
        for webhook_id in ids:  # every attempt of a delivery carried the same body
            assert len({r.body for r in receiver.raw if r.webhook_id == webhook_id}) == 1
        assert receiver.duplicates == [in_flight]  # the in-flight one was re-sent after the restart
        by_id = {d["id"]: d for d in final}
        log = by_id[in_flight]["log"]
        assert [a["status_code"] for a in log][:2] == [500, 500] and log[-1]["ok"]
        feedback_bodies = [
            httpx.Response(200, content=receiver.accepted[i]).json()
            for i in ids
            if by_id[i]["type"] == "feedback.stored"
        ]
        assert sorted(b["data"]["feedback_id"] for b in feedback_bodies) == sorted(fb_ids)
    finally:
        dep.stop()
        receiver.stop()

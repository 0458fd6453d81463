"""Seed one project with one real object of every kind the API exposes by id, through the API and
the job state machine (not by writing rows behind the server's back):

feedback file, registered model, run, round 1 (its job claimed and succeeded, so it has a
checkpoint, metric points and a log file), round 2 chained on round 1 (queued, so it can still be
cancelled), two webhook endpoints and a delivery, a prompt set, a samples file (kind `sampled`)
and a Label Studio integration. Used by the schemathesis test (so generated ids can resolve) and the isolation matrix
(so project A probes project B's *real* ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import Session

from halos_core.synthetic import pairwise_records
from server.models import Job, MetricPoint
from server.services.jobs_view import log_path
from server.settings import Settings
from tests.server.conftest import SMALL_HP, make_model_dir, round_checkpoint_id, upload_ok, work_job


@dataclass
class Seeded:
    project: str
    feedback_id: str
    model_id: str
    run_id: str
    round_ids: list[str]
    done_job_id: str  # round 1: succeeded, with metrics, a log and a checkpoint
    queued_job_id: str  # round 2: queued behind round 1's checkpoint (cancellable)
    checkpoint_id: str
    model_dir: Path
    webhook_id: str = ""  # a webhook endpoint subscribed to everything
    delivery_id: str = ""  # its (pending) delivery of the feedback file's `feedback.stored` event
    prompt_set_id: str = ""
    samples_id: str = ""  # a feedback file of kind `sampled` (what sampling jobs make)
    integration_id: str = ""  # a Label Studio integration (pairwise config), one annotation in its draft
    integration_secret: str = ""
    reward_checkpoint_id: str = ""  # a bradley_terry round's checkpoint (a reward head)
    reward_run_ids: list[str] = field(default_factory=list)  # its run, round and job
    extra: dict[str, str] = field(default_factory=dict)

    def ids(self) -> set[str]:
        """Every server id of this project's objects."""
        return {
            self.feedback_id,
            self.model_id,
            self.run_id,
            self.done_job_id,
            self.queued_job_id,
            self.checkpoint_id,
            self.webhook_id,
            self.delivery_id,
            self.prompt_set_id,
            self.samples_id,
            self.integration_id,
            self.reward_checkpoint_id,
            *self.reward_run_ids,
            *self.round_ids,
            *self.extra.values(),
        }

    def id_for(self, param: str, path: str = "") -> str | None:
        """This project's real id for a path/body parameter name (None: no such kind here); `path`:
        the route, where one needs a particular object of the kind (Label Studio tasks: samples)."""
        if param == "feedback_id" and path.endswith("/labelstudio-tasks"):
            return self.samples_id
        return {
            "feedback_id": self.feedback_id,
            "model_id": self.model_id,
            "run_id": self.run_id,
            "job_id": self.queued_job_id,
            "checkpoint_id": self.checkpoint_id,
            "parent_checkpoint_id": self.checkpoint_id,
            "round_id": self.round_ids[0],
            "webhook_id": self.webhook_id,
            "delivery_id": self.delivery_id,
            "prompt_set_id": self.prompt_set_id,
            "samples_id": self.samples_id,
            "reward_model_checkpoint_id": self.reward_checkpoint_id,
            "integration_id": self.integration_id,
        }.get(param)


# One annotation as Label Studio delivered it (recorded, tests/loop/test_labelstudio.py)
LABEL_STUDIO_DELIVERY = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "labelstudio" / "webhooks_pairwise.json").read_text()
)[0]["payload"]


def _jsonl(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _ok(resp, status: int = 201) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()


def seed_project(
    client: TestClient, session: Session, settings: Settings, root: Path, *, tag: str, seed: int = 0
) -> Seeded:
    """`client` is authenticated as the project to seed; `root` a fresh directory for its files."""
    hook = _ok(client.post("/v1/webhooks", json={"url": f"https://hooks.example.com/{tag}", "event_types": ["*"]}))
    spare = _ok(
        client.post(
            "/v1/webhooks", json={"url": f"https://hooks.example.com/{tag}/spare", "event_types": ["job.finished"]}
        )
    )
    fb = upload_ok(client, pairwise_records(8, seed=seed + 1))
    delivery = _ok(client.get(f"/v1/webhooks/{hook['id']}/deliveries"), 200)["items"][0]
    model_dir = make_model_dir(root / f"sft-{tag}")
    model = _ok(client.post("/v1/models", json={"name": f"sft-{tag}", "path": str(model_dir)}))
    run = _ok(
        client.post(
            "/v1/runs",
            json={
                "name": f"run-{tag}",
                "model_id": model["id"],
                "loss": {"name": "dpo", "beta": 0.1},
                "hyperparams": SMALL_HP,
            },
        )
    )
    r1 = _ok(client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}))
    work_job(session, r1["job_id"], "succeeded", root / f"ckpt-{tag}-1", step=4, examples=16)
    for step, split, loss in [(1, "train", 0.69), (2, "train", 0.6), (2, "eval", 0.65), (4, "train", 0.5)]:
        session.add(
            MetricPoint(job_id=r1["job_id"], attempt=1, step=step, split=split, data={"loss": loss, "step": step})
        )
    session.commit()
    job = session.get(Job, r1["job_id"])
    session.expunge(job)
    session.rollback()  # never keep a (write-locking, on SQLite) transaction open
    log = log_path(settings, job)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"step {i} loss 0.{69 - i}\n" for i in range(1, 5)))
    checkpoint_id = round_checkpoint_id(session, r1["round_id"])
    r2 = _ok(client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}))
    assert r2["parent_checkpoint_id"] == checkpoint_id and r2["status"] == "queued", r2
    prompts = _ok(
        client.post(
            "/v1/prompts",
            content=_jsonl(
                {"prompt_id": f"{tag}-p{i}", "prompt": [{"role": "user", "content": f"Tell me about topic {i}."}]}
                for i in range(3)
            ),
            headers={"Content-Type": "application/x-ndjson"},
        )
    )
    samples = _ok(
        client.post(
            "/v1/feedback",
            content=_jsonl(
                {
                    "type": "sample",
                    "prompt_id": f"{tag}-p{p}",
                    "sample_id": str(j),
                    "prompt": [{"role": "user", "content": f"Tell me about topic {p}."}],
                    "output": [{"role": "assistant", "content": f"Answer {j} about topic {p} ({tag})."}],
                }
                for p in range(2)
                for j in range(2)
            ),
            headers={"Content-Type": "application/x-ndjson"},
        )
    )
    assert samples["kind"] == "sampled", samples
    integration = _ok(
        client.post("/v1/integrations", json={"tool": "label_studio", "label_config": "pairwise", "name": f"ls-{tag}"})
    )
    delivery_body = json.dumps(LABEL_STUDIO_DELIVERY)
    _ok(
        client.post(
            integration["webhook_path"],
            content=delivery_body,
            headers={"X-Halos-Webhook-Secret": integration["secret"], "Content-Type": "application/json"},
        ),
        200,
    )
    rm_run = _ok(
        client.post(
            "/v1/runs",
            json={
                "name": f"rm-{tag}",
                "model_id": model["id"],
                "loss": {"name": "bradley_terry"},
                "hyperparams": SMALL_HP,
            },
        )
    )
    rm_round = _ok(client.post(f"/v1/runs/{rm_run['id']}/rounds", json={"feedback_ids": [fb["id"]]}))
    work_job(session, rm_round["job_id"], "succeeded", root / f"ckpt-{tag}-rm", loss="bradley_terry", head="reward")
    rm_checkpoint_id = round_checkpoint_id(session, rm_round["round_id"])
    # objects nothing uses, for the DELETE routes (the seeded ones stay for every other operation)
    spare_fb = upload_ok(client, pairwise_records(4, seed=seed + 2))
    spare_ps = _ok(
        client.post(
            "/v1/prompts",
            content=_jsonl({"prompt_id": f"{tag}-spare", "prompt": "A spare prompt."} for _ in range(1)),
            headers={"Content-Type": "application/x-ndjson"},
        )
    )
    spare_model = _ok(
        client.post("/v1/models", json={"name": f"spare-{tag}", "path": str(make_model_dir(root / f"spare-{tag}"))})
    )
    spare_run = _ok(
        client.post("/v1/runs", json={"name": f"spare-{tag}", "model_id": model["id"], "loss": {"name": "dpo"}})
    )
    return Seeded(
        project=tag,
        feedback_id=fb["id"],
        model_id=model["id"],
        run_id=run["id"],
        round_ids=[r1["round_id"], r2["round_id"]],
        done_job_id=r1["job_id"],
        queued_job_id=r2["job_id"],
        checkpoint_id=checkpoint_id,
        model_dir=model_dir,
        webhook_id=hook["id"],
        delivery_id=delivery["id"],
        prompt_set_id=prompts["id"],
        samples_id=samples["id"],
        integration_id=integration["id"],
        integration_secret=integration["secret"],
        reward_checkpoint_id=rm_checkpoint_id,
        reward_run_ids=[rm_run["id"], rm_round["round_id"], rm_round["job_id"]],
        extra={
            "spare_webhook_id": spare["id"],
            "spare_feedback_id": spare_fb["id"],
            "spare_prompt_set_id": spare_ps["id"],
            "spare_model_id": spare_model["id"],
            "spare_run_id": spare_run["id"],
        },
    )

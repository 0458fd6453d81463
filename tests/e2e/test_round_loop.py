"""The round loop end to end: upload → round 1 → round 2 (waiting on round 1) → lineage.

Real `halos serve` / `halos worker` processes, real HTTP, a real Celery worker, a real
`accelerate launch` training subprocess on a tiny locally built Llama. Run once on the embedded
defaults (SQLite + embedded broker) and once on Postgres + Redis with the API and the worker as
separate processes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halos_core.checkpoint import optimizer_state_digest, param_digest
from halos_core.run_dir import tree_sha256
from halos_core.synthetic import pairwise_records, to_jsonl_bytes
from tests.e2e.conftest import embedded_deployment, scaled_out_deployment, wait_for_job

pytestmark = pytest.mark.e2e

HYPERPARAMS = {
    "lr": 5e-4,
    "batch_size": 8,
    "microbatch_size": 4,
    "warmup_steps": 2,
    "max_length": 64,
    "max_prompt_length": 32,
    "checkpoint_every": 2,
}
RECORDS_PER_ROUND = 32  # → 4 optimizer steps per round


def upload(client, seed: int) -> dict:
    body = to_jsonl_bytes(pairwise_records(RECORDS_PER_ROUND, seed=seed, id_prefix="p"))  # same ids in both files
    resp = client.post("/v1/feedback", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert resp.status_code == 201, resp.text
    return resp.json()


def two_rounds(dep, model_dir: Path) -> None:
    client = dep.client()
    model = client.post("/v1/models", json={"name": "tiny", "path": str(model_dir)}).json()
    assert model["sha256"] == tree_sha256(model_dir)
    run = client.post(
        "/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo", "beta": 0.1}, "hyperparams": HYPERPARAMS}
    ).json()
    fb1, fb2 = upload(client, seed=1), upload(client, seed=2)

    # Submit round 2 right behind round 1: it must wait for round 1 and start from its checkpoint.
    r1 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb1["id"]]})
    assert r1.status_code == 201, r1.text
    r2 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb2["id"]]})
    assert r2.status_code == 201, r2.text
    assert client.get(f"/v1/jobs/{r2.json()['job_id']}").json()["status"] in ("waiting", "queued", "running")

    job1 = wait_for_job(client, r1.json()["job_id"])
    job2 = wait_for_job(client, r2.json()["job_id"])
    assert job1["status"] == "succeeded", (job1, dep.logs())
    assert job2["status"] == "succeeded", (job2, dep.logs())

    # Lineage: round 2 → round 1 → the SFT model.
    ckpt1 = client.get(f"/v1/checkpoints/{job1['checkpoint_id']}").json()
    ckpt2 = client.get(f"/v1/checkpoints/{job2['checkpoint_id']}").json()
    assert ckpt2["parent_id"] == ckpt1["id"] and ckpt1["parent_id"] is None
    lineage = client.get(f"/v1/checkpoints/{ckpt2['id']}/lineage").json()
    assert [i["checkpoint_id"] for i in lineage["items"]] == [ckpt2["id"], ckpt1["id"]]
    assert [i["feedback_ids"] for i in lineage["items"]] == [[fb2["id"]], [fb1["id"]]]
    assert lineage["model"]["id"] == model["id"]
    run_view = client.get(f"/v1/runs/{run['id']}").json()
    assert [r["status"] for r in run_view["rounds"]] == ["succeeded", "succeeded"]

    result1 = json.loads((dep.data_dir / "runs" / job1["id"] / "result.json").read_text())
    result2 = json.loads((dep.data_dir / "runs" / job2["id"] / "result.json").read_text())

    # Round 2's optimizer, at load, holds exactly round 1's saved Adam moments and step count.
    saved = torch.load(Path(ckpt1["path"]) / "optimizer.pt", weights_only=True)
    assert result2["restored"]["optimizer_state_digest"] == optimizer_state_digest(saved)
    saved_steps = {int(s["step"]) for s in saved["state"].values()}
    assert saved_steps == {result1["round_step"]} == {result2["restored"]["optimizer_step"]}
    assert "restored" not in result1 or result1["restored"] is None  # round 1: fresh optimizer

    # The reference is the SFT model in both rounds; the policy moved away from it.
    sft_digest = param_digest(load_file(str(model_dir / "model.safetensors")))
    assert result1["reference_param_digest"] == result2["reference_param_digest"] == sft_digest
    final2 = load_file(str(Path(ckpt2["path"]) / "model.safetensors"))
    sft = load_file(str(model_dir / "model.safetensors"))
    assert any(not torch.equal(final2[k], sft[k]) for k in sft)

    # Counters carry on; warmup (2 steps, done in round 1) does not restart in round 2.
    series1 = client.get(f"/v1/jobs/{job1['id']}/metrics").json()["items"]
    series2 = client.get(f"/v1/jobs/{job2['id']}/metrics").json()["items"]
    train1 = [m["data"] for m in series1 if m["split"] == "train"]
    train2 = [m["data"] for m in series2 if m["split"] == "train"]
    assert len(train1) == len(train2) == 4
    assert train1[0]["lr"] < HYPERPARAMS["lr"]  # warming up
    assert all(m["lr"] == pytest.approx(HYPERPARAMS["lr"]) for m in train2)
    assert [m["step"] for m in train2] == [5, 6, 7, 8]
    assert train2[0]["examples"] == train1[-1]["examples"] + HYPERPARAMS["batch_size"]
    for m in train1 + train2:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
    assert (dep.data_dir / "runs" / job2["id"] / "stdout.log").stat().st_size > 0


def test_two_rounds_embedded(tmp_path, tiny_model_dir):
    with embedded_deployment(tmp_path / "data") as dep:
        two_rounds(dep, tiny_model_dir)


@pytest.mark.postgres
def test_two_rounds_postgres_redis(tmp_path, tiny_model_dir):
    with scaled_out_deployment(tmp_path / "data") as dep:
        two_rounds(dep, tiny_model_dir)

"""The run's head (promotion by gate, rollback, the next round continues from the head) and upload
data-quality findings (warnings by default, strict=true ⇒ 422, nothing stored)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import Session

from halos_core.round_result import RoundResult
from halos_core.run_dir import read_manifest
from halos_core.synthetic import pairwise_records
from server import jobs
from server.models import Job
from tests.server.conftest import jsonl, make_checkpoint_dir, round_checkpoint_id, upload, work_job


def _finish_with_eval(session: Session, job_id: str, ckpt_dir: Path, before: dict, after: dict, step: int) -> None:
    session.expire_all()
    claim = jobs.claim(session, job_id, "test-host", 1, 60)
    assert claim is not None
    manifest = make_checkpoint_dir(ckpt_dir, step, step * 4)
    result = RoundResult(
        job_id=job_id,
        final_dir=str(manifest),
        manifest_sha256=read_manifest(manifest).sha256,
        step=step,
        examples=step * 4,
        round_step=2,
        total_steps=2,
        loss="dpo",
        reference_sha256="0" * 64,
        eval=after,
        eval_before=before,
    )
    jobs.finish(session, job_id, claim.lease_token, jobs.Outcome("succeeded", result=result), retry_backoff_s=0)
    session.rollback()


def test_gate_promotion_rollback(client: TestClient, session: Session, run: dict, tmp_path: Path) -> None:
    fb = upload(client, jsonl(pairwise_records(8, seed=1, test_fraction=0.5))).json()
    assert fb["n_test"] > 0
    gate = [{"metric": "rewards/accuracy", "max_drop": 0.05}]
    no_eval = upload(client, jsonl(pairwise_records(8, seed=2))).json()
    err = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [no_eval["id"]], "gate": gate})
    assert err.status_code == 422 and err.json()["error"]["code"] == "gate_without_eval_set"

    r1 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]], "gate": gate}).json()
    r2 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]], "gate": gate}).json()
    assert r2["status"] == "waiting"
    _finish_with_eval(session, r1["job_id"], tmp_path / "ck1", {"rewards/accuracy": 0.5}, {"rewards/accuracy": 0.7}, 4)
    ck1 = round_checkpoint_id(session, r1["round_id"])
    view = client.get(f"/v1/runs/{run['id']}").json()
    assert view["head_checkpoint_id"] == ck1 and view["rounds"][0]["promoted"] is True
    assert [(m["reason"], m["to_checkpoint_id"]) for m in view["head_history"]] == [("promoted", ck1)]
    assert session.get(Job, r2["job_id"]).spec["init_from_checkpoint_id"] == ck1  # continued from the head
    session.rollback()

    # round 2 gets worse than the head on its eval set: succeeded, not promoted, reason recorded
    _finish_with_eval(session, r2["job_id"], tmp_path / "ck2", {"rewards/accuracy": 0.7}, {"rewards/accuracy": 0.6}, 8)
    ck2 = round_checkpoint_id(session, r2["round_id"])
    view = client.get(f"/v1/runs/{run['id']}").json()
    rnd2 = view["rounds"][1]
    assert client.get(f"/v1/jobs/{r2['job_id']}").json()["status"] == "succeeded"
    assert view["head_checkpoint_id"] == ck1 and rnd2["promoted"] is False
    assert "gate failed: rewards/accuracy 0.6 vs the head's 0.7" in rnd2["promotion"]["reason"]
    # both scorings of the eval set are kept, so a client can follow every eval metric of the head
    assert rnd2["promotion"]["eval_before"] == {"rewards/accuracy": 0.7}
    assert rnd2["promotion"]["eval"] == {"rewards/accuracy": 0.6}
    # the next round continues from the head (round 1's checkpoint), not from round 2
    r3 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}).json()
    assert r3["parent_checkpoint_id"] == ck1
    assert session.get(Job, r3["job_id"]).spec["counters"] == {"step": 4, "examples": 16}
    session.rollback()
    work_job(session, r3["job_id"], "failed")
    assert client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}).status_code == 409

    # rollback to round 2's (non-promoted) checkpoint: recorded; the failed round no longer blocks
    assert client.post(f"/v1/runs/{run['id']}/rollback", json={"checkpoint_id": "ckpt_0"}).status_code == 404
    back = client.post(f"/v1/runs/{run['id']}/rollback", json={"checkpoint_id": ck2})
    assert back.status_code == 200 and back.json()["head_checkpoint_id"] == ck2
    assert back.json()["head_history"][-1] | {"created_at": None} == {
        "from_checkpoint_id": ck1,
        "to_checkpoint_id": ck2,
        "reason": "rollback",
        "round_id": None,
        "created_at": None,
    }
    r4 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}).json()
    spec4 = session.get(Job, r4["job_id"]).spec
    assert r4["parent_checkpoint_id"] == ck2 and spec4["init_from"] == str(tmp_path / "ck2")
    assert spec4["counters"] == {"step": 8, "examples": 32}
    session.rollback()
    # back to the SFT model
    sft = client.post(f"/v1/runs/{run['id']}/rollback", json={"checkpoint_id": None}).json()
    assert sft["head_checkpoint_id"] is None
    # a checkpoint of another run ⇒ 404
    other = client.post(
        "/v1/runs", json={"model_id": run["model_id"], "loss": {"name": "dpo"}, "hyperparams": run["hyperparams"]}
    ).json()
    err = client.post(f"/v1/runs/{other['id']}/rollback", json={"checkpoint_id": ck1})
    assert err.status_code == 404 and err.json()["error"]["details"]["field"] == "checkpoint_id"


def test_running_round_not_promoted_after_rollback(
    client: TestClient, session: Session, run: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    r1 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [pairwise_fb["id"]]}).json()
    work_job(session, r1["job_id"], "succeeded", tmp_path / "ck1")
    ck1 = round_checkpoint_id(session, r1["round_id"])
    r2 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [pairwise_fb["id"]]}).json()
    assert client.post(f"/v1/runs/{run['id']}/rollback", json={"checkpoint_id": None}).status_code == 200
    work_job(session, r2["job_id"], "succeeded", tmp_path / "ck2", step=8)
    view = client.get(f"/v1/runs/{run['id']}").json()
    assert view["head_checkpoint_id"] is None and view["rounds"][1]["promoted"] is False
    assert "moved while it ran" in view["rounds"][1]["promotion"]["reason"] and ck1


def test_findings_warn_and_strict(client: TestClient) -> None:
    good = pairwise_records(4, seed=1)
    same = {**good[0], "prompt_id": "same", "output_B": good[0]["output_A"]}
    plain = {**good[1], "prompt_id": "plain", "prompt": "Tell me about the apple."}
    empty = {**good[2], "prompt_id": "empty", "output_A": [{"role": "assistant", "content": ""}]}
    body = jsonl([*good, same, plain, empty, good[3]])
    resp = upload(client, body)
    assert resp.status_code == 201, resp.text
    findings = resp.json()["findings"]
    assert findings["counts"] == {"duplicate_record": 1, "empty_output": 1, "identical_outputs": 1, "string_prompt": 1}
    assert findings["left_out_of_training"] == 1
    first = {e["code"]: e for e in findings["examples"]}
    assert first["identical_outputs"]["index"] == 4 and first["identical_outputs"]["line"] == 5
    assert first["duplicate_record"]["index"] == 7 and "record 3" in first["duplicate_record"]["message"]
    assert client.get(f"/v1/feedback/{resp.json()['id']}").json()["findings"] == findings
    before = client.get("/v1/feedback").json()["items"]
    strict = upload(client, body + b"\n", params={"strict": "true"})
    assert strict.status_code == 422 and strict.json()["error"]["code"] == "invalid_feedback"
    assert {e["code"] for e in strict.json()["error"]["details"]["errors"]} == set(findings["counts"])
    assert client.get("/v1/feedback").json()["items"] == before  # nothing stored
    clean = upload(client, jsonl(good), params={"strict": "true"})
    assert clean.status_code == 201 and clean.json()["findings"] is None

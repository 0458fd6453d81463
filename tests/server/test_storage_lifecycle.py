"""Storage lifecycle (issue 12): retention with pins and a dry run, deletions (409 while in use,
idempotent, project-scoped, finished by the sweeper after a kill), usage and admission, the
reference cache's LRU cap, and `halos fsck` — all on real files in the test's data dir, through the
real HTTP API and the real state machine (`work_job`)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlmodel import Session, col, select

from halos_core.artefact_spec import ArtefactResult
from halos_core.run_dir import read_manifest, sha256_file
from halos_core.synthetic import pairwise_records
from server import jobs
from server.db import READ_OPTION
from server.models import Checkpoint, DeletionIntent, FeedbackFile, PromptSet, Run
from server.settings import Settings
from server.storage_lifecycle import files, maintenance, retention, usage
from server.storage_lifecycle.fsck import fsck
from tests.server.conftest import SMALL_HP, jsonl, make_checkpoint_dir, round_checkpoint_id, upload_ok, work_job


def _new_run(client: TestClient, model: dict, **retention_policy: int) -> dict:
    body = {"model_id": model["id"], "loss": {"name": "dpo", "beta": 0.1}, "hyperparams": SMALL_HP}
    if retention_policy:
        body["retention"] = retention_policy
    resp = client.post("/v1/runs", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def _round(client: TestClient, run_id: str, fb_id: str, **extra: object) -> dict:
    resp = client.post(f"/v1/runs/{run_id}/rounds", json={"feedback_ids": [fb_id], **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


def _trained_round(client, session, settings, run_id: str, fb_id: str, step: int) -> tuple[dict, str]:
    """A round submitted over HTTP and finished by the state machine with a real checkpoint in its
    run directory (where a worker writes `final/`)."""
    rnd = _round(client, run_id, fb_id)
    work_job(session, rnd["job_id"], "succeeded", settings.runs_dir / rnd["job_id"] / "final", step=step)
    return rnd, round_checkpoint_id(session, rnd["round_id"])


def _ckpt_dir(settings: Settings, job_id: str) -> Path:
    return settings.runs_dir / job_id / "final"


def _assert_fsck_ok(session: Session, settings: Settings) -> None:
    report = fsck(session, settings)
    assert report.ok, report.problems


@pytest.fixture
def fb(client: TestClient) -> dict:
    return upload_ok(client, pairwise_records(8, seed=11))


# --------------------------------------------------------------------------- retention


def test_retention_dry_run_pins_and_two_stage_prune(client, session, settings, model, fb):
    run = _new_run(client, model, keep_rounds=1, keep_weights_rounds=3)
    made = [_trained_round(client, session, settings, run["id"], fb["id"], step=4 * (i + 1)) for i in range(4)]
    (r1, c1), (r2, c2), (r3, c3), (r4, c4) = made

    plan = client.get(f"/v1/runs/{run['id']}/retention").json()
    assert plan["dry_run"] is True and plan["policy"] == {"keep_rounds": 1, "keep_weights_rounds": 3}
    wanted = {a["checkpoint_id"]: a["to_state"] for a in plan["actions"]}
    assert wanted == {c1: "pruned", c2: "optimizer_pruned", c3: "optimizer_pruned"}
    by_id = {a["checkpoint_id"]: a["bytes"] for a in plan["actions"]}
    assert by_id[c1] == files.tree_bytes(_ckpt_dir(settings, r1["job_id"]))
    assert by_id[c2] == (_ckpt_dir(settings, r2["job_id"]) / "optimizer.pt").stat().st_size
    assert plan["bytes"] == sum(by_id.values())
    assert {k["checkpoint_id"]: k["reasons"] for k in plan["kept"]} == {c4: ["head", "recent"]}
    assert (_ckpt_dir(settings, r1["job_id"]) / "model.safetensors").is_file()  # a dry run removes nothing

    pinned = client.put(f"/v1/checkpoints/{c2}/pin")
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    assert client.put(f"/v1/checkpoints/{c2}/pin").status_code == 200  # idempotent

    done = client.post(f"/v1/runs/{run['id']}/retention/apply").json()
    assert done["dry_run"] is False
    assert {a["checkpoint_id"]: a["to_state"] for a in done["actions"]} == {c1: "pruned", c3: "optimizer_pruned"}

    assert not _ckpt_dir(settings, r1["job_id"]).exists()
    assert (_ckpt_dir(settings, r2["job_id"]) / "optimizer.pt").is_file()  # pinned: whole
    third = _ckpt_dir(settings, r3["job_id"])
    assert not (third / "optimizer.pt").exists() and (third / "model.safetensors").is_file()
    assert "optimizer.pt" not in read_manifest(third, verify=True).files  # the weights still verify

    out = {c: client.get(f"/v1/checkpoints/{c}").json() for c in (c1, c2, c3, c4)}
    assert [out[c]["state"] for c in (c1, c2, c3, c4)] == ["pruned", "whole", "optimizer_pruned", "whole"]
    assert [out[c]["can_continue"] for c in (c1, c2, c3, c4)] == [False, True, False, True]
    assert out[c1]["manifest_sha256"]  # the lineage row keeps its hashes
    lineage = client.get(f"/v1/checkpoints/{c4}/lineage").json()
    assert [i["state"] for i in lineage["items"]] == ["whole", "optimizer_pruned", "whole", "pruned"]

    # a round cannot continue from what lost its optimizer state (nor roll back to it)
    resp = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]], "parent_checkpoint_id": c3})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "checkpoint_cannot_continue", resp.text
    resp = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]], "parent_checkpoint_id": c1})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "checkpoint_pruned"
    resp = client.post(f"/v1/runs/{run['id']}/rollback", json={"checkpoint_id": c3})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "checkpoint_cannot_continue"
    assert client.post(f"/v1/runs/{run['id']}/retention/apply").json()["actions"] == []  # nothing more to do
    _assert_fsck_ok(session, settings)


def test_retention_keeps_what_unfinished_jobs_need(client, session, settings, model, fb):
    run = _new_run(client, model, keep_rounds=1, keep_weights_rounds=1)
    (_r1, c1), (_r2, _c2) = [
        _trained_round(client, session, settings, run["id"], fb["id"], step=4 * (i + 1)) for i in range(2)
    ]
    queued = _round(client, run["id"], fb["id"], parent_checkpoint_id=c1)  # a branch from round 1, queued
    plan = client.get(f"/v1/runs/{run['id']}/retention").json()
    assert plan["actions"] == []
    assert f"needed_by_job:{queued['job_id']}" in {r for k in plan["kept"] for r in k["reasons"]}
    assert client.post(f"/v1/jobs/{queued['job_id']}/cancel").status_code == 202
    done = client.post(f"/v1/runs/{run['id']}/retention/apply").json()
    assert [a["checkpoint_id"] for a in done["actions"]] == [c1]


def test_retention_defaults_keep_an_old_head_and_run_in_the_sweepers_pass(client, session, settings, model, fb):
    """A run without its own policy gets the settings' defaults; the head stays whole however old
    (after a rollback); the sweeper's periodic pass applies every run's retention."""
    settings.retention_keep_rounds = 1
    settings.retention_keep_weights_rounds = 2
    run = _new_run(client, model)
    made = [_trained_round(client, session, settings, run["id"], fb["id"], step=4 * (i + 1)) for i in range(4)]
    (r1, c1), (r2, c2), (_r3, c3), (_r4, c4) = made
    assert client.post(f"/v1/runs/{run['id']}/rollback", json={"checkpoint_id": c1}).status_code == 200
    plan = client.get(f"/v1/runs/{run['id']}/retention").json()
    assert plan["policy"] == {"keep_rounds": 1, "keep_weights_rounds": 2}
    assert "head" in {r for k in plan["kept"] if k["checkpoint_id"] == c1 for r in k["reasons"]}

    from server.storage_lifecycle import maintenance

    assert maintenance.periodic(session, settings)["pruned"] == 2
    states = {c: client.get(f"/v1/checkpoints/{c}").json()["state"] for c in (c1, c2, c3, c4)}
    assert states == {c1: "whole", c2: "pruned", c3: "optimizer_pruned", c4: "whole"}
    assert read_manifest(_ckpt_dir(settings, r1["job_id"]), verify=True)  # the head: whole, verifies
    assert not _ckpt_dir(settings, r2["job_id"]).exists()
    _assert_fsck_ok(session, settings)


def test_retention_settings_validation(client, model):
    resp = client.post(
        "/v1/runs",
        json={
            "model_id": model["id"],
            "loss": {"name": "dpo"},
            "retention": {"keep_rounds": 5, "keep_weights_rounds": 2},
        },
    )
    assert resp.status_code == 422
    run = _new_run(client, model)
    resp = client.put(f"/v1/runs/{run['id']}/retention", json={"keep_rounds": 2})
    assert resp.status_code == 200 and resp.json()["policy"]["keep_rounds"] == 2
    assert client.get(f"/v1/runs/{run['id']}").json()["retention"] == {"keep_rounds": 2, "keep_weights_rounds": None}


def test_intermediates_of_a_succeeded_round_are_removed(client, session, settings, model, fb):
    run = _new_run(client, model)
    rnd = _round(client, run["id"], fb["id"])
    inter = settings.runs_dir / rnd["job_id"] / "checkpoints" / "step-000002"
    make_checkpoint_dir(inter, step=2)
    work_job(session, rnd["job_id"], "succeeded", _ckpt_dir(settings, rnd["job_id"]))
    assert any("intermediate checkpoints of a succeeded round" in p for p in fsck(session, settings).problems)
    retention.after_round_success(session, settings, rnd["job_id"])  # what the worker does after finish
    assert not inter.exists()
    _assert_fsck_ok(session, settings)


# --------------------------------------------------------------------------- deletion


def test_delete_feedback_409_while_used_then_tombstone(client, client_b, session, settings, model, fb):
    same_bytes_b = upload_ok(client_b, pairwise_records(8, seed=11))  # content-addressed: the same blob
    run = _new_run(client, model)
    rnd = _round(client, run["id"], fb["id"])
    resp = client.delete(f"/v1/feedback/{fb['id']}")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "feedback_in_use"
    assert resp.json()["error"]["details"]["job_ids"] == [rnd["job_id"]]
    assert client_b.delete(f"/v1/feedback/{fb['id']}").status_code == 404  # another project's id

    assert client.post(f"/v1/jobs/{rnd['job_id']}/cancel").status_code == 202
    assert client.delete(f"/v1/feedback/{fb['id']}").status_code == 204
    assert client.delete(f"/v1/feedback/{fb['id']}").status_code == 204  # idempotent
    tomb = client.get(f"/v1/feedback/{fb['id']}").json()
    assert tomb["deleted_at"] and tomb["sha256"] == fb["sha256"] and tomb["filename"] is None
    resp = client.get(f"/v1/feedback/{fb['id']}/content")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "feedback_deleted"
    resp = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "feedback_deleted"
    # the other project's identical upload still has its bytes
    assert client_b.get(f"/v1/feedback/{same_bytes_b['id']}/content").status_code == 200
    assert client_b.delete(f"/v1/feedback/{same_bytes_b['id']}").status_code == 204
    assert not any(settings.feedback_dir.iterdir())  # now nobody uses the blob: it is gone
    _assert_fsck_ok(session, settings)


def test_delete_run_and_model(client, client_b, session, settings, model, fb, tmp_path):
    run = _new_run(client, model)
    r1, c1 = _trained_round(client, session, settings, run["id"], fb["id"], step=4)
    r2 = _round(client, run["id"], fb["id"])
    resp = client.delete(f"/v1/runs/{run['id']}")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "run_in_use"
    resp = client.delete(f"/v1/models/{model['id']}")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "model_in_use"
    assert client_b.delete(f"/v1/runs/{run['id']}").status_code == 404

    work_job(session, r2["job_id"], "failed")
    assert client.delete(f"/v1/runs/{run['id']}").status_code == 204
    assert client.delete(f"/v1/runs/{run['id']}").status_code == 204
    assert client.get(f"/v1/runs/{run['id']}").status_code == 404
    assert run["id"] not in [r["id"] for r in client.get("/v1/runs").json()["items"]]
    assert not (settings.runs_dir / r1["job_id"]).exists() and not (settings.runs_dir / r2["job_id"]).exists()
    assert client.get(f"/v1/checkpoints/{c1}").json()["state"] == "pruned"

    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert client.get(f"/v1/models/{model['id']}").status_code == 404
    assert (tmp_path / "sft" / "model.safetensors").is_file()  # the operator's directory stays
    resp = client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}})
    assert resp.status_code == 404
    _assert_fsck_ok(session, settings)


def test_delete_prompt_set(client, session, settings):
    resp = client.post(
        "/v1/prompts",
        content=jsonl([{"prompt": f"p{i}"} for i in range(3)]),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 201, resp.text
    ps = resp.json()
    assert client.delete(f"/v1/prompts/{ps['id']}").status_code == 204
    assert client.get(f"/v1/prompts/{ps['id']}").json()["deleted_at"]
    assert client.get(f"/v1/prompts/{ps['id']}/content").status_code == 409
    _assert_fsck_ok(session, settings)


def test_delete_generated_samples(client, client_b, session, settings, model):
    """A sampling job's output (a `sampled` feedback file in the job's run directory): 409 while an
    unfinished round trains on it, then its bytes go and the row stays a tombstone with its hash."""
    prompts = client.post(
        "/v1/prompts",
        content=jsonl([{"prompt_id": f"p{i}", "prompt": f"Tell me about {i}."} for i in range(2)]),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert prompts.status_code == 201, prompts.text
    job = client.post(
        "/v1/sampling-jobs", json={"prompt_set_id": prompts.json()["id"], "model_id": model["id"], "params": {"n": 2}}
    )
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    out = settings.runs_dir / job_id / "outputs" / "samples.jsonl"
    out.parent.mkdir(parents=True)
    out.write_bytes(
        jsonl(
            [
                {
                    "type": "sample",
                    "prompt_id": f"p{p}",
                    "sample_id": str(j),
                    "prompt": f"Tell me about {p}.",
                    "output": f"answer {j} about {p}",
                }
                for p in range(2)
                for j in range(2)
            ]
        )
    )
    claim = jobs.claim(session, job_id, "test-host", 1, 60)
    result = ArtefactResult(
        job_id=job_id,
        kind="sample",
        output_path=str(out),
        sha256=sha256_file(out),
        size_bytes=out.stat().st_size,
        feedback_kind="sampled",
        format="samples",
        n_records=4,
        n_prompts=2,
        n_train=4,
        n_test=0,
    )
    jobs.finish(session, job_id, claim.lease_token, jobs.Outcome("succeeded", result=result), retry_backoff_s=0)
    samples_id = session.exec(select(FeedbackFile).where(FeedbackFile.job_id == job_id)).one().id
    session.rollback()

    run = client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "sft"}, "hyperparams": SMALL_HP})
    assert run.status_code == 201, run.text
    rnd = _round(client, run.json()["id"], samples_id)
    resp = client.delete(f"/v1/feedback/{samples_id}")
    assert resp.status_code == 409 and resp.json()["error"]["details"]["job_ids"] == [rnd["job_id"]]
    assert client_b.delete(f"/v1/feedback/{samples_id}").status_code == 404
    assert out.is_file()
    assert client.post(f"/v1/jobs/{rnd['job_id']}/cancel").status_code == 202
    assert client.delete(f"/v1/feedback/{samples_id}").status_code == 204
    assert client.delete(f"/v1/feedback/{samples_id}").status_code == 204  # idempotent
    assert not out.exists()
    tomb = client.get(f"/v1/feedback/{samples_id}").json()
    assert tomb["deleted_at"] and tomb["sha256"] == result.sha256
    _assert_fsck_ok(session, settings)


def test_a_removal_killed_half_way_is_finished_by_the_sweeper(client, session, settings, model, fb, monkeypatch):
    run = _new_run(client, model, keep_rounds=1, keep_weights_rounds=1)
    (r1, c1), _second = [
        _trained_round(client, session, settings, run["id"], fb["id"], step=4 * (i + 1)) for i in range(2)
    ]
    real_execute = files.execute

    def killed(actions, data_dir):  # the process dies after the commit, before any byte is removed
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "execute", killed)
    with pytest.raises(KeyboardInterrupt):
        retention.apply(session, session.get(Run, run["id"]), settings)
    session.rollback()
    monkeypatch.setattr(files, "execute", real_execute)

    # the row already says pruned; the bytes are still there; fsck names both facts
    assert client.get(f"/v1/checkpoints/{c1}").json()["state"] == "pruned"
    problems = fsck(session, settings).problems
    assert any("still exists" in p for p in problems) and any("unfinished" in p for p in problems)

    from server.storage_lifecycle import maintenance

    assert maintenance.finish_intents(session, settings, min_age_s=0)  # the sweeper's pass
    assert not _ckpt_dir(settings, r1["job_id"]).exists()
    assert session.exec(select(DeletionIntent).where(DeletionIntent.finished_at.is_(None))).all() == []
    _assert_fsck_ok(session, settings)


def test_the_sweeper_thread_finishes_a_delete_killed_after_its_commit(client, session, settings, monkeypatch):
    """The real sweeper loop (`sweeper.start_thread`) finishes a feedback delete whose process died
    after the commit, once the removal is older than the grace a live request gets."""
    from datetime import timedelta

    from server import sweeper
    from server.services.keys import Principal
    from server.storage_lifecycle import deletion

    fb = upload_ok(client, pairwise_records(4, seed=21))
    row = session.get(FeedbackFile, fb["id"])
    blob, principal = settings.data_dir / row.storage_path, Principal(project_id=row.project_id, key_id=None)
    session.rollback()

    def killed(actions, data_dir):  # the process dies after the commit, before the unlink
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "execute", killed)
    with pytest.raises(KeyboardInterrupt):
        deletion.delete_feedback(session, settings, principal, fb["id"])
    session.rollback()
    monkeypatch.undo()
    assert blob.is_file() and client.get(f"/v1/feedback/{fb['id']}").json()["deleted_at"]
    intent = session.exec(select(DeletionIntent).where(col(DeletionIntent.finished_at).is_(None))).one()
    intent.created_at -= timedelta(seconds=maintenance.INTENT_GRACE_S + 1)
    session.add(intent)
    session.commit()

    settings.sweep_interval_s = 0.05
    thread, stop = sweeper.start_thread(settings)
    try:
        for _ in range(600):  # the loop's first passes; bounded so a broken sweeper fails, not hangs
            session.expire_all()
            done = session.get(DeletionIntent, intent.id).finished_at is not None
            session.rollback()
            if done:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert done and not blob.exists()
    _assert_fsck_ok(session, settings)


# --------------------------------------------------------------------------- usage and admission


def test_usage_readyz_and_gauges(client, client_b, anon, session, settings, model, fb):
    run = _new_run(client, model)
    r1, _c1 = _trained_round(client, session, settings, run["id"], fb["id"], step=4)
    (settings.runs_dir / r1["job_id"] / "stdout.log").write_bytes(b"x" * 100)
    cache = settings.reference_cache_dir / "abc-no"
    cache.mkdir(parents=True)
    (cache / "0.safetensors").write_bytes(b"\x00" * 300)

    u = client.get("/v1/usage").json()
    assert u["bytes"]["feedback"] == fb["size_bytes"]
    assert u["bytes"]["checkpoints_whole"] == files.tree_bytes(_ckpt_dir(settings, r1["job_id"]))
    assert u["bytes"]["run_logs"] == 100
    assert u["bytes"]["reference_cache"] == 300
    assert u["counts"]["checkpoints_whole"] == 1 and u["counts"]["feedback"] == 1
    assert u["total_bytes"] == sum(v for k, v in u["bytes"].items() if k != "reference_cache")
    assert u["data_dir_free_bytes"] > 0 and u["reserve_bytes"] == settings.storage_reserve_bytes
    other = client_b.get("/v1/usage").json()  # per project: the other project holds nothing
    assert other["bytes"]["feedback"] == 0 and other["bytes"]["checkpoints_whole"] == 0
    assert other["counts"].get("checkpoints_whole", 0) == 0 and other["bytes"].get("run_logs", 0) == 0

    ready = anon.get("/readyz").json()
    assert ready["data_dir_free_bytes"] > 0
    usage._CACHE["at"] = float("-inf")  # the gauges' cache (60 s) would hide this test's files
    text = anon.get("/metrics").text
    assert "halos_data_dir_free_bytes" in text and "halos_reference_cache_bytes 300.0" in text
    assert (
        f'halos_storage_bytes{{kind="feedback",project="{session.exec(select(FeedbackFile)).first().project_id}"}}'
        in text
    )


def test_admission_refuses_a_round_that_does_not_fit(client, session, settings, model, fb, monkeypatch):
    # The data dir's free space is pinned (the disk is shared: its free space moves while the test
    # runs); the real ENOSPC behaviour is tests/halos_core/test_checkpoint_enospc.py's.
    monkeypatch.setattr(files, "free_bytes", lambda path: 1000)
    settings.storage_reserve_bytes = 600  # 400 bytes usable
    run = _new_run(client, model)
    # 64 bytes of fp32 weights (make_model_dir) = 16 parameters x 12 bytes (weights + AdamW's 2 moments)
    first = _round(client, run["id"], fb["id"])  # 192 <= 400
    _round(client, run["id"], fb["id"])  # 192 + 192 queued/waiting <= 400
    resp = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]})
    assert resp.status_code == 507, resp.text
    err = resp.json()["error"]
    assert err["code"] == "insufficient_storage"
    assert err["details"] == {
        "estimated_bytes": 192,
        "pending_bytes": 384,
        "free_bytes": 1000,
        "reserve_bytes": 600,
        "data_dir": str(settings.data_dir),
    }
    assert len(client.get(f"/v1/runs/{run['id']}").json()["rounds"]) == 2  # nothing inserted
    settings.storage_admission = False
    assert client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}).status_code == 201
    settings.storage_admission = True

    # the disk filled since submit: the worker's re-check before the launch fails the round
    from worker import runner

    claim = jobs.claim(session, first["job_id"], "test-host", 1, 60)
    assert runner.storage_problem(claim, settings) is None  # 192 <= 400: its own estimate only
    monkeypatch.setattr(files, "free_bytes", lambda path: 700)
    problem = runner.storage_problem(claim, settings)
    session.rollback()
    assert problem is not None and problem.startswith("insufficient storage") and "192" in problem


def test_reference_cache_lru_cap(settings):
    cache = settings.reference_cache_dir / "ref-no"
    cache.mkdir(parents=True)
    for i in range(4):
        shard = cache / f"{i}.safetensors"
        shard.write_bytes(b"\x00" * 100)
        os.utime(shard, (1000 + i, 1000 + i))
    os.utime(cache / "0.safetensors", (2000, 2000))  # used last: kept
    settings.reference_cache_max_bytes = 250
    assert usage.evict_reference_cache(settings) == 200
    assert sorted(p.name for p in cache.iterdir()) == ["0.safetensors", "3.safetensors"]
    settings.reference_cache_max_bytes = 0  # no cap
    assert usage.evict_reference_cache(settings) == 0


def test_reference_cache_eviction_skips_a_shard_being_written(settings):
    cache = settings.reference_cache_dir / "ref-no"
    cache.mkdir(parents=True)
    writing = cache / ".tmp-round.safetensors"  # the trainer renames it into place when complete
    writing.write_bytes(b"\x00" * 500)
    os.utime(writing, (1000, 1000))  # oldest of all
    settings.reference_cache_max_bytes = 100
    assert usage.evict_reference_cache(settings) == 0 and writing.exists()


def test_a_removal_that_fails_does_not_block_the_others(session, settings, monkeypatch):
    """One stuck removal (here: a directory the remover may not empty) stays open for a later pass;
    the removals after it are carried out, and finishing never raises into the request or sweeper."""
    stuck, fine = settings.data_dir / "stuck", settings.data_dir / "fine"
    for d in (stuck, fine):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f.bin").write_bytes(b"x")
    first = files.add_intent(session, "test", "a", [{"op": "rmtree", "path": str(stuck)}], project_id=None)
    second = files.add_intent(session, "test", "b", [{"op": "rmtree", "path": str(fine)}], project_id=None)
    session.commit()
    real_rmtree = files.rmtree

    def failing(path: Path) -> None:
        if path == stuck:
            raise PermissionError(13, "Permission denied", str(path))
        real_rmtree(path)

    monkeypatch.setattr(files, "rmtree", failing)
    files.finish(session, [first.id, second.id], settings)
    monkeypatch.undo()
    assert stuck.exists() and not fine.exists()
    assert session.get(DeletionIntent, first.id).finished_at is None  # open: fsck lists it, the sweeper retries
    assert session.get(DeletionIntent, second.id).finished_at is not None
    files.finish_open_intents(session, settings)  # the sweeper's next pass, the cause gone
    assert not stuck.exists() and session.get(DeletionIntent, first.id).finished_at is not None


# --------------------------------------------------------------------------- fsck


def test_fsck_cli_exit_status(client, session, settings, model, fb, tmp_path):
    run = _new_run(client, model)
    _trained_round(client, session, settings, run["id"], fb["id"], step=4)
    env = {
        **os.environ,
        "HALOS_DATA_DIR": str(settings.data_dir),
        "HALOS_DATABASE_URL": settings.db_url,
        "HALOS_BROKER_URL": settings.broker,
    }
    cmd = [sys.executable, "-m", "server.cli", "fsck", "--loglevel", "WARNING"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True

    (settings.feedback_dir / ("0" * 64 + ".jsonl")).write_text("{}\n")  # bytes no row accounts for
    ckpt = session.exec(select(Checkpoint)).first()
    (Path(ckpt.path) / "model.safetensors").write_bytes(b"corrupt")
    session.rollback()
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    problems = json.loads(bad.stdout)["problems"]
    assert any("no live feedback file" in p for p in problems)
    assert any(ckpt.id in p and "does not verify" in p for p in problems)


def test_fsck_after_random_rounds_prunes_deletions_and_kills(client, session, settings, model, monkeypatch):
    """Any sequence of rounds, retention, pins, deletions and kills (a removal interrupted after its
    commit, then the sweeper) leaves every whole checkpoint verifying and no unaccounted file."""
    rng = random.Random(12)
    runs = [_new_run(client, model, keep_rounds=1, keep_weights_rounds=2) for _ in range(2)]
    feedback = [upload_ok(client, pairwise_records(6, seed=100 + i)) for i in range(3)]
    ckpts: list[str] = []
    real_execute = files.execute
    from server.storage_lifecycle import maintenance

    for step in range(14):
        op = rng.choice(["round", "round", "retention", "pin", "delete_feedback", "kill", "delete_run"])
        live_runs = [r for r in runs if client.get(f"/v1/runs/{r['id']}").status_code == 200]
        live_fb = [f for f in feedback if not client.get(f"/v1/feedback/{f['id']}").json()["deleted_at"]]
        if op == "round" and live_runs and live_fb:
            _r, c = _trained_round(client, session, settings, rng.choice(live_runs)["id"], rng.choice(live_fb)["id"], 4)
            ckpts.append(c)
        elif op == "retention" and live_runs:
            assert client.post(f"/v1/runs/{rng.choice(live_runs)['id']}/retention/apply").status_code == 200
        elif op == "pin" and ckpts:
            c = rng.choice(ckpts)
            client.request(rng.choice(["PUT", "DELETE"]), f"/v1/checkpoints/{c}/pin")
        elif op == "delete_feedback" and len(live_fb) > 1:
            assert client.delete(f"/v1/feedback/{live_fb[0]['id']}").status_code == 204
        elif op == "delete_run" and len(live_runs) > 1 and step > 8:
            assert client.delete(f"/v1/runs/{live_runs[-1]['id']}").status_code == 204
        elif op == "kill" and live_runs:
            monkeypatch.setattr(files, "execute", lambda actions, data_dir: (_ for _ in ()).throw(KeyboardInterrupt))
            try:
                client.post(f"/v1/runs/{rng.choice(live_runs)['id']}/retention/apply")
            except KeyboardInterrupt:
                pass
            monkeypatch.setattr(files, "execute", real_execute)
            maintenance.finish_intents(session, settings, min_age_s=0)
        _assert_fsck_ok(session, settings)
    assert ckpts, "the sequence trained no round"


def test_upload_with_same_bytes_during_a_delete_keeps_the_blob(client, client_b, session, settings, monkeypatch):
    """A blob an identical upload started using between a delete's commit and its removal stays."""
    a = upload_ok(client, pairwise_records(5, seed=5))
    real_finish = files.finish
    uploaded: dict = {}

    def upload_in_between(session_, intent_ids, settings_):
        uploaded["b"] = upload_ok(client_b, pairwise_records(5, seed=5))
        real_finish(session_, intent_ids, settings_)

    monkeypatch.setattr(files, "finish", upload_in_between)
    assert client.delete(f"/v1/feedback/{a['id']}").status_code == 204
    monkeypatch.setattr(files, "finish", real_finish)
    # the removal re-checks the blob's users: in use again, it was kept
    assert client_b.get(f"/v1/feedback/{uploaded['b']['id']}/content").status_code == 200
    _assert_fsck_ok(session, settings)


KILLED_DELETE = """
import os, signal, sys
from sqlmodel import Session
from server.db import get_engine
from server.services.keys import Principal
from server.settings import Settings
from server.storage_lifecycle import deletion, files

real = files.execute

def execute_then_die(actions, data_dir):
    real(actions[:1], data_dir)  # the first directory goes, then the process is SIGKILLed
    os.kill(os.getpid(), signal.SIGKILL)

files.execute = execute_then_die
settings = Settings()
with Session(get_engine(settings), expire_on_commit=False) as session:
    deletion.delete_run(session, settings, Principal(project_id=sys.argv[1], key_id=None), sys.argv[2])
"""


def test_a_delete_sigkilled_half_way_is_finished_by_the_sweeper(client, session, settings, model, fb):
    """A real process deleting a run is SIGKILLed after removing the first of its directories."""
    run = _new_run(client, model)
    made = [_trained_round(client, session, settings, run["id"], fb["id"], step=4 * (i + 1)) for i in range(2)]
    project_id = session.exec(select(Run)).first().project_id
    session.rollback()
    env = {**os.environ, "HALOS_DATA_DIR": str(settings.data_dir), "HALOS_DATABASE_URL": settings.db_url}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_DELETE, project_id, run["id"]], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    left = [r["job_id"] for r, _ in made if (settings.runs_dir / r["job_id"]).exists()]
    assert len(left) == 1  # half-way: one run directory removed, one still there
    assert client.get(f"/v1/runs/{run['id']}").status_code == 404  # the rows were committed first
    assert {client.get(f"/v1/checkpoints/{c}").json()["state"] for _, c in made} == {"pruned"}
    assert not fsck(session, settings).ok

    from server.storage_lifecycle import maintenance

    assert maintenance.finish_intents(session, settings) == []  # younger than the grace: maybe still in flight
    assert len(maintenance.finish_intents(session, settings, min_age_s=0)) == 1
    assert not any((settings.runs_dir / r["job_id"]).exists() for r, _ in made)
    _assert_fsck_ok(session, settings)


def test_the_sdk_calls_the_storage_routes(client, keys, session, settings, model, fb):
    """halos_client.Client over the same app: usage, retention, pin, deletions (idempotent)."""
    import httpx

    from halos_client import Client
    from halos_client.errors import ConflictError

    class Via(httpx.BaseTransport):  # the SDK's requests through the test client (the real app)
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            r = client.request(
                request.method, request.url.raw_path.decode(), headers=request.headers, content=request.read()
            )
            return httpx.Response(r.status_code, headers=r.headers, content=r.content)

    sdk = Client("http://testserver", keys["alpha"], transport=Via())
    run = _new_run(client, model)
    _r1, c1 = _trained_round(client, session, settings, run["id"], fb["id"], step=4)
    assert sdk.usage().counts["checkpoints_whole"] == 1
    assert sdk.checkpoints.pin(c1).pinned is True and sdk.checkpoints.unpin(c1).pinned is False
    plan = sdk.runs.set_retention(run["id"], keep_rounds=1)
    assert plan.policy.keep_rounds == 1 and sdk.runs.retention(run["id"]).dry_run is True
    assert sdk.runs.apply_retention(run["id"]).dry_run is False
    with pytest.raises(ConflictError):
        sdk.models.delete(model["id"])
    sdk.runs.delete(run["id"])
    sdk.runs.delete(run["id"])
    sdk.models.delete(model["id"])
    sdk.feedback.delete(fb["id"])
    assert sdk.feedback.get(fb["id"]).deleted_at is not None
    _assert_fsck_ok(session, settings)


# --------------------------------------------------------------------------- blob removal vs adoption


class InTheGap:
    """Runs `request` in another thread while the calling thread (a removal) is at a point of its
    choosing, and lets it get as far as it can: to its end, or until it waits on a lock that the
    removal's open transaction (`holder`) holds. Deterministic either way: no sleeps decide it."""

    def __init__(self, engine: Any, holder: Session, request: Any) -> None:
        self.engine, self.holder, self.request = engine, holder, request
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.began_writing = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.owner = threading.get_ident()

    def _run(self) -> None:
        try:
            self.result = self.request()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.done.set()

    def _writer_begins(self, conn: Any) -> None:
        if threading.get_ident() != self.owner and not conn.get_execution_options().get(READ_OPTION):
            self.began_writing.set()

    def _connects(self, _dbapi_conn: Any, _record: Any) -> None:
        if threading.get_ident() != self.owner:  # opening a connection (its WAL pragma) waits too
            self.began_writing.set()

    def _blocked(self) -> bool:
        """Is another transaction waiting for a lock the holder's open transaction holds? Without an
        open transaction the holder holds nothing, so nothing can be waiting on it."""
        if not self.holder.in_transaction():
            return False
        if self.engine.dialect.name == "sqlite":
            # every writer transaction is BEGIN IMMEDIATE (server/db.py): one another thread begins
            # (or a connection it opens) while the holder's is open waits for the write lock
            return self.began_writing.is_set()
        pid = self.holder.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with self.engine.connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE %(pid)s = ANY(pg_blocking_pids(pid))", {"pid": pid}
            ).scalar()
            conn.rollback()
        return bool(waiting)

    def run_until_done_or_blocked(self) -> InTheGap:
        event.listen(self.engine, "begin", self._writer_begins, insert=True)
        event.listen(self.engine, "connect", self._connects, insert=True)
        self.thread.start()
        while not self.done.wait(0.02):
            if self._blocked():
                break
        return self

    def outcome(self) -> Any:
        self.thread.join(timeout=120)
        # only now: the blocked thread was inside the event dispatch (removing mutates its deque)
        event.remove(self.engine, "begin", self._writer_begins)
        event.remove(self.engine, "connect", self._connects)
        assert self.done.is_set() and self.error is None, self.error
        return self.result


def _assert_live_blobs_verify(session: Session, settings: Settings) -> None:
    session.expire_all()
    for table in (FeedbackFile, PromptSet):
        for row in session.exec(select(table).where(col(table.deleted_at).is_(None))).all():
            path = files.resolve(settings.data_dir, row.storage_path)
            assert path.is_file(), f"{table.__name__} {row.id}: its blob {path} is gone"
            assert sha256_file(path) == row.sha256
    session.rollback()


def _post_body(client: TestClient, kind: str, body: bytes) -> Any:
    return client.post(f"/v1/{kind}", content=body, headers={"Content-Type": "application/x-ndjson"})


_RACE_BODIES = {
    "feedback": jsonl(pairwise_records(5, seed=5)),
    "prompts": jsonl([{"prompt": f"race prompt {i}"} for i in range(4)]),
}


@pytest.mark.parametrize("kind", ["feedback", "prompts"])
def test_an_identical_upload_between_the_check_and_the_unlink_keeps_its_bytes(
    kind, client, session, engine, settings, monkeypatch
):
    """The removal of a deleted file's blob decided that no live row uses it; an upload of the same
    bytes (same content address) runs while the removal is between that check and the unlink, as
    far as it can get. Afterwards every live row's blob exists and verifies, and fsck finds nothing.
    (Before the blob lock, the upload committed in that gap and the unlink took its bytes.)"""
    body = _RACE_BODIES[kind]
    first = _post_body(client, kind, body)
    assert first.status_code == 201, first.text
    removal: dict[str, Any] = {}
    real_finish, real_execute = files.finish, files.execute

    def finish(session_: Session, intent_ids: list[int], settings_: Settings) -> None:
        removal["session"] = session_
        real_finish(session_, intent_ids, settings_)

    def upload_in_the_gap(actions: Any, data_dir: Path) -> None:
        actions = list(actions)
        if any(a["op"] == "unlink" for a in actions) and "upload" not in removal:  # the first removal only
            removal["upload"] = InTheGap(engine, removal["session"], lambda: _post_body(client, kind, body))
            removal["upload"].run_until_done_or_blocked()
        real_execute(actions, data_dir)

    monkeypatch.setattr(files, "finish", finish)
    monkeypatch.setattr(files, "execute", upload_in_the_gap)
    assert client.delete(f"/v1/{kind}/{first.json()['id']}").status_code == 204
    second = removal["upload"].outcome()
    monkeypatch.undo()
    assert second.status_code == 201, second.text
    content = client.get(f"/v1/{kind}/{second.json()['id']}/content")
    assert content.status_code == 200 and content.content == body, content.text
    _assert_live_blobs_verify(session, settings)
    _assert_fsck_ok(session, settings)


def test_two_identical_files_deleted_at_once_leave_no_bytes_behind(client, session, engine, settings, monkeypatch):
    """Two live rows share one blob; both are deleted concurrently: the second delete runs while the
    first has written its tombstone but not committed it, as far as it can get. Afterwards the blob
    is gone (personal data a team deleted must not stay on disk) and fsck finds nothing. (Before,
    on Postgres, each delete saw the other row still live and neither removed the blob.)"""
    body = _RACE_BODIES["feedback"]
    a, b = (_post_body(client, "feedback", body).json() for _ in range(2))
    assert a["sha256"] == b["sha256"]
    real_add_intent = files.add_intent
    gap: dict[str, Any] = {}

    def delete_b_in_the_gap(session_: Session, *args: Any, **kw: Any) -> Any:
        intent = real_add_intent(session_, *args, **kw)
        if "delete_b" not in gap:  # only in the first delete (the second comes here too)
            session_.flush()
            gap["delete_b"] = InTheGap(engine, session_, lambda: client.delete(f"/v1/feedback/{b['id']}"))
            gap["delete_b"].run_until_done_or_blocked()
        return intent

    monkeypatch.setattr(files, "add_intent", delete_b_in_the_gap)
    assert client.delete(f"/v1/feedback/{a['id']}").status_code == 204
    assert gap["delete_b"].outcome().status_code == 204
    monkeypatch.undo()
    assert not any(settings.feedback_dir.iterdir())
    _assert_fsck_ok(session, settings)

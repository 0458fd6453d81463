"""Runs and rounds: submit-time validation (never a crash on the worker), parents, idempotency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlmodel import Session, func, select

from halos_core.job_spec import RunConfig
from halos_core.run_dir import META_FILE
from halos_core.synthetic import pairwise_records
from server.app import create_app
from server.models import Job, JobStatus, Round
from server.settings import Settings
from tests.server.conftest import SMALL_HP, jsonl, make_model_dir, round_checkpoint_id, upload, work_job


def _job(session: Session, job_id: str) -> Job:
    session.expire_all()
    job = session.get(Job, job_id)
    session.expunge(job)  # detached: reading it later must not reopen a (locking) transaction
    session.rollback()
    return job


def _round(client: TestClient, run_id: str, **body):
    return client.post(f"/v1/runs/{run_id}/rounds", json=body)


def _err(resp, status: int = 422) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


# --------------------------------------------------------------------------- runs


def test_create_get_list_run(client: TestClient, model: dict) -> None:
    resp = client.post(
        "/v1/runs",
        json={
            "model_id": model["id"],
            "loss": {"name": "kto"},
            "hyperparams": {"batch_size": 8, "microbatch_size": 2},
            "conversion": {"type": "pairwise_to_unpaired"},
            "lora": {"r": 4},
        },
    )
    assert resp.status_code == 201, resp.text
    run = resp.json()
    assert run["loss"] == {"name": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert run["hyperparams"]["batch_size"] == 8 and run["hyperparams"]["lr"] == 5e-6
    assert run["conversion"]["type"] == "pairwise_to_unpaired" and run["lora"]["r"] == 4 and run["rounds"] == []
    assert client.get(f"/v1/runs/{run['id']}").json() == run
    assert [r["id"] for r in client.get("/v1/runs").json()["items"]] == [run["id"]]


def test_run_validation(client: TestClient, client_b: TestClient, model: dict, tmp_path: Path) -> None:
    err = _err(client.post("/v1/runs", json={"model_id": "mdl_000000000000000000000000", "loss": {"name": "dpo"}}), 404)
    assert err["code"] == "model_not_found" and err["details"]["field"] == "model_id"
    b_model = client_b.post("/v1/models", json={"name": "b", "path": str(make_model_dir(tmp_path / "b"))}).json()
    err = _err(client.post("/v1/runs", json={"model_id": b_model["id"], "loss": {"name": "dpo"}}), 404)
    assert err["code"] == "model_not_found"
    err = _err(client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "ppo2"}}))
    assert err["code"] == "validation_error" and "loss" in err["message"]
    err = _err(client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo", "beta": -1}}))
    assert "beta" in err["message"]
    err = _err(
        client.post(
            "/v1/runs",
            json={
                "model_id": model["id"],
                "loss": {"name": "dpo"},
                "hyperparams": {"batch_size": 30, "microbatch_size": 8},
            },
        )
    )
    assert err["code"] == "invalid_hyperparams" and "divisible" in err["message"]
    err = _err(
        client.post(
            "/v1/runs",
            json={
                "model_id": model["id"],
                "loss": {"name": "kto"},
                "hyperparams": {"batch_size": 8, "microbatch_size": 1},
            },
        )
    )
    assert err["code"] == "invalid_hyperparams" and "KTO" in err["message"]
    err = _err(
        client.post(
            "/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}, "hyperparams": {"learning_rate": 1}}
        )
    )
    assert err["code"] == "validation_error"


def test_run_idempotency(client: TestClient, model: dict) -> None:
    body = {"model_id": model["id"], "loss": {"name": "dpo"}, "hyperparams": SMALL_HP}
    a = client.post("/v1/runs", json=body, headers={"Idempotency-Key": "run-1"})
    b = client.post("/v1/runs", json=body, headers={"Idempotency-Key": "run-1"})
    assert a.status_code == b.status_code == 201 and a.json()["id"] == b.json()["id"]
    assert b.headers["Idempotent-Replayed"] == "true"
    c = client.post("/v1/runs", json={**body, "name": "other"}, headers={"Idempotency-Key": "run-1"})
    assert _err(c)["code"] == "idempotency_key_reused"
    assert len(client.get("/v1/runs").json()["items"]) == 1


# --------------------------------------------------------------------------- rounds: the happy path


def test_round_spec_and_publish(
    client: TestClient, session: Session, settings: Settings, model: dict, run: dict, pairwise_fb: dict
) -> None:
    resp = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]], hyperparams={"lr": 1e-4})
    assert resp.status_code == 201, resp.text
    rnd = resp.json()
    assert rnd["index"] == 1 and rnd["status"] == "queued" and rnd["parent_checkpoint_id"] is None
    assert rnd["hyperparams"]["lr"] == 1e-4 and rnd["hyperparams"]["batch_size"] == SMALL_HP["batch_size"]
    job = _job(session, rnd["job_id"])
    assert job.max_attempts == settings.max_attempts and job.parent_job_id is None
    assert job.published_at is not None  # queue.publish ran after the commit (embedded broker)
    spec = job.spec
    assert spec["reference_path"] == model["path"] and spec["reference_sha256"] == model["sha256"]
    assert spec["init_from"] is None and spec["init_from_checkpoint_id"] is None
    assert spec["counters"] == {"step": 0, "examples": 0}
    [fin] = spec["feedback"]
    assert fin["file_id"] == pairwise_fb["id"] and fin["kind"] == "pairwise" and Path(fin["path"]).is_file()
    assert spec["loss"]["name"] == "dpo" and spec["hyperparams"]["lr"] == 1e-4 and spec["lora"] is None
    cfg = RunConfig.model_validate(
        {"job_id": job.id, "run_dir": job.run_dir, **{k: v for k, v in spec.items() if k != "init_from_checkpoint_id"}}
    )
    assert cfg.reference_sha256 == model["sha256"]
    got = client.get(f"/v1/runs/{run['id']}").json()
    assert [r["round_id"] for r in got["rounds"]] == [rnd["round_id"]]


def test_round_waits_for_unfinished_parent_then_chains(
    client: TestClient, session: Session, run: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    r2 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    assert r2["index"] == 2 and r2["status"] == "waiting" and r2["parent_job_id"] == r1["job_id"]
    job2 = _job(session, r2["job_id"])
    assert job2.published_at is None and job2.spec["init_from"] is None  # not published while waiting

    work_job(session, r1["job_id"], "succeeded", tmp_path / "ck1", step=4, examples=16)
    ck1 = round_checkpoint_id(session, r1["round_id"])
    job2 = _job(session, r2["job_id"])
    assert job2.status == JobStatus.queued  # promoted by jobs.finish
    assert job2.spec["init_from"] == str(tmp_path / "ck1") and job2.spec["counters"] == {"step": 4, "examples": 16}
    view = client.get(f"/v1/runs/{run['id']}").json()["rounds"]
    assert [r["status"] for r in view] == ["succeeded", "queued"]
    assert view[0]["checkpoint_id"] == ck1 and view[1]["parent_checkpoint_id"] == ck1

    work_job(session, r2["job_id"], "succeeded", tmp_path / "ck2", step=8, examples=32)
    r3 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    ck2 = round_checkpoint_id(session, r2["round_id"])
    assert r3["status"] == "queued" and r3["parent_checkpoint_id"] == ck2
    spec3 = _job(session, r3["job_id"]).spec
    assert spec3["init_from"] == str(tmp_path / "ck2") and spec3["counters"] == {"step": 8, "examples": 32}
    assert spec3["init_from_checkpoint_id"] == ck2


def test_parent_failed_or_cancelled_409(
    client: TestClient, session: Session, run: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    work_job(session, r1["job_id"], "succeeded", tmp_path / "ck1")
    ck1 = round_checkpoint_id(session, r1["round_id"])
    r2 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    work_job(session, r2["job_id"], "failed")
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]]), 409)
    assert err["code"] == "parent_round_failed" and err["details"]["status"] == "failed"
    # branching from an explicit earlier checkpoint is the way on
    r3 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]], parent_checkpoint_id=ck1)
    assert r3.status_code == 201 and r3.json()["parent_checkpoint_id"] == ck1 and r3.json()["index"] == 3
    assert client.post(f"/v1/jobs/{r3.json()['job_id']}/cancel").status_code == 202
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]]), 409)
    assert err["code"] == "parent_round_failed" and err["details"]["status"] == "cancelled"


def test_parent_failing_between_check_and_submit_is_409(
    client: TestClient, session: Session, run: dict, pairwise_fb: dict, monkeypatch
) -> None:
    """The race: the latest round is running when the API checks it and fails before the insert."""
    from server.services import runs as runs_service

    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    real = runs_service._submit

    def parent_fails_first(ses, job, settings):
        # (in the request's own transaction: on SQLite it holds the write lock, another session
        # would wait for it; the effect on submit's locked re-read of the parent is the same)
        with ses.no_autoflush:
            ses.exec(update(Job).where(Job.id == r1["job_id"]).values(status=JobStatus.failed, error="test failed"))
        return real(ses, job, settings)

    monkeypatch.setattr(runs_service, "_submit", parent_fails_first)
    resp = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]])
    err = _err(resp, 409)
    assert err["code"] == "parent_round_failed" and err["details"] == {
        "round_index": 1,
        "job_id": r1["job_id"],
        "status": "failed",
    }
    monkeypatch.undo()
    session.expire_all()
    assert [r.index for r in session.exec(select(Round).where(Round.run_id == run["id"])).all()] == [1]
    assert session.exec(select(func.count()).select_from(Job)).one() == 1
    session.rollback()


def test_explicit_parent_checks(
    client: TestClient,
    client_b: TestClient,
    session: Session,
    model: dict,
    run: dict,
    pairwise_fb: dict,
    tmp_path: Path,
) -> None:
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    work_job(session, r1["job_id"], "succeeded", tmp_path / "ck1", step=6, examples=24)
    ck1 = round_checkpoint_id(session, r1["round_id"])

    # a checkpoint of another run of the same project ⇒ 404
    other = client.post(
        "/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}, "hyperparams": SMALL_HP}
    ).json()
    err = _err(_round(client, other["id"], feedback_ids=[pairwise_fb["id"]], parent_checkpoint_id=ck1), 404)
    assert err["code"] == "checkpoint_not_found" and err["details"]["field"] == "parent_checkpoint_id"
    err = _err(
        _round(
            client, run["id"], feedback_ids=[pairwise_fb["id"]], parent_checkpoint_id="ckpt_000000000000000000000000"
        ),
        404,
    )
    assert err["code"] == "checkpoint_not_found"

    ok = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]], parent_checkpoint_id=ck1)
    assert ok.status_code == 201, ok.text
    spec = _job(session, ok.json()["job_id"]).spec
    assert spec["init_from"] == str(tmp_path / "ck1") and spec["counters"] == {"step": 6, "examples": 24}

    # the cheap checks come first: an unknown feedback id is reported, the checkpoint is not read
    (tmp_path / "ck1" / META_FILE).rename(tmp_path / "meta.aside")
    err = _err(_round(client, run["id"], feedback_ids=["fb_000000000000000000000000"], parent_checkpoint_id=ck1), 404)
    assert err["code"] == "feedback_not_found"
    (tmp_path / "meta.aside").rename(tmp_path / "ck1" / META_FILE)

    # a corrupted file is not hashed in the request (the trainer verifies it at load and fails the
    # job with the CheckpointError text: tests/worker/test_lease.py); a missing manifest ⇒ 422
    (tmp_path / "ck1" / "optimizer.pt").write_bytes(b"tampered")
    tampered = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]], parent_checkpoint_id=ck1)
    assert tampered.status_code == 201, tampered.text
    (tmp_path / "ck1" / META_FILE).unlink()
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], parent_checkpoint_id=ck1))
    assert err["code"] == "invalid_parent_checkpoint" and "meta.json" in err["message"]


# --------------------------------------------------------------------------- rounds: validation


def test_round_feedback_ids(client: TestClient, client_b: TestClient, run: dict, pairwise_fb: dict) -> None:
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"], "fb_000000000000000000000000"]), 404)
    assert err["code"] == "feedback_not_found" and err["details"]["field"] == "feedback_ids[1]"
    b_fb = upload(client_b, jsonl(pairwise_records(3))).json()
    err = _err(_round(client, run["id"], feedback_ids=[b_fb["id"]]), 404)
    assert err["code"] == "feedback_not_found" and err["details"]["field"] == "feedback_ids[0]"
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"], pairwise_fb["id"]]))
    assert err["code"] == "duplicate_feedback_id"
    assert _err(_round(client, run["id"], feedback_ids=[]))["code"] == "validation_error"
    assert _err(_round(client, run["id"]))["code"] == "validation_error"


def test_round_loss_checks(client: TestClient, run: dict, pairwise_fb: dict, binary_fb: dict, scalar_fb: dict) -> None:
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], loss={"name": "orpo"}))
    assert err["code"] == "validation_error" and err["details"]["errors"][0]["field"].startswith("loss")
    err = _err(_round(client, run["id"], feedback_ids=[binary_fb["id"]]))  # dpo on binary feedback
    assert err["code"] == "loss_feedback_mismatch" and "binary" in err["message"]
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], loss={"name": "kto"}))
    assert err["code"] == "loss_feedback_mismatch" and "pairwise_to_unpaired" in err["message"]
    err = _err(_round(client, run["id"], feedback_ids=[scalar_fb["id"]]))
    assert err["code"] == "loss_feedback_mismatch" and "scalar_to_pairs" in err["message"]
    ok = _round(
        client,
        run["id"],
        feedback_ids=[pairwise_fb["id"]],
        loss={"name": "kto"},
        conversion={"type": "pairwise_to_unpaired"},
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["loss"]["name"] == "kto" and ok.json()["conversion"]["type"] == "pairwise_to_unpaired"


def test_round_hyperparams_checks(
    app, keys, client: TestClient, run: dict, pairwise_fb: dict, settings: Settings
) -> None:
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], hyperparams={"batch_size": 5}))
    assert (
        err["code"] == "invalid_hyperparams"
        and "divisible" in err["message"]
        and err["details"]["field"] == "hyperparams"
    )
    err = _err(
        _round(
            client,
            run["id"],
            feedback_ids=[pairwise_fb["id"]],
            loss={"name": "kto"},
            conversion={"type": "pairwise_to_unpaired"},
            hyperparams={"microbatch_size": 1},
        )
    )
    assert err["code"] == "invalid_hyperparams" and "KTO" in err["message"]
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], hyperparams={"lr": None}))
    assert err["code"] == "validation_error"
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], hyperparams={"max_prompt_length": 64}))
    assert err["code"] == "invalid_hyperparams"
    # the same batch on a 2-process worker does not divide
    two = create_app(settings.model_copy(update={"num_processes": 2}))
    with TestClient(two, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:
        err = _err(_round(c, run["id"], feedback_ids=[pairwise_fb["id"]], hyperparams={"microbatch_size": 4}))
    assert err["code"] == "invalid_hyperparams" and "num_processes 2" in err["message"]
    # multi-node rounds: at most HALOS_MAX_NODES nodes (default 1), and the batch divides over every rank
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], hyperparams={"nodes": 2}))
    assert err["code"] == "invalid_hyperparams" and err["details"] == {
        "field": "hyperparams.nodes",
        "reason": err["message"],
        "max_nodes": 1,
    }
    assert "HALOS_MAX_NODES=1" in err["message"]
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], hyperparams={"nodes": 0}))
    assert err["code"] == "validation_error"
    multi = create_app(settings.model_copy(update={"max_nodes": 4}))
    with TestClient(multi, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:
        err = _err(
            _round(c, run["id"], feedback_ids=[pairwise_fb["id"]], hyperparams={"nodes": 4, "microbatch_size": 2})
        )
        assert err["code"] == "invalid_hyperparams" and "x num_processes 1 x nodes 4" in err["message"]
        ok = _round(c, run["id"], feedback_ids=[pairwise_fb["id"]], hyperparams={"nodes": 2, "microbatch_size": 2})
        assert ok.status_code == 201, ok.text
        assert ok.json()["hyperparams"]["nodes"] == 2


def test_round_conversion_null_drops_runs_conversion(client: TestClient, model: dict, pairwise_fb: dict) -> None:
    run = client.post(
        "/v1/runs",
        json={
            "model_id": model["id"],
            "loss": {"name": "kto"},
            "hyperparams": SMALL_HP,
            "conversion": {"type": "pairwise_to_unpaired"},
        },
    ).json()
    assert _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).status_code == 201
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], conversion=None))
    assert err["code"] == "loss_feedback_mismatch"


def test_round_unknown_run_404(client: TestClient, pairwise_fb: dict) -> None:
    err = _err(_round(client, "run_000000000000000000000000", feedback_ids=[pairwise_fb["id"]]), 404)
    assert err["code"] == "run_not_found"


# --------------------------------------------------------------------------- rounds: idempotency


def test_round_idempotency_sequential_and_reuse(
    client: TestClient, session: Session, run: dict, pairwise_fb: dict
) -> None:
    h = {"Idempotency-Key": "round-1"}
    a = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [pairwise_fb["id"]]}, headers=h)
    b = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [pairwise_fb["id"]]}, headers=h)
    assert a.status_code == b.status_code == 201
    assert a.json()["round_id"] == b.json()["round_id"] and b.headers["Idempotent-Replayed"] == "true"
    c = client.post(
        f"/v1/runs/{run['id']}/rounds",
        json={"feedback_ids": [pairwise_fb["id"]], "hyperparams": {"lr": 1e-3}},
        headers=h,
    )
    assert _err(c)["code"] == "idempotency_key_reused"
    n = session.exec(select(func.count()).select_from(Round)).one()
    session.rollback()
    assert n == 1


def test_round_idempotency_10_concurrent(app, keys, session: Session, run: dict, pairwise_fb: dict) -> None:
    with TestClient(app, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:

        def post(_: int):
            return c.post(
                f"/v1/runs/{run['id']}/rounds",
                json={"feedback_ids": [pairwise_fb["id"]]},
                headers={"Idempotency-Key": "same-round"},
            )

        with ThreadPoolExecutor(max_workers=10) as pool:
            responses = list(pool.map(post, range(10)))
    assert [r.status_code for r in responses] == [201] * 10, [r.text for r in responses]
    assert len({r.json()["round_id"] for r in responses}) == 1
    n_rounds = session.exec(select(func.count()).select_from(Round)).one()
    n_jobs = session.exec(select(func.count()).select_from(Job)).one()
    session.rollback()
    assert n_rounds == 1 and n_jobs == 1

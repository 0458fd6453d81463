"""Jobs (status, metrics, logs, cancel; Q9) and checkpoints (get, lineage)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import Session

from halos_core.round_result import RoundResult
from server import jobs
from server.models import Checkpoint, Job, MetricPoint, Round
from tests.server.conftest import round_checkpoint_id, work_job

UNKNOWN_JOB = "job_000000000000000000000000"


def _new_round(client: TestClient, run: dict, fb: dict, **extra) -> dict:
    resp = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]], **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_get_job(client: TestClient, run: dict, pairwise_fb: dict) -> None:
    rnd = _new_round(client, run, pairwise_fb)
    job = client.get(f"/v1/jobs/{rnd['job_id']}").json()
    assert job["id"] == rnd["job_id"] and job["status"] == "queued" and job["attempt"] == 0
    assert job["max_attempts"] == 3 and job["kind"] == "round"
    assert job["progress"] == {"step": 0, "round_step": 0, "total_steps": None, "examples": 0}
    assert job["run_id"] == run["id"] and job["round_index"] == 1 and job["round_id"] == rnd["round_id"]
    assert job["created_at"] and job["queued_at"] and job["started_at"] is None and job["checkpoint_id"] is None
    listed = client.get("/v1/jobs", params={"status": "queued"}).json()["items"]
    assert [j["id"] for j in listed] == [rnd["job_id"]]
    assert client.get("/v1/jobs", params={"status": "running"}).json()["items"] == []
    assert client.get("/v1/jobs", params={"status": "bogus"}).status_code == 422


def test_job_list_pages_every_job_once_newest_first(client: TestClient, run: dict, pairwise_fb: dict) -> None:
    made = [_new_round(client, run, pairwise_fb)["job_id"] for _ in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        pages += 1
        for item in page["items"]:  # a page shows what the single-job view shows
            assert item == client.get(f"/v1/jobs/{item['id']}").json() | {"elapsed_s": item["elapsed_s"]}
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1] and pages == 3
    assert client.get("/v1/jobs", params={"cursor": "garbage"}).status_code == 422


def test_unknown_job_404_everywhere(client: TestClient) -> None:  # Q9
    for method, path in [("GET", ""), ("GET", "/metrics"), ("GET", "/logs"), ("POST", "/cancel")]:
        for job_id in (UNKNOWN_JOB, "garbage", "job_%00"):
            resp = client.request(method, f"/v1/jobs/{job_id}{path}")
            assert resp.status_code == 404, (method, path, job_id, resp.text)
            assert resp.json()["error"]["code"] == "job_not_found"


def test_progress_and_checkpoint_after_success(
    client: TestClient, session: Session, run: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    rnd = _new_round(client, run, pairwise_fb)
    session.expire_all()
    claim = jobs.claim(session, rnd["job_id"], "h", 1, 60)
    jobs.record_progress(
        session,
        rnd["job_id"],
        claim.lease_token,
        [{"step": 1, "round_step": 1, "total_steps": 4, "examples": 4, "loss": 0.69}],
    )
    session.rollback()
    job = client.get(f"/v1/jobs/{rnd['job_id']}").json()
    assert job["status"] == "running" and job["attempt"] == 1 and job["started_at"]
    assert job["progress"]["step"] == 1 and job["progress"]["total_steps"] == 4
    assert job["latest_metrics"]["loss"] == 0.69
    from tests.server.conftest import make_checkpoint_dir

    make_checkpoint_dir(tmp_path / "ck")
    jobs.finish(
        session,
        rnd["job_id"],
        claim.lease_token,
        jobs.Outcome(
            "succeeded",
            result=RoundResult(
                job_id=rnd["job_id"],
                final_dir=str(tmp_path / "ck"),
                manifest_sha256="m",
                step=4,
                examples=16,
                round_step=4,
                total_steps=4,
                loss="dpo",
                reference_sha256="r",
            ),
        ),
    )
    session.rollback()
    job = client.get(f"/v1/jobs/{rnd['job_id']}").json()
    assert job["status"] == "succeeded" and job["finished_at"]
    assert job["checkpoint_id"] == round_checkpoint_id(session, rnd["round_id"])


def test_metrics_series(client: TestClient, session: Session, run: dict, pairwise_fb: dict) -> None:
    rnd = _new_round(client, run, pairwise_fb)
    jid = rnd["job_id"]
    points = [
        (1, 1, "train", 0.9),
        (2, 1, "train", 0.8),
        (3, 1, "train", 0.7),  # attempt 1 crashed after step 3
        (3, 2, "train", 0.65),
        (4, 2, "train", 0.6),
        (4, 2, "eval", 0.5),
        (5, 2, "train", 0.55),
    ]
    for step, attempt, split, loss in points:
        session.add(MetricPoint(job_id=jid, attempt=attempt, step=step, split=split, data={"loss": loss, "step": step}))
    session.commit()
    series = client.get(f"/v1/jobs/{jid}/metrics").json()
    assert [(m["step"], m["split"], m["attempt"]) for m in series["items"]] == [
        (1, "train", 1),
        (2, "train", 1),
        (3, "train", 2),
        (4, "eval", 2),
        (4, "train", 2),
        (5, "train", 2),
    ]
    assert series["next_after_step"] is None and series["items"][2]["data"]["loss"] == 0.65
    train = client.get(f"/v1/jobs/{jid}/metrics", params={"split": "train", "after_step": 2}).json()["items"]
    assert [m["step"] for m in train] == [3, 4, 5]
    ev = client.get(f"/v1/jobs/{jid}/metrics", params={"split": "eval"}).json()["items"]
    assert [(m["step"], m["data"]["loss"]) for m in ev] == [(4, 0.5)]
    # paging by steps
    page1 = client.get(f"/v1/jobs/{jid}/metrics", params={"limit": 2}).json()
    assert [m["step"] for m in page1["items"]] == [1, 2] and page1["next_after_step"] == 2
    page2 = client.get(f"/v1/jobs/{jid}/metrics", params={"limit": 2, "after_step": 2}).json()
    assert [m["step"] for m in page2["items"]] == [3, 4, 4] and page2["next_after_step"] == 4
    page3 = client.get(f"/v1/jobs/{jid}/metrics", params={"limit": 2, "after_step": 4}).json()
    assert [m["step"] for m in page3["items"]] == [5] and page3["next_after_step"] is None
    # after_step beyond an INTEGER column (Postgres: an out-of-range error, a 500) is refused
    for bad in ({"limit": 0}, {"after_step": "x"}, {"after_step": 2**31}, {"split": "a" * 11}, {"split": "tr ain"}):
        assert client.get(f"/v1/jobs/{jid}/metrics", params=bad).status_code == 422, bad
    # a point stored without data (JSON null) reads as {}; on SQLite a NaN is stored as JSON's
    # non-standard NaN (json.dumps; Postgres' json type refuses it): read back, sent as null
    session.add(MetricPoint(job_id=jid, attempt=2, step=6, split="train", data=None))
    if session.get_bind().dialect.name == "sqlite":
        session.add(MetricPoint(job_id=jid, attempt=2, step=7, split="train", data={"loss": float("nan")}))
    session.commit()
    last = client.get(f"/v1/jobs/{jid}/metrics", params={"after_step": 5}).json()["items"]
    expected = [(6, {}), (7, {"loss": None})] if session.get_bind().dialect.name == "sqlite" else [(6, {})]
    assert [(m["step"], m["data"]) for m in last] == expected


def test_logs_tail(client: TestClient, session: Session, run: dict, pairwise_fb: dict) -> None:
    rnd = _new_round(client, run, pairwise_fb)
    resp = client.get(f"/v1/jobs/{rnd['job_id']}/logs")
    assert resp.status_code == 200 and resp.text == "" and resp.headers["content-type"].startswith("text/plain")
    job = session.get(Job, rnd["job_id"])
    run_dir = Path(job.run_dir)
    session.rollback()
    run_dir.mkdir(parents=True)
    lines = [f"line {i} ünïcode\n" for i in range(1000)]
    (run_dir / "stdout.log").write_bytes("".join(lines).encode() + b"\xff broken utf8\n")
    full = client.get(f"/v1/jobs/{rnd['job_id']}/logs").text
    assert full.startswith("line 0 ") and full.endswith("broken utf8\n")
    tail = client.get(f"/v1/jobs/{rnd['job_id']}/logs", params={"tail_bytes": 100}).text
    assert tail.endswith("broken utf8\n") and len(tail.encode()) <= 100 and tail.startswith("line ")
    assert client.get(f"/v1/jobs/{rnd['job_id']}/logs", params={"tail_bytes": 0}).status_code == 422


def test_cancel(client: TestClient, session: Session, run: dict, pairwise_fb: dict, tmp_path: Path) -> None:
    r1 = _new_round(client, run, pairwise_fb)
    r2 = _new_round(client, run, pairwise_fb)  # waiting on r1
    resp = client.post(f"/v1/jobs/{r2['job_id']}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{r2['job_id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    # running ⇒ cancelling (the worker kills the process group and reports)
    session.expire_all()
    jobs.claim(session, r1["job_id"], "h", 1, 60)
    session.rollback()
    resp = client.post(f"/v1/jobs/{r1['job_id']}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelling" and resp.json()["cancel_requested"]


def test_cancel_succeeded_job_409(
    client: TestClient, session: Session, run: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    rnd = _new_round(client, run, pairwise_fb)
    work_job(session, rnd["job_id"], "succeeded", tmp_path / "ck")
    resp = client.post(f"/v1/jobs/{rnd['job_id']}/cancel")
    assert resp.status_code == 409 and resp.json()["error"]["details"]["status"] == "succeeded"


# --------------------------------------------------------------------------- checkpoints and lineage


def test_lineage_from_inserted_rows(
    client: TestClient, session: Session, model: dict, run: dict, pairwise_fb: dict, binary_fb: dict
) -> None:
    r1 = _new_round(client, run, pairwise_fb)
    r2 = _new_round(client, run, pairwise_fb, hyperparams={"lr": 1e-5})
    rows = {r.id: r for r in (session.get(Round, r1["round_id"]), session.get(Round, r2["round_id"]))}
    c1 = Checkpoint(
        project_id=rows[r1["round_id"]].project_id,
        run_id=run["id"],
        round_id=r1["round_id"],
        job_id=r1["job_id"],
        model_id=model["id"],
        parent_id=None,
        path="/ck/1",
        manifest_sha256="a" * 64,
        step=4,
        examples=16,
    )
    session.add(c1)
    session.flush()
    c2 = Checkpoint(
        project_id=c1.project_id,
        run_id=run["id"],
        round_id=r2["round_id"],
        job_id=r2["job_id"],
        model_id=model["id"],
        parent_id=c1.id,
        path="/ck/2",
        manifest_sha256="b" * 64,
        step=8,
        examples=32,
    )
    session.add(c2)
    session.commit()

    got = client.get(f"/v1/checkpoints/{c2.id}").json()
    assert got["id"] == c2.id and got["parent_id"] == c1.id and got["round_index"] == 2 and got["step"] == 8
    assert got["run_id"] == run["id"] and got["model_id"] == model["id"] and got["path"] == "/ck/2"

    lin = client.get(f"/v1/checkpoints/{c2.id}/lineage").json()
    assert lin["checkpoint_id"] == c2.id
    assert [i["checkpoint_id"] for i in lin["items"]] == [c2.id, c1.id]
    first, second = lin["items"]
    assert (first["round_index"], first["step"], first["examples"], first["manifest_sha256"]) == (2, 8, 32, "b" * 64)
    assert first["hyperparams"]["lr"] == 1e-5 and second["hyperparams"]["lr"] == 5e-6
    assert first["loss"]["name"] == "dpo" and second["feedback_ids"] == [pairwise_fb["id"]]
    assert first["job_id"] == r2["job_id"] and second["round_id"] == r1["round_id"]
    assert set(first) == {
        "checkpoint_id",
        "round_id",
        "round_index",
        "job_id",
        "step",
        "examples",
        "manifest_sha256",
        "feedback_ids",
        "loss",
        "hyperparams",
        "conversion",
        "state",  # whole | optimizer_pruned | pruned (storage lifecycle)
    }
    assert first["state"] == "whole"
    assert lin["model"] == {"id": model["id"], "name": model["name"], "path": model["path"], "sha256": model["sha256"]}


def test_lineage_through_real_rounds(
    client: TestClient, session: Session, model: dict, run: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    r1 = _new_round(client, run, pairwise_fb)
    r2 = _new_round(client, run, pairwise_fb)
    work_job(session, r1["job_id"], "succeeded", tmp_path / "c1", step=4)
    work_job(session, r2["job_id"], "succeeded", tmp_path / "c2", step=8)
    c2 = round_checkpoint_id(session, r2["round_id"])
    c1 = round_checkpoint_id(session, r1["round_id"])
    lin = client.get(f"/v1/checkpoints/{c2}/lineage").json()
    assert [(i["checkpoint_id"], i["round_index"], i["step"]) for i in lin["items"]] == [(c2, 2, 8), (c1, 1, 4)]
    assert lin["model"]["sha256"] == model["sha256"]


def test_unknown_checkpoint_404(client: TestClient) -> None:
    for path in ("", "/lineage"):
        resp = client.get(f"/v1/checkpoints/ckpt_000000000000000000000000{path}")
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "checkpoint_not_found"

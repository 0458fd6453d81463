"""Auth (S3: hashed keys, revocation at once), project isolation (S2/I7: 404 not 403), rate limit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from halos_core.synthetic import pairwise_records
from server.app import create_app
from server.models import ApiKey, Checkpoint
from server.services.keys import create_api_key, revoke_api_key
from server.services.ratelimit import SlidingWindowLimiter
from server.settings import Settings
from tests.server.conftest import SMALL_HP, jsonl, make_model_dir, upload, work_job

PROTECTED = [
    ("GET", "/v1/feedback"),
    ("POST", "/v1/feedback"),
    ("GET", "/v1/models"),
    ("POST", "/v1/models"),
    ("GET", "/v1/runs"),
    ("POST", "/v1/runs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/job_x"),
    ("GET", "/v1/checkpoints/ckpt_x/lineage"),
]


def test_missing_unknown_malformed_key_401(anon: TestClient) -> None:
    for method, path in PROTECTED:
        for headers in (
            {},
            {"Authorization": "Bearer hk_unknown"},
            {"Authorization": "Basic dXNlcjpwYXNz"},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer " + "x" * 5000},
        ):
            resp = anon.request(method, path, headers=headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.json()["error"]["code"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_keys_stored_hashed_only(session: Session, settings: Settings, engine) -> None:
    key, secret = create_api_key(session, "gamma")
    assert secret.startswith("hk_") and len(secret) > 40
    row = session.get(ApiKey, key.id)
    session.rollback()
    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest() and row.prefix == secret[:11]
    # every value of every row of every table, as text
    from sqlmodel import SQLModel

    dump = []
    for table in SQLModel.metadata.sorted_tables:
        dump += [repr(tuple(row)) for row in session.exec(select(table)).all()]
    session.rollback()
    assert secret[11:] not in "\n".join(dump)
    if settings.db_url.startswith("sqlite"):  # and the raw database files (WAL flushed)
        engine.dispose()
        db_bytes = b"".join(
            p.read_bytes() for p in Path(settings.db_url.removeprefix("sqlite:///")).parent.glob("halos.db*")
        )
        assert secret.encode() not in db_bytes and secret[11:].encode() not in db_bytes


# Both ways a GET authenticates: the ProjectDep dependency (/v1/runs) and read_view, the polled job
# route's dependency-free path (/v1/jobs/{id}: 404 for an unknown job once the key is accepted).
READ_PATHS = [("/v1/runs", 200), ("/v1/jobs/job_unknown", 404)]


@pytest.mark.parametrize(("path", "accepted"), READ_PATHS)
def test_revoked_key_401_at_once(client: TestClient, session: Session, keys: dict, path: str, accepted: int) -> None:
    assert client.get(path).status_code == accepted
    revoked = revoke_api_key(session, keys["alpha"][:11])  # by the displayed prefix
    assert revoked.revoked_at is not None
    resp = client.get(path)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert revoke_api_key(session, revoked.id).revoked_at == revoked.revoked_at  # idempotent


def test_revoke_unknown_key(session: Session, engine) -> None:
    from server.errors import NotFound

    with pytest.raises(NotFound):
        revoke_api_key(session, "key_doesnotexist")


@pytest.mark.parametrize("first", ["/v1/runs", "/v1/jobs/job_unknown"])
def test_auth_disabled_uses_default_project(settings: Settings, engine, first: str) -> None:
    app = create_app(settings.model_copy(update={"auth_enabled": False}))
    with TestClient(app) as c:
        # the first request of a new database, without a key, creates the default project
        resp = c.get(first)
        assert resp.status_code in (200, 404) and resp.json().get("error", {}).get("code") != "unauthorized"
        resp = upload(c, jsonl(pairwise_records(2)))
        assert resp.status_code == 201
        assert c.get(f"/v1/feedback/{resp.json()['id']}").status_code == 200


@pytest.mark.parametrize(("path", "accepted"), READ_PATHS)
def test_rate_limit_429_retry_after(settings: Settings, engine, keys: dict, path: str, accepted: int) -> None:
    app = create_app(settings.model_copy(update={"rate_limit_per_minute": 3}))
    with (
        TestClient(app, headers={"Authorization": f"Bearer {keys['alpha']}"}) as a,
        TestClient(app, headers={"Authorization": f"Bearer {keys['beta']}"}) as b,
    ):
        assert [a.get(path).status_code for _ in range(3)] == [accepted] * 3
        resp = a.get(path)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert b.get(path).status_code == accepted  # per key
        assert a.get("/healthz").status_code == 200  # health is not rate limited


def test_sliding_window() -> None:
    now = [1000.0]
    lim = SlidingWindowLimiter(2, window_s=60, clock=lambda: now[0])
    assert lim.hit("k") is None and lim.hit("k") is None
    assert lim.hit("k") == pytest.approx(60.0)
    now[0] += 30
    assert lim.hit("k") == pytest.approx(30.0)
    now[0] += 30.001
    assert lim.hit("k") is None  # the first hit left the window
    assert lim.hit("other") is None
    assert SlidingWindowLimiter(0).hit("k") is None  # 0 disables


# --------------------------------------------------------------------------- S2: cross-project isolation


def test_every_endpoint_with_an_id_answers_404_across_projects(
    client: TestClient, client_b: TestClient, session: Session, tmp_path: Path
) -> None:
    # project A: feedback, model, run, two rounds (jobs), a checkpoint
    fb = upload(client, jsonl(pairwise_records(4))).json()
    model = client.post("/v1/models", json={"name": "a", "path": str(make_model_dir(tmp_path / "a"))}).json()
    run = client.post(
        "/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}, "hyperparams": SMALL_HP}
    ).json()
    r1 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}).json()
    work_job(session, r1["job_id"], "succeeded", tmp_path / "ck")
    ckpt = session.exec(select(Checkpoint)).one()
    session.expunge(ckpt)  # detached, so reading it does not reopen a (write-locking) SQLite transaction
    session.rollback()
    job_id = r1["job_id"]

    # project B has its own objects, so body references are otherwise valid
    b_fb = upload(client_b, jsonl(pairwise_records(4, seed=5))).json()
    b_model = client_b.post("/v1/models", json={"name": "b", "path": str(make_model_dir(tmp_path / "b"))}).json()
    b_run = client_b.post(
        "/v1/runs", json={"model_id": b_model["id"], "loss": {"name": "dpo"}, "hyperparams": SMALL_HP}
    ).json()

    calls = [
        ("GET", f"/v1/feedback/{fb['id']}", None, "feedback_not_found"),
        ("GET", f"/v1/models/{model['id']}", None, "model_not_found"),
        ("GET", f"/v1/runs/{run['id']}", None, "run_not_found"),
        ("POST", f"/v1/runs/{run['id']}/rounds", {"feedback_ids": [b_fb["id"]]}, "run_not_found"),
        ("GET", f"/v1/jobs/{job_id}", None, "job_not_found"),
        ("GET", f"/v1/jobs/{job_id}/metrics", None, "job_not_found"),
        ("GET", f"/v1/jobs/{job_id}/logs", None, "job_not_found"),
        ("POST", f"/v1/jobs/{job_id}/cancel", None, "job_not_found"),
        ("GET", f"/v1/checkpoints/{ckpt.id}", None, "checkpoint_not_found"),
        ("GET", f"/v1/checkpoints/{ckpt.id}/lineage", None, "checkpoint_not_found"),
        # ids of A inside B's request bodies
        ("POST", "/v1/runs", {"model_id": model["id"], "loss": {"name": "dpo"}}, "model_not_found"),
        ("POST", f"/v1/runs/{b_run['id']}/rounds", {"feedback_ids": [fb["id"]]}, "feedback_not_found"),
        (
            "POST",
            f"/v1/runs/{b_run['id']}/rounds",
            {"feedback_ids": [b_fb["id"]], "parent_checkpoint_id": ckpt.id},
            "checkpoint_not_found",
        ),
    ]
    for method, path, body, code in calls:
        resp = client_b.request(method, path, json=body)
        assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
        assert resp.json()["error"]["code"] == code
        # indistinguishable from an id that never existed (I7: B cannot even detect A's objects)
        fake = (
            path.replace(fb["id"], "fb_" + "0" * 24)
            .replace(model["id"], "mdl_" + "0" * 24)
            .replace(run["id"], "run_" + "0" * 24)
            .replace(job_id, "job_" + "0" * 24)
            .replace(ckpt.id, "ckpt_" + "0" * 24)
        )
        fake_body = body
        if body:
            fake_body = {
                k: (
                    v.replace(model["id"], "mdl_" + "0" * 24).replace(ckpt.id, "ckpt_" + "0" * 24)
                    if isinstance(v, str)
                    else [x.replace(fb["id"], "fb_" + "0" * 24) for x in v]
                    if isinstance(v, list)
                    else v
                )
                for k, v in body.items()
            }
        other = client_b.request(method, fake, json=fake_body)
        assert other.status_code == 404 and other.json()["error"]["code"] == code
        assert set(other.json()["error"]["details"]) == set(resp.json()["error"]["details"])

    # B's lists show none of A's objects; A's objects are unchanged (the cancel did nothing)
    assert [x["id"] for x in client_b.get("/v1/feedback").json()["items"]] == [b_fb["id"]]
    assert [x["id"] for x in client_b.get("/v1/models").json()["items"]] == [b_model["id"]]
    assert [x["id"] for x in client_b.get("/v1/runs").json()["items"]] == [b_run["id"]]
    assert client_b.get("/v1/jobs").json()["items"] == []
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert len(client.get(f"/v1/runs/{run['id']}").json()["rounds"]) == 1

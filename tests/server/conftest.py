"""Fixtures for the API tests: the real app on a temp data dir with a real SQLite database.

`client` is authenticated as project "alpha", `client_b` as project "beta", `anon` sends no key.
The broker is the embedded SQLite one under the temp dir, so `queue.publish` really publishes.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel

from halos_core.round_result import RoundResult
from halos_core.run_dir import write_manifest
from halos_core.synthetic import binary_records, pairwise_records, scalar_records, to_jsonl_bytes
from server.app import create_app
from server.db import get_engine
from server.models import Job, Round
from server.services.keys import create_api_key
from server.settings import Settings

PG_ADMIN_URL = os.environ.get("HALOS_TEST_POSTGRES_URL")  # e.g. postgresql://postgres@127.0.0.1:5432/postgres


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite under the temp dir; with HALOS_TEST_POSTGRES_URL set, a fresh Postgres database per test."""
    if not PG_ADMIN_URL:
        yield f"sqlite:///{tmp_path / 'halos.db'}"
        return
    import psycopg

    name = f"halos_api_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        from server.db import _engine_for

        _engine_for.cache_clear()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        max_upload_bytes=256 * 1024,
        rate_limit_per_minute=0,
        num_processes=1,
        max_attempts=3,
        events_stream_max_s=0.5,  # an event stream of a job nobody runs ends (the client would reconnect)
        events_poll_interval_s=0.1,
        model_roots=[tmp_path],  # the tests build model directories anywhere under tmp_path
    )


@pytest.fixture
def engine(settings: Settings):
    engine = get_engine(settings)
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as s:
        yield s


@pytest.fixture
def keys(session: Session) -> dict[str, str]:
    """Secrets of fresh keys: "alpha" and "beta" (two projects)."""
    _, a = create_api_key(session, "alpha")
    _, b = create_api_key(session, "beta")
    return {"alpha": a, "beta": b}


@pytest.fixture
def app(settings: Settings, engine):
    yield create_app(settings)
    from server import queue

    queue.reset()


def _client(app: Any, key: str | None) -> TestClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(app, headers=headers)


@pytest.fixture
def client(app, keys) -> Iterator[TestClient]:
    with _client(app, keys["alpha"]) as c:
        yield c


@pytest.fixture
def client_b(app, keys) -> Iterator[TestClient]:
    with _client(app, keys["beta"]) as c:
        yield c


@pytest.fixture
def anon(app) -> Iterator[TestClient]:
    with _client(app, None) as c:
        yield c


# --------------------------------------------------------------------------- helpers


def jsonl(records: list[dict]) -> bytes:
    return to_jsonl_bytes(records)


def upload(client: TestClient, body: bytes, content_type: str = "application/x-ndjson", **kw: Any):
    return client.post(
        "/v1/feedback", content=body, headers={"Content-Type": content_type, **kw.pop("headers", {})}, **kw
    )


def upload_ok(client: TestClient, records: list[dict]) -> dict:
    resp = upload(client, jsonl(records))
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.fixture
def pairwise_fb(client: TestClient) -> dict:
    return upload_ok(client, pairwise_records(8, seed=1))


@pytest.fixture
def binary_fb(client: TestClient) -> dict:
    return upload_ok(client, binary_records(8, seed=2))


@pytest.fixture
def scalar_fb(client: TestClient) -> dict:
    return upload_ok(client, scalar_records(4, outputs_per_prompt=3, seed=3))


def make_model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    return path


@pytest.fixture
def model(client: TestClient, tmp_path: Path) -> dict:
    resp = client.post("/v1/models", json={"name": "tiny", "path": str(make_model_dir(tmp_path / "sft"))})
    assert resp.status_code == 201, resp.text
    return resp.json()


SMALL_HP = {"batch_size": 4, "microbatch_size": 2, "max_length": 64, "max_prompt_length": 32}


@pytest.fixture
def run(client: TestClient, model: dict) -> dict:
    resp = client.post(
        "/v1/runs",
        json={"name": "r", "model_id": model["id"], "loss": {"name": "dpo", "beta": 0.1}, "hyperparams": SMALL_HP},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def make_checkpoint_dir(path: Path, step: int = 4, examples: int = 16, **manifest_extra: Any) -> Path:
    """A complete checkpoint directory; `manifest_extra`: what its trainer would record in meta.json
    (e.g. `head="reward"` for a bradley_terry round's)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\x01" * 32)
    (path / "optimizer.pt").write_bytes(b"\x02" * 32)
    write_manifest(path, step=step, examples=examples, **manifest_extra)
    return path


def work_job(
    session: Session,
    job_id: str,
    outcome: str = "succeeded",
    ckpt_dir: Path | None = None,
    step: int = 4,
    examples: int = 16,
    loss: str = "dpo",
    **manifest_extra: Any,
) -> Job:
    """Do what a worker does, through the real state machine: claim, then finish with `outcome`
    (on success with a real checkpoint directory and manifest)."""
    from server import jobs

    session.expire_all()
    claim = jobs.claim(session, job_id, "test-host", 1, 60)
    assert claim is not None, f"job {job_id} not claimable"
    result: RoundResult | None = None
    if outcome == "succeeded":
        assert ckpt_dir is not None
        manifest = make_checkpoint_dir(ckpt_dir, step, examples, **manifest_extra)
        from halos_core.run_dir import read_manifest

        result = RoundResult(
            job_id=job_id,
            final_dir=str(manifest),
            manifest_sha256=read_manifest(manifest).sha256,
            step=step,
            examples=examples,
            round_step=step,
            total_steps=step,
            loss=loss,
            reference_sha256="0" * 64,
        )
    job = jobs.finish(
        session,
        job_id,
        claim.lease_token,
        jobs.Outcome(outcome, error=None if outcome == "succeeded" else f"test {outcome}", result=result),
        retry_backoff_s=0,
    )
    session.rollback()  # never leave a transaction open: on SQLite it would lock the app's writers out
    return job


def round_checkpoint_id(session: Session, round_id: str) -> str:
    session.expire_all()
    value = session.get(Round, round_id).checkpoint_id
    session.rollback()
    return value

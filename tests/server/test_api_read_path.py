"""The read path: GETs take no write lock, authentication costs no key lookup yet a revoked key is
refused at once in every API process, `halos serve --workers N`, and Postgres connections that the
server dropped are replaced without a ping per checkout."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel

from halos_core.synthetic import pairwise_records
from server.api.deps import get_keyless_write_session, get_principal, get_write_session
from server.app import create_app
from server.db import get_engine
from server.services.keys import create_api_key, revoke_api_key
from server.settings import Settings
from tests.server.conftest import SMALL_HP, make_model_dir, upload_ok
from tests.worker.support import REPO, fresh_pg_database, pg_available


def _dependencies(dependant) -> set:
    found = {dependant.call}
    for sub in dependant.dependencies:
        found |= _dependencies(sub)
    return found


def _api_routes(app) -> list[APIRoute]:
    """The app's `/v1` routes (FastAPI 0.165 nests included routers; older versions are flat)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        contexts = list(app.routes)
    else:
        contexts = list(iter_route_contexts(app.routes))
    routes = [getattr(c, "route", c) for c in contexts]
    return [r for r in routes if isinstance(r, APIRoute) and r.path.startswith("/v1")]


def test_reads_and_writes_declare_their_session(app) -> None:
    routes = _api_routes(app)
    assert len(routes) >= 15
    for route in routes:
        writes = bool({get_write_session, get_keyless_write_session} & _dependencies(route.dependant))
        assert writes == bool(route.methods - {"GET", "HEAD"}), (route.path, route.methods)


# GETs that need no key, and why
PUBLIC_GETS = {"/v1/labelstudio/configs/{name}": "the labelling configs shipped with the server: no project's data"}


def test_gets_without_the_principal_dependency_still_authenticate(app, anon: TestClient) -> None:
    """A GET may skip FastAPI's dependencies (`read_view`, for the polled job status) but never
    authentication: each such route answers 401 without a key and documents its security."""
    bare = [
        r
        for r in _api_routes(app)
        if "GET" in r.methods and not {get_principal, get_keyless_write_session} & _dependencies(r.dependant)
    ]
    assert "/v1/jobs/{job_id}" in {r.path for r in bare}, "the check is vacuous"
    spec = app.openapi()
    for route in bare:
        if route.path in PUBLIC_GETS:
            continue
        path = re.sub(r"\{[^}]+\}", "x_unknown", route.path)
        resp = anon.get(path)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized", (route.path, resp.text)
        assert spec["paths"][route.path]["get"].get("security") == [{"ApiKey": []}], route.path


def test_a_polled_read_waits_for_a_database_slot(
    client: TestClient, app, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """45 slow list reads hold every pooled connection (40) while a client polls its job: the poll
    waits on the event loop for a slot, as every GET does. Taking a connection without one would
    block the loop inside the pool's checkout, so the list reads (which give their connections back
    on the loop) never could: a 30 s stall, then a 500."""
    from server.services import jobs_view

    job_id = _a_job(client, tmp_path)
    listing = jobs_view.list_job_views

    def slow_list(*args, **kwargs):
        page = listing(*args, **kwargs)
        time.sleep(0.5)  # holding the request's connection
        return page

    monkeypatch.setattr(jobs_view, "list_job_views", slow_list)
    headers = dict(client.headers)

    async def scenario() -> tuple[list[int], int, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as c:
            lists = [asyncio.create_task(c.get("/v1/jobs")) for _ in range(45)]
            await asyncio.sleep(0.1)  # the lists hold their connections
            start = time.monotonic()
            poll = await c.get(f"/v1/jobs/{job_id}")
            waited = time.monotonic() - start
            return [r.status_code for r in await asyncio.gather(*lists)], poll.status_code, waited

    lists, poll, waited = asyncio.run(scenario())
    assert poll == 200 and set(lists) == {200}, (poll, lists)
    assert waited < 10, f"the poll waited {waited:.1f} s"


def _a_job(client: TestClient, tmp_path: Path) -> str:
    """A queued round's job id."""
    fb = upload_ok(client, pairwise_records(4))
    model = client.post("/v1/models", json={"name": "m", "path": str(make_model_dir(tmp_path / "m"))}).json()
    run = client.post(
        "/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}, "hyperparams": SMALL_HP}
    ).json()
    return client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}).json()["job_id"]


def test_reads_answer_while_a_writer_holds_the_sqlite_lock(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    if not settings.db_url.startswith("sqlite"):
        pytest.skip("SQLite's write lock")
    fb = upload_ok(client, pairwise_records(4))
    model = client.post("/v1/models", json={"name": "m", "path": str(make_model_dir(tmp_path / "m"))}).json()
    run = client.post(
        "/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}, "hyperparams": SMALL_HP}
    ).json()
    job_id = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}).json()["job_id"]
    holder = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"), isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")  # e.g. a worker's heartbeat, or a long write
    try:
        paths = [
            "/v1/feedback",
            f"/v1/feedback/{fb['id']}",
            "/v1/models",
            f"/v1/models/{model['id']}",
            "/v1/runs",
            f"/v1/runs/{run['id']}",
            "/v1/jobs",
            f"/v1/jobs/{job_id}",
            f"/v1/jobs/{job_id}/metrics",
            f"/v1/jobs/{job_id}/logs",
        ]
        started = time.monotonic()
        for path in paths:
            resp = client.get(path)
            assert resp.status_code == 200, (path, resp.text)
        assert time.monotonic() - started < 10  # the writers' busy timeout is 30 s: nobody waited for the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202  # writers go on once it is free


def test_revocation_reaches_every_process_at_once(settings: Settings, engine, session: Session) -> None:
    """Two API processes' worth of state (two apps, two key caches) on one database."""
    _, secret = create_api_key(session, "gamma")
    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(create_app(settings), headers=headers) as a, TestClient(create_app(settings), headers=headers) as b:
        for _ in range(3):  # both caches hold the key now
            assert a.get("/v1/runs").status_code == 200 and b.get("/v1/runs").status_code == 200
        revoke_api_key(session, secret[:11])  # as the CLI does, outside both processes
        assert a.get("/v1/runs").status_code == 401
        assert b.get("/v1/runs").status_code == 401
        _, other = create_api_key(session, "gamma")  # a new key works at once (never cached as unknown)
        assert b.get("/v1/runs", headers={"Authorization": f"Bearer {other}"}).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_workers_processes_and_cli_revocation(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HALOS_DATA_DIR": str(tmp_path / "data"),
        "HALOS_RATE_LIMIT_PER_MINUTE": "0",
        "HALOS_VALIDATION_WORKERS": "1",
    }
    env.pop("HALOS_DATABASE_URL", None)
    cli = [sys.executable, "-m", "server.cli"]
    secret = subprocess.run(
        cli + ["keys", "create", "--project", "p"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    port = _free_port()
    proc = subprocess.Popen(
        cli + ["serve", "--workers", "2", "--no-worker", "--no-sweeper", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {secret}"}
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        # fresh connections, so both API processes answer some of them (and cache the key)
        assert {httpx.get(base + "/v1/runs", headers=headers).status_code for _ in range(20)} == {200}
        subprocess.run(
            cli + ["keys", "revoke", secret[:11]], env=env, cwd=REPO, check=True, capture_output=True, timeout=120
        )
        assert {httpx.get(base + "/v1/runs", headers=headers).status_code for _ in range(20)} == {401}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert out.count("Application startup complete") == 2, out  # two API processes


@pytest.mark.postgres
def test_postgres_connections_dropped_by_the_server_are_replaced(tmp_path: Path) -> None:
    if not pg_available():
        pytest.skip("PostgreSQL not reachable")
    import psycopg

    with fresh_pg_database() as url:
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=url,
            rate_limit_per_minute=0,
            broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        )
        engine = get_engine(settings)
        SQLModel.metadata.create_all(engine)
        with Session(engine, expire_on_commit=False) as s:
            _, secret = create_api_key(s, "p")
        try:
            with TestClient(create_app(settings), headers={"Authorization": f"Bearer {secret}"}) as client:
                for _ in range(5):
                    assert client.get("/v1/runs").status_code == 200
                name = url.rsplit("/", 1)[1]
                with psycopg.connect(url, autocommit=True) as admin:  # e.g. a restart or a DBA
                    killed = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (name,),
                    ).fetchone()[0]
                assert killed >= 1
                time.sleep(0.2)  # the goodbye reaches the pooled sockets
                for _ in range(5):
                    assert client.get("/v1/runs").status_code == 200  # the first request after it, too
        finally:
            engine.dispose()

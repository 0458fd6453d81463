"""GET /healthz and /readyz (database query + broker connection)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings


def test_healthz_needs_no_key(anon: TestClient) -> None:
    resp = anon.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_readyz_with_embedded_broker(anon: TestClient) -> None:
    resp = anon.get("/readyz")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert {k: body[k] for k in ("status", "checks")} == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok"},
    }
    assert body["data_dir_free_bytes"] > 0  # the data dir's filesystem (issue 12)


def test_readyz_503_when_broker_unreachable(settings: Settings, engine) -> None:
    app = create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    with TestClient(app) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 503
    err = resp.json()["error"]
    assert err["code"] == "not_ready" and err["details"]["checks"]["database"] == "ok"
    assert err["details"]["checks"]["broker"].startswith("error")


def test_readyz_503_when_database_unreachable(settings: Settings, tmp_path: Path) -> None:
    bad = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/no/such/dir/x.db"})
    with TestClient(create_app(bad)) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["error"]["details"]["checks"]["database"].startswith("error")

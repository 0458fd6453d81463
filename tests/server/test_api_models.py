"""POST/GET /v1/models: a from_pretrained directory is checked and content-hashed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from halos_core.run_dir import tree_sha256
from tests.server.conftest import make_model_dir


def test_register_get_list(client: TestClient, tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "m")
    resp = client.post("/v1/models", json={"name": "sft-1", "path": str(d)})
    assert resp.status_code == 201, resp.text
    m = resp.json()
    assert m["id"].startswith("mdl_") and m["sha256"] == tree_sha256(d) and m["path"] == str(d.resolve())
    assert client.get(f"/v1/models/{m['id']}").json() == m
    assert [x["id"] for x in client.get("/v1/models").json()["items"]] == [m["id"]]


def test_symlinked_path_is_resolved(client: TestClient, tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "real")
    (tmp_path / "link").symlink_to(d)
    m = client.post("/v1/models", json={"name": "l", "path": str(tmp_path / "link")}).json()
    assert m["path"] == str(d.resolve())


def _err(resp) -> dict:
    assert resp.status_code == 422, resp.text
    return resp.json()["error"]


def test_path_must_be_absolute_and_exist(client: TestClient, tmp_path: Path) -> None:
    err = _err(client.post("/v1/models", json={"name": "x", "path": "relative/dir"}))
    assert err["code"] == "validation_error" and err["details"]["errors"][0]["field"] == "path"
    err = _err(client.post("/v1/models", json={"name": "x", "path": str(tmp_path / "missing")}))
    assert err["code"] == "model_dir_not_found" and err["details"]["field"] == "path"
    (tmp_path / "file").write_text("x")
    assert (
        _err(client.post("/v1/models", json={"name": "x", "path": str(tmp_path / "file")}))["code"]
        == "model_dir_not_found"
    )


def test_empty_dir_names_everything_missing(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    err = _err(client.post("/v1/models", json={"name": "x", "path": str(tmp_path / "empty")}))
    assert err["code"] == "invalid_model"
    missing = " ".join(err["details"]["missing"])
    assert "config.json" in missing and "weights" in missing and "tokenizer" in missing
    assert "config.json" in err["message"] and "weights" in err["message"] and "tokenizer" in err["message"]


@pytest.mark.parametrize(
    "mutate, missing_word",
    [
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json"),
        (lambda d: (d / "model.safetensors").unlink(), "weights"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer"),
        (lambda d: ((d / "tokenizer.json").unlink(), (d / "tokenizer_config.json").write_text("{}")), "tokenizer"),
    ],
)
def test_each_missing_part_is_named(client: TestClient, tmp_path: Path, mutate, missing_word: str) -> None:
    d = make_model_dir(tmp_path / "m")
    mutate(d)
    err = _err(client.post("/v1/models", json={"name": "x", "path": str(d)}))
    assert err["code"] == "invalid_model"
    assert len(err["details"]["missing"]) == 1 and missing_word in err["details"]["missing"][0]


def test_alternative_layouts_accepted(client: TestClient, tmp_path: Path) -> None:
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (d / "pytorch_model-00001-of-00002.bin").write_bytes(b"w")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "vocab.json").write_text("{}")
    (d / "merges.txt").write_text("")
    assert client.post("/v1/models", json={"name": "x", "path": str(d)}).status_code == 201


def test_bad_bodies(client: TestClient, tmp_path: Path) -> None:
    d = str(make_model_dir(tmp_path / "m"))
    for body in (
        {"name": "", "path": d},
        {"name": "x"},
        {"name": "x", "path": d + "\x00/x"},
        {"name": "x\x00", "path": d},
        {"name": "x", "path": d, "extra": 1},
        {"name": "x" * 201, "path": d},
    ):
        resp = client.post("/v1/models", json=body)
        assert resp.status_code == 422, body
        assert resp.json()["error"]["code"] == "validation_error"


def test_unknown_model_404(client: TestClient) -> None:
    resp = client.get("/v1/models/mdl_0123456789abcdef01234567")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"

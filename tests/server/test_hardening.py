"""Hardening: parents that train other parameters are refused at submit time, LoRA targets the
model lacks, the sweeper purges idempotency records, HALOS_MODEL_ROOTS, model hashing off the
event loop and bounded."""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlmodel import Session, select

from halos_core.config import LoraSettings, lora_structure
from halos_core.run_dir import read_manifest, write_manifest
from server import sweeper
from server.app import create_app
from server.errors import Unprocessable
from server.models import IdempotencyRecord, utcnow
from server.services import models_registry, round_checks
from server.settings import Settings
from tests.server.conftest import SMALL_HP, make_model_dir, round_checkpoint_id, work_job

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _err(resp, status: int = 422) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def _round(client: TestClient, run_id: str, **body: Any):
    return client.post(f"/v1/runs/{run_id}/rounds", json=body)


def _run(client: TestClient, model: dict, loss: str, lora: dict | None = None) -> dict:
    body: dict[str, Any] = {"model_id": model["id"], "loss": {"name": loss}, "hyperparams": SMALL_HP}
    if lora is not None:
        body["lora"] = lora
    resp = client.post("/v1/runs", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def _trainer_state(loss: str, lora: LoraSettings | None) -> dict:
    """trainer_state.json as halos_core.training writes it (the fields check_compatible reads)."""
    head = {"reward": {"kind": "reward", "hidden_size": 8}, "value": {"kind": "value", "hidden_size": 8}}.get(
        {"bradley_terry": "reward", "ppo": "value"}.get(loss, "")
    )
    return {"step": 4, "examples": 16, "loss": loss, "lora": lora_structure(lora) if lora else None, "head": head}


def _succeed(session: Session, job_id: str, path: Path, state: dict | None = None, **meta: Any) -> None:
    """Finish a job with a checkpoint holding `state` as trainer_state.json and `meta` in meta.json."""
    path.mkdir(parents=True)
    if state is not None:
        (path / "trainer_state.json").write_text(json.dumps(state))
    work_job(session, job_id, "succeeded", path)
    if meta:
        write_manifest(path, 4, 16, **meta)  # rewrites meta.json only: the file hashes stay valid


# --------------------------------------------------------------------------- 1. parent parameters


def test_head_mismatch_with_the_finished_default_parent(
    client: TestClient, session: Session, model: dict, pairwise_fb: dict, binary_fb: dict, tmp_path: Path
) -> None:
    run = _run(client, model, "dpo")
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    _succeed(session, r1["job_id"], tmp_path / "ck1", _trainer_state("dpo", None), lora=False, merged=False, head=None)

    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], loss={"name": "bradley_terry"}))
    assert err["code"] == "parent_checkpoint_incompatible" and err["details"]["field"] == "loss"
    assert err["details"]["parent_head"] is None and err["details"]["round_head"] == "reward"
    assert "reward head" in err["message"] and "'dpo'" in err["message"] and "new run" in err["message"]
    err = _err(_round(client, run["id"], feedback_ids=[binary_fb["id"]], loss={"name": "ppo"}))
    assert err["code"] == "parent_checkpoint_incompatible" and err["details"]["round_head"] == "value"

    # another head-less loss continues the same parameters
    ok = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]], loss={"name": "ipo"})
    assert ok.status_code == 201, ok.text


def test_reward_model_run_keeps_its_head(
    client: TestClient, session: Session, model: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    run = _run(client, model, "bradley_terry")
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    _succeed(session, r1["job_id"], tmp_path / "ck1", _trainer_state("bradley_terry", None))
    assert _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).status_code == 201
    ck1 = round_checkpoint_id(session, r1["round_id"])
    err = _err(
        _round(client, run["id"], feedback_ids=[pairwise_fb["id"]], loss={"name": "dpo"}, parent_checkpoint_id=ck1)
    )
    assert err["code"] == "parent_checkpoint_incompatible" and err["details"]["field"] == "loss"
    assert (
        err["details"]["parent"] == {"parent_checkpoint_id": ck1} and err["details"]["parent_loss"] == "bradley_terry"
    )


def test_head_mismatch_with_an_unfinished_parent(
    client: TestClient, model: dict, pairwise_fb: dict, binary_fb: dict
) -> None:
    run = _run(client, model, "dpo")
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()  # queued: no checkpoint yet
    err = _err(_round(client, run["id"], feedback_ids=[binary_fb["id"]], loss={"name": "ppo"}))
    assert err["code"] == "parent_checkpoint_incompatible" and err["details"]["field"] == "loss"
    assert err["details"]["parent"] == {"parent_job_id": r1["job_id"], "round_index": 1}
    assert "not finished" in err["message"]
    ok = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]], loss={"name": "simpo"})
    assert ok.status_code == 201 and ok.json()["status"] == "waiting", ok.text


def test_lora_mismatch_is_refused(
    client: TestClient, session: Session, model: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    run = _run(client, model, "dpo", lora={"r": 8})
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    # round 1's checkpoint was written with other adapter shapes (e.g. by an older server)
    _succeed(session, r1["job_id"], tmp_path / "ck1", _trainer_state("dpo", LoraSettings(r=4)))
    ck1 = round_checkpoint_id(session, r1["round_id"])
    for body in ({}, {"parent_checkpoint_id": ck1}):
        err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]], **body))
        assert err["code"] == "parent_checkpoint_incompatible" and err["details"]["field"] == "parent_checkpoint_id"
        assert err["details"]["parent_lora"]["r"] == 4 and err["details"]["round_lora"]["r"] == 8
        assert "LoRA" in err["message"]


def test_lora_structure_ignores_target_order_and_dropout(
    client: TestClient, session: Session, model: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    run = _run(client, model, "dpo", lora={"r": 8, "dropout": 0.1, "target_modules": ["v_proj", "q_proj"]})
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    _succeed(
        session,
        r1["job_id"],
        tmp_path / "ck1",
        _trainer_state("dpo", LoraSettings(r=8, target_modules=["q_proj", "v_proj"])),
    )
    assert _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).status_code == 201


def test_meta_json_fallback(
    client: TestClient, session: Session, model: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    """No trainer_state.json: meta.json's `lora` (bool) and `head` decide."""
    run = _run(client, model, "dpo")
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    _succeed(session, r1["job_id"], tmp_path / "ck1", None, lora=True, merged=True, head=None)
    err = _err(_round(client, run["id"], feedback_ids=[pairwise_fb["id"]]))
    assert err["code"] == "parent_checkpoint_incompatible" and err["details"]["parent_lora"] is True


def test_unrecorded_parameters_are_left_to_the_worker(
    client: TestClient, session: Session, model: dict, pairwise_fb: dict, tmp_path: Path
) -> None:
    run = _run(client, model, "dpo")
    r1 = _round(client, run["id"], feedback_ids=[pairwise_fb["id"]]).json()
    _succeed(session, r1["job_id"], tmp_path / "ck1", {"step": 4, "round_step": 4})  # the fake trainer's state
    assert (
        _round(client, run["id"], feedback_ids=[pairwise_fb["id"]], loss={"name": "bradley_terry"}).status_code == 201
    )


def test_server_refuses_exactly_what_the_trainer_refuses(tmp_path: Path) -> None:
    """The submit-time check against the trainer's check_compatible (both read halos_core.compat; this
    checks that both read a checkpoint's files the same way), on trainer_state.json files built with
    the trainer's own helpers, for every pair of (loss, LoRA settings)."""
    trainer = pytest.importorskip("halos_core.training")
    from halos_core.heads import build_head
    from halos_core.lora import structure
    from halos_core.run_dir import CheckpointError

    losses = ["dpo", "kto", "sft", "bradley_terry", "ppo"]
    loras = [
        None,
        LoraSettings(),
        LoraSettings(r=4),
        LoraSettings(alpha=8),
        LoraSettings(target_modules=["q_proj"]),
        LoraSettings(dropout=0.2, merge_on_export=False),
    ]
    combos = [(loss, lora) for loss in losses for lora in loras]
    refused = 0
    for i, (parent_loss, parent_lora) in enumerate(combos):
        head = build_head(parent_loss, 8)
        state = {
            "loss": parent_loss,
            "lora": structure(parent_lora) if parent_lora else None,
            "head": head.describe() if head is not None else None,
        }
        path = tmp_path / f"ck{i}"
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps(state))
        write_manifest(path, 1, 1, lora=parent_lora is not None, merged=False, head=head.kind if head else None)
        have = round_checks.checkpoint_params(read_manifest(path))
        for loss, lora in combos:
            try:
                trainer.check_compatible(
                    SimpleNamespace(trainer_state=state, path=path), SimpleNamespace(lora=lora), loss
                )
                worker_ok = True
            except CheckpointError:
                worker_ok = False
            try:
                round_checks.check_parent_params(have, loss, lora, {"parent_checkpoint_id": "ckpt_x"})
                server_ok = True
            except Unprocessable as exc:
                assert exc.code == "parent_checkpoint_incompatible"
                server_ok = False
            assert server_ok == worker_ok, (parent_loss, parent_lora, loss, lora)
            refused += not server_ok
    assert 0 < refused < len(combos) ** 2


def _write_safetensors(path: Path, names: list[str]) -> None:
    header = {"__metadata__": {"format": "pt"}}
    for i, name in enumerate(names):
        header[name] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [16 * i, 16 * (i + 1)]}
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"\x00" * 16 * len(names))


def test_lora_targets_the_model_lacks(client: TestClient, tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "llama")
    _write_safetensors(
        d / "model.safetensors",
        [
            "model.embed_tokens.weight",
            "model.norm.weight",
            *(
                f"model.layers.{i}.self_attn.{p}.weight"
                for i in range(2)
                for p in ("q_proj", "k_proj", "v_proj", "o_proj")
            ),
            *(f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")),
        ],
    )
    model = client.post("/v1/models", json={"name": "llama", "path": str(d)}).json()
    err = _err(
        client.post(
            "/v1/runs",
            json={"model_id": model["id"], "loss": {"name": "dpo"}, "lora": {"target_modules": ["c_attn", "c_proj"]}},
        )
    )
    assert err["code"] == "lora_not_applicable" and err["details"]["field"] == "lora.target_modules"
    assert "c_attn" in err["message"] and "q_proj" in err["message"]
    for targets in (LORA_TARGETS, ["gate_proj", "nonexistent"], ["self_attn.q_proj"], ["lm_head"]):
        resp = client.post(
            "/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}, "lora": {"target_modules": targets}}
        )
        assert resp.status_code == 201, (targets, resp.text)


def test_lora_on_fsdp_workers_is_refused_at_submit(client: TestClient, settings, tmp_path: Path) -> None:
    model = client.post("/v1/models", json={"name": "m", "path": str(make_model_dir(tmp_path / "m"))}).json()
    settings.fsdp = True  # the trainer refuses LoRA under FSDP; the server says so before queueing
    err = _err(client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}, "lora": {}}))
    assert err["code"] == "lora_not_supported" and err["details"]["field"] == "lora"
    assert client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}}).status_code == 201


# --------------------------------------------------------------------------- 2. idempotency purge


def test_sweeper_purges_expired_idempotency_keys(
    app, client: TestClient, session: Session, model: dict, settings: Settings
) -> None:
    body = {"model_id": model["id"], "loss": {"name": "dpo"}, "hyperparams": SMALL_HP}
    live = client.post("/v1/runs", json=body, headers={"Idempotency-Key": "live"})
    assert live.status_code == 201
    project_id = session.exec(select(IdempotencyRecord)).one().project_id
    session.add(
        IdempotencyRecord(
            project_id=project_id,
            endpoint="POST /v1/runs",
            key="old",
            request_hash="x" * 64,
            resource_id=live.json()["id"],
            status_code=201,
            created_at=utcnow() - timedelta(hours=settings.idempotency_ttl_hours, minutes=1),
        )
    )
    session.commit()

    fast = settings.model_copy(update={"sweep_interval_s": 0.05})
    thread, stop = sweeper.start_thread(fast)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            keys = {r.key for r in session.exec(select(IdempotencyRecord)).all()}
            session.rollback()
            if "old" not in keys:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    assert keys == {"live"}
    again = client.post("/v1/runs", json=body, headers={"Idempotency-Key": "live"})
    assert again.json()["id"] == live.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert sweeper.purge_idempotency_records(session, settings) == 0  # nothing left to purge


def test_purge_runs_at_most_hourly(settings: Settings, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(sweeper, "purge_idempotency_records", lambda s, st: calls.append(time.monotonic()) or 0)
    thread, stop = sweeper.start_thread(settings.model_copy(update={"sweep_interval_s": 0.02}))
    time.sleep(0.5)
    stop.set()
    thread.join(10)
    assert len(calls) == 1 and sweeper.PURGE_IDEMPOTENCY_EVERY_S == 3600.0


# --------------------------------------------------------------------------- 3. HALOS_MODEL_ROOTS


@pytest.fixture
def rooted(settings: Settings, engine, keys: dict, tmp_path: Path):
    roots = tmp_path / "models"
    roots.mkdir()
    app = create_app(settings.model_copy(update={"model_roots": [roots]}))
    with TestClient(app, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:
        yield c, roots


def test_model_roots_allow_inside_refuse_outside(rooted, tmp_path: Path) -> None:
    client, roots = rooted
    inside = make_model_dir(roots / "sft")
    assert client.post("/v1/models", json={"name": "in", "path": str(inside)}).status_code == 201

    outside = make_model_dir(tmp_path / "elsewhere")
    err = _err(client.post("/v1/models", json={"name": "out", "path": str(outside)}))
    assert err["code"] == "model_path_not_allowed" and err["details"]["field"] == "path"
    assert err["details"]["allowed_roots"] == [
        str(client.app.state.settings.models_dir.resolve()),
        str(roots.resolve()),
    ]
    # whether the path exists is not revealed
    missing = _err(client.post("/v1/models", json={"name": "x", "path": str(tmp_path / "nothing-here")}))
    assert missing["code"] == "model_path_not_allowed"
    assert _err(client.post("/v1/models", json={"name": "x", "path": "/etc"}))["code"] == "model_path_not_allowed"
    # `..` cannot climb out, and a prefix is not a parent (/…/models-evil is not under /…/models)
    climb = _err(client.post("/v1/models", json={"name": "x", "path": f"{roots}/../elsewhere"}))
    assert climb["code"] == "model_path_not_allowed"
    evil = make_model_dir(tmp_path / "models-evil")
    assert _err(client.post("/v1/models", json={"name": "x", "path": str(evil)}))["code"] == "model_path_not_allowed"


def test_model_roots_resolve_symlinks(rooted, tmp_path: Path) -> None:
    client, roots = rooted
    outside = make_model_dir(tmp_path / "elsewhere")
    (roots / "link-out").symlink_to(outside)
    err = _err(client.post("/v1/models", json={"name": "x", "path": str(roots / "link-out")}))
    assert err["code"] == "model_path_not_allowed"

    # a file inside an allowed directory that links outside the roots
    sneaky = make_model_dir(roots / "sneaky")
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (sneaky / "config.json").unlink()
    (sneaky / "config.json").symlink_to(secret)
    err = _err(client.post("/v1/models", json={"name": "x", "path": str(sneaky)}))
    assert err["code"] == "model_path_not_allowed" and "config.json" in err["message"]

    # a link from outside into the roots is fine: the resolved directory is what is registered
    inside = make_model_dir(roots / "real")
    (tmp_path / "link-in").symlink_to(inside)
    resp = client.post("/v1/models", json={"name": "x", "path": str(tmp_path / "link-in")})
    assert resp.status_code == 201 and resp.json()["path"] == str(inside.resolve())

    # a symlink loop is a 422, never a 500
    (roots / "loop-a").symlink_to(roots / "loop-b")
    (roots / "loop-b").symlink_to(roots / "loop-a")
    assert _err(client.post("/v1/models", json={"name": "x", "path": str(roots / "loop-a")}))["code"] in (
        "model_dir_not_found",
        "model_path_not_allowed",
    )


def test_model_roots_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HALOS_MODEL_ROOTS", "/models:/srv/sft")
    assert Settings().model_roots == [Path("/models"), Path("/srv/sft")]
    monkeypatch.setenv("HALOS_MODEL_ROOTS", '["/models"]')
    assert Settings().model_roots == [Path("/models")]
    monkeypatch.setenv("HALOS_MODEL_ROOTS", "")
    assert Settings().model_roots == []  # set but empty: nothing may be registered
    monkeypatch.setenv("HALOS_MODEL_ROOTS", "relative/dir")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("HALOS_MODEL_ROOTS")
    assert Settings().model_roots is None


def test_empty_roots_refuse_everything(settings: Settings, engine, keys: dict, tmp_path: Path) -> None:
    app = create_app(settings.model_copy(update={"model_roots": []}))
    with TestClient(app, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:
        err = _err(c.post("/v1/models", json={"name": "x", "path": str(make_model_dir(tmp_path / "m"))}))
    assert err["code"] == "model_path_not_allowed"


@pytest.mark.parametrize("env_value", [None, ""], ids=["unset", "empty"])
def test_default_roots_are_the_data_dirs_models_folder(
    settings: Settings, engine, keys: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env_value: str | None
) -> None:
    """Safe by default: with HALOS_MODEL_ROOTS unset (or empty) a key may register only what lies
    under <HALOS_DATA_DIR>/models, never another directory the server can read."""
    monkeypatch.delenv("HALOS_MODEL_ROOTS", raising=False)
    if env_value is not None:
        monkeypatch.setenv("HALOS_MODEL_ROOTS", env_value)
    monkeypatch.setenv("HALOS_DATA_DIR", str(settings.data_dir))
    from_env = Settings()
    assert from_env.allowed_model_roots == [settings.data_dir / "models"]
    app = create_app(settings.model_copy(update={"model_roots": from_env.model_roots}))
    assert (settings.data_dir / "models").is_dir()  # created at startup: the operator sees where models go
    with TestClient(app, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:
        outside = make_model_dir(tmp_path / "elsewhere")  # readable by the server, outside the data dir
        resp = c.post("/v1/models", json={"name": "out", "path": str(outside)})
        assert resp.status_code == 422, resp.text
        err = _err(resp)
        assert err["code"] == "model_path_not_allowed" and err["details"]["field"] == "path"
        assert err["details"]["allowed_roots"] == [str((settings.data_dir / "models").resolve())]
        for path in ("/etc", str(settings.data_dir), str(settings.data_dir / "runs")):  # nor the data dir itself
            assert _err(c.post("/v1/models", json={"name": "x", "path": path}))["code"] == "model_path_not_allowed"
        assert c.get("/v1/models").json()["items"] == []  # nothing half-stored

        inside = make_model_dir(settings.data_dir / "models" / "sft")
        resp = c.post("/v1/models", json={"name": "in", "path": str(inside)})
        assert resp.status_code == 201, resp.text
        assert resp.json()["path"] == str(inside.resolve())
        assert [m["name"] for m in c.get("/v1/models").json()["items"]] == ["in"]


def test_unrestricted_roots_warn_at_startup(
    settings: Settings, engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # unrestricted now takes an operator listing / explicitly (the default is <data_dir>/models)
    with caplog.at_level(logging.WARNING, logger="halos.api"):
        create_app(settings.model_copy(update={"model_roots": [Path("/")]}))
    assert any("HALOS_MODEL_ROOTS" in r.getMessage() for r in caplog.records)
    for roots in ([tmp_path], None):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="halos.api"):
            create_app(settings.model_copy(update={"model_roots": roots}))
        assert not any("HALOS_MODEL_ROOTS" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- 4. hashing in the request


def test_register_route_is_sync_so_it_runs_in_the_threadpool() -> None:
    from server.api import models as models_api

    assert not inspect.iscoroutinefunction(models_api.register_model)


@pytest.fixture
def blocked_hash(monkeypatch: pytest.MonkeyPatch):
    """tree_sha256 that waits for `release` (a slow, huge directory)."""
    started, release = threading.Event(), threading.Event()
    real = models_registry.tree_sha256

    def slow(directory):
        started.set()
        assert release.wait(20)
        return real(directory)

    monkeypatch.setattr(models_registry, "tree_sha256", slow)
    yield started, release
    release.set()


def test_hashing_never_blocks_other_requests(client: TestClient, tmp_path: Path, blocked_hash) -> None:
    started, release = blocked_hash
    d = make_model_dir(tmp_path / "huge")
    with ThreadPoolExecutor(2) as pool:
        registering = pool.submit(client.post, "/v1/models", json={"name": "huge", "path": str(d)})
        assert started.wait(10)
        # the event loop still answers while the registration hashes
        assert pool.submit(client.get, "/healthz").result(timeout=10).status_code == 200
        assert pool.submit(client.get, "/v1/models").result(timeout=10).status_code == 200
        assert not registering.done()
        release.set()
        assert registering.result(timeout=20).status_code == 201


def test_concurrent_hashing_is_bounded(settings: Settings, engine, keys: dict, tmp_path: Path, blocked_hash) -> None:
    started, release = blocked_hash
    app = create_app(settings.model_copy(update={"max_concurrent_model_hashes": 1}))
    with TestClient(app, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c, ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.post, "/v1/models", json={"name": "a", "path": str(make_model_dir(tmp_path / "a"))})
        assert started.wait(10)
        busy = c.post("/v1/models", json={"name": "b", "path": str(make_model_dir(tmp_path / "b"))})
        err = _err(busy, 503)
        assert err["code"] == "model_registration_busy" and int(busy.headers["Retry-After"]) > 0
        release.set()
        assert first.result(timeout=20).status_code == 201
        assert c.post("/v1/models", json={"name": "b", "path": str(tmp_path / "b")}).status_code == 201


def test_too_many_files_refused_before_reading(
    settings: Settings, engine, keys: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = make_model_dir(tmp_path / "crowded")
    for i in range(10):
        (d / f"shard-{i}.bin").write_bytes(b"x")
    monkeypatch.setattr(models_registry, "tree_sha256", lambda _d: pytest.fail("hashed a refused directory"))
    app = create_app(settings.model_copy(update={"max_model_files": 5}))
    with TestClient(app, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:
        err = _err(c.post("/v1/models", json={"name": "x", "path": str(d)}))
    assert err["code"] == "model_too_large" and err["details"]["max_files"] == 5


def test_unchanged_directory_is_not_hashed_again(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models_registry, "_hash_cache", OrderedDict())
    monkeypatch.setattr(models_registry, "RACY_WINDOW_S", -3600.0)  # trust files written just now (test only)
    calls: list[str] = []
    real = models_registry.tree_sha256
    monkeypatch.setattr(models_registry, "tree_sha256", lambda d: calls.append(str(d)) or real(d))
    d = make_model_dir(tmp_path / "m")
    first = client.post("/v1/models", json={"name": "a", "path": str(d)}).json()
    second = client.post("/v1/models", json={"name": "b", "path": str(d)}).json()
    assert len(calls) == 1 and first["sha256"] == second["sha256"]
    (d / "model.safetensors").write_bytes(b"\x07" * 64)  # same size, new content
    third = client.post("/v1/models", json={"name": "c", "path": str(d)}).json()
    assert len(calls) == 2 and third["sha256"] != first["sha256"]


def test_recently_written_files_are_always_hashed(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models_registry, "_hash_cache", OrderedDict())
    calls: list[str] = []
    real = models_registry.tree_sha256
    monkeypatch.setattr(models_registry, "tree_sha256", lambda d: calls.append(str(d)) or real(d))
    d = make_model_dir(tmp_path / "fresh")
    for name in ("a", "b"):
        assert client.post("/v1/models", json={"name": name, "path": str(d)}).status_code == 201
    assert len(calls) == 2

"""MLflow (local file store) and W&B (offline mode): one tracking run per server run across two
rounds and a crashed-and-retried attempt, every (metric, step) exactly once with the latest
attempt's value, at the run's cumulative step; lineage ids as tags; a restarted exporter (and a
crash between logging and the watermark's commit) resumes the same run without duplicates."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from sqlmodel import select

from halos_core.round_result import RoundResult
from halos_core.synthetic import pairwise_records
from server import jobs
from server.jobs import Outcome
from server.models import TrackingLink
from server.tracking.exporter import Exporter
from tests.server._seed import _ok
from tests.server.conftest import SMALL_HP, make_model_dir, upload_ok


def _same(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected])


def _train_round(session, tmp: Path, job_id: str, first: int, *, crash_after: int | None = None, exporter=None):
    """Steps first..first+3 (loss = 1/step, attempt 2 writes loss + 100 for the steps it redoes)."""
    c = jobs.claim(session, job_id, "h", 1, 60)
    steps = range(first, first + 4)
    if crash_after is not None:
        jobs.record_progress(
            session,
            job_id,
            c.lease_token,
            [{"step": s, "loss": 1 / s, "rewards/accuracy": 0.5} for s in steps if s <= crash_after],
        )
        jobs.record_checkpoint_saved(session, job_id, c.lease_token, first + 1, "step")
        if exporter:
            exporter.export_once()  # exports up to the checkpoint only
        jobs.finish(session, job_id, c.lease_token, Outcome("crashed", error="killed"), retry_backoff_s=0)
        c = jobs.claim(session, job_id, "h", 1, 60)
        steps = range(first + 2, first + 4)  # resumed from the checkpoint at first+1
    jobs.record_progress(
        session,
        job_id,
        c.lease_token,
        [{"step": s, "loss": 1 / s + (100 if crash_after else 0), "rewards/accuracy": 0.5} for s in steps]
        + [{"split": "eval", "step": first + 3, "loss": 0.25}],
    )
    d = tmp / job_id
    d.mkdir(parents=True)
    jobs.finish(
        session,
        job_id,
        c.lease_token,
        Outcome(
            "succeeded",
            result=RoundResult(
                job_id=job_id,
                final_dir=str(d),
                manifest_sha256="ab" * 32,
                step=first + 3,
                examples=4,
                round_step=4,
                total_steps=4,
                loss="dpo",
                reference_sha256="cd" * 32,
            ),
        ),
    )


def _two_rounds(client, session, settings, tmp_path, tracking):
    model_dir = make_model_dir(tmp_path / "sft")
    model = _ok(client.post("/v1/models", json={"name": "sft", "path": str(model_dir)}))
    run = _ok(
        client.post(
            "/v1/runs",
            json={
                "name": "tracked",
                "model_id": model["id"],
                "loss": {"name": "dpo"},
                "hyperparams": SMALL_HP,
                "tracking": tracking,
            },
        )
    )
    fb = upload_ok(client, pairwise_records(8, seed=3))
    r1 = _ok(client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}))
    r2 = _ok(client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb["id"]]}))
    exporter = Exporter(settings)
    settings.tracking_interval_s = 0.001  # no lease wait between the test's passes
    _train_round(session, tmp_path, r1["job_id"], 1, crash_after=3, exporter=exporter)
    exporter.export_once()
    exporter.close()
    exporter = Exporter(settings)  # a restarted process
    _train_round(session, tmp_path, r2["job_id"], 5)
    exporter.export_once()
    exporter.close()
    return run, r1, r2


@pytest.mark.parametrize("store", ["file", "default"])
def test_mlflow_one_run_across_rounds_and_retries(client, session, settings, tmp_path, monkeypatch, store):
    pytest.importorskip("mlflow", reason="pip install 'halos-server[mlflow]'")
    from mlflow.tracking import MlflowClient

    if store == "file":  # MLflow's local file store (MLflow 3 keeps it behind this switch)
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
        options = {"experiment": "exp", "tracking_uri": uri}
    else:  # the server's default: SQLite under the data dir
        uri = f"sqlite:///{(settings.data_dir / 'mlflow.db').resolve()}"
        options = {"experiment": "exp"}
    run, r1, r2 = _two_rounds(client, session, settings, tmp_path, {"mlflow": options})
    ml = MlflowClient(tracking_uri=uri)
    [mlrun] = ml.search_runs([ml.get_experiment_by_name("exp").experiment_id])
    view = client.get(f"/v1/runs/{run['id']}").json()
    assert view["tracking"][0]["tracking_run_id"] == mlrun.info.run_id
    history = [(m.step, m.value) for m in ml.get_metric_history(mlrun.info.run_id, "train/loss")]
    expected = [(1, 1.0), (2, 0.5), (3, 1 / 3 + 100), (4, 0.25 + 100)] + [(s, 1 / s) for s in range(5, 9)]
    _same(sorted(history), expected)  # step 3 of the crashed attempt is not there
    assert sorted(m.step for m in ml.get_metric_history(mlrun.info.run_id, "eval/loss")) == [4, 8]
    tags = mlrun.data.tags
    assert tags["halos.run_id"] == run["id"] and tags["halos.round.2.job_id"] == r2["job_id"]
    assert tags["halos.round.2.parent_checkpoint_id"] == view["rounds"][0]["checkpoint_id"]
    assert tags["halos.round.1.checkpoint_id"] == view["rounds"][0]["checkpoint_id"]
    assert mlrun.data.params["loss"] == "dpo"

    # a crash between logging and committing the watermark: the next process logs nothing twice
    link = session.exec(select(TrackingLink)).one()
    link.exported = {}
    session.add(link)
    session.commit()
    exporter = Exporter(settings)
    exporter.export_once()
    exporter.close()
    again = [(m.step, m.value) for m in ml.get_metric_history(mlrun.info.run_id, "train/loss")]
    assert sorted(again) == sorted(history)
    assert len(ml.search_runs([ml.get_experiment_by_name("exp").experiment_id])) == 1


def _wandb_history(root: Path) -> list[dict]:
    """History rows of every offline run file under `root` (the records `wandb sync` uploads). The
    file is a LevelDB-style log (W&B's `.wandb` format: a 7-byte file header, 32 KiB blocks, records
    with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf `Record`s; wandb
    0.31 reads it in its Go core only, so the test reads it here."""
    import struct

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(root.rglob("*.wandb")):
        data, pos, pending, records = path.read_bytes(), 7, b"", []
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a record header is padding
                pos += left
                continue
            _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind == 1:
                records.append(chunk)
            elif kind in (2, 3):
                pending += chunk
            elif kind == 4:
                records.append(pending + chunk)
                pending = b""
        for raw in records:
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_one_run_across_rounds_and_retries(client, session, settings, tmp_path):
    pytest.importorskip("wandb", reason="pip install 'halos-server[wandb]'")
    settings.wandb_dir = tmp_path / "wandb"
    run, r1, r2 = _two_rounds(client, session, settings, tmp_path, {"wandb": {"project": "p", "mode": "offline"}})
    view = client.get(f"/v1/runs/{run['id']}").json()
    run_id = view["tracking"][0]["tracking_run_id"]
    dirs = [p.name for p in (tmp_path / "wandb" / "wandb").iterdir() if p.name.startswith("offline-run")]
    # resumed segments of one W&B run; two segments started within one second get W&B's "-1" suffix
    assert dirs and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?", d) for d in dirs), dirs
    # `finish()` returns before W&B's core process has written the last segment's records (seen under
    # load: steps 5-8 reached the file a moment after the test read it), so wait for them
    deadline = time.monotonic() + 60
    while True:
        rows = _wandb_history(tmp_path / "wandb")
        if {r.get("_step") for r in rows} >= set(range(1, 9)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    train = sorted((r["_step"], r["train/loss"]) for r in rows if "train/loss" in r)
    _same(train, [(1, 1.0), (2, 0.5), (3, 1 / 3 + 100), (4, 0.25 + 100)] + [(s, 1 / s) for s in range(5, 9)])
    assert sorted(r["_step"] for r in rows if "eval/loss" in r) == [4, 8]

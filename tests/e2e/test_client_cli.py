"""The `halos` client commands against a real `halos serve` (subprocesses, real HTTP, real training).

What a CI pipeline relies on: `-o json` prints the API's own objects (byte-for-byte what the API
returns for a finished job), `--wait` shows progress on stderr and exits 1 with the reason when
the round fails, a bad feedback file prints the record-level report, and the exit codes of
`failures.py` (0 ok, 1 job failed, 2 usage, 3 refused, 5 timeout).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from halos_client.models import JobOut, RoundOut
from halos_core.synthetic import pairwise_records, to_jsonl_bytes
from tests.e2e.conftest import BIN, Deployment, embedded_deployment

pytestmark = pytest.mark.e2e

HP = [
    "--hp",
    "lr=5e-4",
    "--hp",
    "batch_size=8",
    "--hp",
    "microbatch_size=4",
    "--hp",
    "max_length=64",
    "--hp",
    "max_prompt_length=32",
]


@pytest.fixture(scope="module")
def dep(tmp_path_factory) -> Iterator[Deployment]:
    with embedded_deployment(tmp_path_factory.mktemp("cli") / "data") as deployment:
        yield deployment


def halos(dep: Deployment, *args: str, key: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**dep.env, "HALOS_BASE_URL": f"http://127.0.0.1:{dep.port}", "HALOS_API_KEY": key or dep.key or ""}
    return subprocess.run([str(BIN / "halos"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok_json(result: subprocess.CompletedProcess):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads(result.stdout)


def write_feedback(path: Path, seed: int, n: int = 64) -> Path:
    path.write_bytes(to_jsonl_bytes(pairwise_records(n, seed=seed, test_fraction=0.2, id_prefix=f"c{seed}-")))
    return path


def test_two_rounds_from_the_command_line(dep: Deployment, tiny_model_dir: Path, tmp_path: Path) -> None:
    model = ok_json(halos(dep, "models", "register", str(tiny_model_dir), "--name", "tiny", "-o", "json"))
    assert model["id"].startswith("mdl_") and len(model["sha256"]) == 64
    fb = ok_json(halos(dep, "feedback", "push", str(write_feedback(tmp_path / "r1.jsonl", 1)), "-o", "json"))
    assert fb["kind"] == "pairwise" and fb["filename"] == "r1.jsonl"
    run = ok_json(
        halos(dep, "runs", "create", "--model", model["id"], "--loss", "dpo", *HP, "--name", "cli", "-o", "json")
    )
    assert run["loss"]["name"] == "dpo" and run["hyperparams"]["lr"] == 5e-4 and run["hyperparams"]["batch_size"] == 8

    waited = halos(
        dep, "rounds", "create", run["id"], "--feedback", fb["id"], "--wait", "--poll-interval", "0.3", "-o", "json"
    )
    rnd = RoundOut.model_validate(ok_json(waited))
    assert rnd.status == "succeeded" and rnd.checkpoint_id and rnd.index == 1
    assert re.search(r"round 1 running step \d+/\d+", waited.stderr), waited.stderr  # progress, on stderr only
    assert "ETA" in waited.stderr and "loss" in waited.stderr

    # `-o json` is the API's object: for a finished job, exactly what GET /v1/jobs/{id} returns
    job = ok_json(halos(dep, "jobs", "get", rnd.job_id, "-o", "json"))
    raw = httpx.get(
        f"http://127.0.0.1:{dep.port}/v1/jobs/{rnd.job_id}", headers={"Authorization": f"Bearer {dep.key}"}
    ).json()
    assert job == raw and list(job) == list(JobOut.model_fields)
    assert job["percent_done"] == 100.0 and job["eta_s"] == 0.0 and job["elapsed_s"] > 0
    listed = ok_json(halos(dep, "jobs", "list", "-o", "json"))
    assert isinstance(listed, list) and rnd.job_id in [j["id"] for j in listed]
    assert len(ok_json(halos(dep, "jobs", "list", "--limit", "1", "-o", "json"))) == 1
    metrics = ok_json(halos(dep, "jobs", "metrics", rnd.job_id, "--split", "train", "-o", "json"))
    assert [p["step"] for p in metrics] == list(range(1, job["progress"]["total_steps"] + 1))
    ckpt = ok_json(halos(dep, "checkpoints", "get", rnd.checkpoint_id, "-o", "json"))
    assert ckpt["job_id"] == rnd.job_id and ckpt["model_id"] == model["id"]

    # round 2 on a file named on the command line (uploaded first), waited for with `jobs wait`
    queued = halos(
        dep, "rounds", "create", run["id"], "--feedback", str(write_feedback(tmp_path / "r2.jsonl", 2)), "-o", "json"
    )
    rnd2 = ok_json(queued)
    assert "uploaded" in queued.stderr and rnd2["index"] == 2 and rnd2["parent_checkpoint_id"] == rnd.checkpoint_id
    done = ok_json(halos(dep, "jobs", "wait", rnd2["job_id"], "--poll-interval", "0.3", "-o", "json"))
    assert done["status"] == "succeeded"
    lineage = ok_json(halos(dep, "checkpoints", "lineage", done["checkpoint_id"], "-o", "json"))
    assert [i["round_index"] for i in lineage["items"]] == [2, 1] and lineage["model"]["id"] == model["id"]

    # tables for people; logs as plain text
    table = halos(dep, "runs", "get", run["id"])
    assert table.returncode == 0 and rnd.job_id in table.stdout and rnd2["job_id"] in table.stdout
    assert "succeeded" in halos(dep, "jobs", "get", rnd.job_id).stdout
    assert "SFT model" in halos(dep, "checkpoints", "lineage", done["checkpoint_id"]).stdout
    logs = halos(dep, "jobs", "logs", rnd.job_id)
    assert logs.returncode == 0 and logs.stdout.strip()
    followed = halos(dep, "jobs", "logs", rnd.job_id, "-f")
    assert followed.returncode == 0 and followed.stdout == logs.stdout

    # the loss catalogue, from the server's registry
    losses = ok_json(halos(dep, "losses", "list", "-o", "json"))
    assert {"dpo", "kto", "apo_zero", "nca_pair"} <= {item["name"] for item in losses}
    assert "apo_zero" in halos(dep, "losses", "list").stdout


def test_a_bad_feedback_file_prints_the_record_report(dep: Deployment, tmp_path: Path) -> None:
    key = dep.halos("keys", "create", "--project", "cli-bad").strip()
    records = pairwise_records(4, seed=5)
    records[1]["label"] = 2
    del records[2]["output_B"]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(to_jsonl_bytes(records))
    result = halos(dep, "feedback", "push", str(path), key=key)
    assert result.returncode == 3, result.stderr
    report = result.stderr
    assert "invalid feedback file" in report and "Traceback" not in report
    rows = [line for line in report.splitlines() if re.match(r"\s*[23]\s", line)]  # one row per bad record: line 2, 3
    assert any("label" in r for r in rows) and any("output_B" in r for r in rows), report
    assert ok_json(halos(dep, "feedback", "list", "-o", "json", key=key)) == []  # nothing stored


def test_wait_on_a_failing_round_exits_1_with_the_reason(dep: Deployment, tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = dep.data_dir / "models" / f"sft-broken-{tmp_path.name}"  # where models may be registered
    shutil.copytree(tiny_model_dir, model_dir)
    model = ok_json(halos(dep, "models", "register", str(model_dir), "-o", "json"))
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")  # broken after registration
    fb = ok_json(halos(dep, "feedback", "push", str(write_feedback(tmp_path / "f.jsonl", 9)), "-o", "json"))
    run = ok_json(halos(dep, "runs", "create", "--model", model["id"], "--loss", "dpo", *HP, "-o", "json"))
    result = halos(
        dep, "rounds", "create", run["id"], "--feedback", fb["id"], "--wait", "--poll-interval", "0.3", "-o", "json"
    )
    assert result.returncode == 1, result.stderr
    rnd = json.loads(result.stdout)  # the round as it ended, still on stdout for scripts
    assert rnd["status"] == "failed"
    error = ok_json(halos(dep, "jobs", "get", rnd["job_id"], "-o", "json"))["error"]
    assert error and f"job {rnd['job_id']} failed" in result.stderr
    assert error.strip().splitlines()[-1].strip()[:60] in " ".join(result.stderr.split()), result.stderr
    assert halos(dep, "jobs", "wait", rnd["job_id"]).returncode == 1
    assert halos(dep, "jobs", "logs", rnd["job_id"], "-f").returncode == 1


def test_cancel_refusals_timeouts_and_usage_errors(dep: Deployment, tiny_model_dir: Path, tmp_path: Path) -> None:
    model = ok_json(halos(dep, "models", "register", str(tiny_model_dir), "-o", "json"))
    fb = ok_json(halos(dep, "feedback", "push", str(write_feedback(tmp_path / "f.jsonl", 21)), "-o", "json"))
    run = ok_json(
        halos(
            dep, "runs", "create", "--model", model["id"], "--loss", '{"name": "dpo", "beta": 0.2}', *HP, "-o", "json"
        )
    )
    assert run["loss"] == {"name": "dpo", "beta": 0.2}
    first = ok_json(halos(dep, "rounds", "create", run["id"], "--feedback", fb["id"], "-o", "json"))
    second = ok_json(halos(dep, "rounds", "create", run["id"], "--feedback", fb["id"], "-o", "json"))
    assert second["status"] == "waiting"  # behind round 1

    timed_out = halos(dep, "jobs", "wait", first["job_id"], "--timeout", "0.5")
    assert timed_out.returncode == 5 and "still" in timed_out.stderr
    cancelled = ok_json(halos(dep, "jobs", "cancel", second["job_id"], "-o", "json"))
    assert cancelled["status"] == "cancelled"
    again = halos(dep, "jobs", "cancel", second["job_id"])
    assert again.returncode == 3 and "job_finished" in again.stderr
    missing = halos(dep, "jobs", "get", "job_doesnotexist")
    assert missing.returncode == 3 and "job_not_found" in missing.stderr
    assert halos(dep, "jobs", "list", key="hk_not_a_key").returncode == 3
    assert halos(dep, "jobs", "list", "--no-such-option").returncode == 2
    bad_hp = halos(dep, "runs", "create", "--model", model["id"], "--loss", "dpo", "--hp", "batch_size=-1")
    assert bad_hp.returncode == 2 and "batch_size" in bad_hp.stderr  # refused before anything is sent
    assert ok_json(halos(dep, "jobs", "wait", first["job_id"], "-o", "json"))["status"] == "succeeded"

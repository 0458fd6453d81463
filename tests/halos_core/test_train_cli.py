"""`accelerate launch ... -m halos_core.train --config run.json` as the worker runs it (subprocess)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from halos_core.run_dir import RunDir, read_manifest
from halos_core.synthetic import pairwise_records, write_jsonl

from .conftest import make_config, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: RunDir, num_processes: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    conf = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_CPU" if num_processes > 1 else "NO",
        "num_processes": num_processes,
        "num_machines": 1,
        "machine_rank": 0,
        "mixed_precision": "no",
        "use_cpu": True,
        "debug": False,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "enable_cpu_affinity": False,
        "downcast_bf16": "no",
    }
    if num_processes > 1:
        conf.update(main_process_ip="127.0.0.1", main_process_port=_free_port())
    run_dir.accelerate_yaml.write_text(yaml.safe_dump(conf))
    if num_processes > 1:
        # accelerate 1.x runs MULTI_CPU through its simple launcher, which starts ONE process unless
        # an mpirun hostfile is given; torchrun sets the env accelerate reads (gloo process group).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
               "--master_addr", "127.0.0.1", "--master_port", str(conf["main_process_port"])]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(run_dir.accelerate_yaml)]
    cmd += ["-m", "halos_core.train", "--config", str(run_dir.run_json)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def _prepare(tmp_path, name, model_dir, sha, feedback, **kw) -> RunDir:
    rd = RunDir(tmp_path / name).create()
    rd.write_config(make_config(rd.path, model_dir, sha, feedback, job_id=name, **kw))
    return rd


def test_accelerate_launch_one_process(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    rd = _prepare(tmp_path, "cli", tiny_model_dir, tiny_sha, pairwise_file, checkpoint_every=2)
    proc = launch(rd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = rd.read_result()
    assert result["status"] == "ok" and result["step"] == 6 == result["total_steps"]
    assert result["manifest_sha256"] == read_manifest(rd.final).sha256
    metrics = read_jsonl(rd.metrics_jsonl)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in rd.complete_checkpoints()] == [2, 4]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(rd.final)  # HF-loadable export


def test_failure_exits_nonzero_with_traceback_and_no_result(tmp_path, tiny_model_dir, tiny_sha):
    few = write_jsonl(pairwise_records(3, seed=0), tmp_path / "few.jsonl")
    rd = _prepare(tmp_path, "bad", tiny_model_dir, tiny_sha, few)
    proc = launch(rd)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "fewer than batch_size" in proc.stderr
    assert rd.read_result() is None


@pytest.mark.e2e
def test_two_cpu_processes_match_one(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    """DDP over gloo (torchrun, 2 CPU ranks): sharded microbatches + all-reduce = the 1-process run."""
    one = _prepare(tmp_path, "one", tiny_model_dir, tiny_sha, pairwise_file, checkpoint_every=3)
    two = _prepare(tmp_path, "two", tiny_model_dir, tiny_sha, pairwise_file, checkpoint_every=3)
    p1 = launch(one, 1)
    p2 = launch(two, 2)
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stderr[-3000:]
    m1, m2 = read_jsonl(one.metrics_jsonl), read_jsonl(two.metrics_jsonl)
    assert len(m1) == len(m2) == 6
    for a, b in zip(m1, m2):
        assert a["step"] == b["step"] and a["examples"] == b["examples"]
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert [m.step for m in two.complete_checkpoints()] == [3]
    assert (two.checkpoint_path(3) / "rng-rank1.pt").is_file()

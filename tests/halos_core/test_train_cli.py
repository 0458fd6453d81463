"""`accelerate launch ... -m halos_core.train --config run.json` as the worker runs it (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from halos_core.checkpoint import optimizer_state_digest
from halos_core.run_dir import RunDir, read_manifest
from halos_core.synthetic import binary_records, pairwise_records, write_jsonl

from .conftest import make_config, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def accelerate_config(num_processes: int) -> dict:
    """The accelerate.yaml of a CPU run with `num_processes` ranks on this machine.

    accelerate 1.x sends `distributed_type: MULTI_CPU` (and `--cpu`) to its *simple* launcher,
    which starts ONE process unless an mpirun hostfile is given. `distributed_type: MULTI_GPU`
    with `use_cpu: true` goes through `multi_gpu_launcher` (torch.distributed.run: N local ranks
    with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*); the trainer then forms a gloo group (MULTI_CPU),
    because there is no CUDA or because ACCELERATE_USE_CPU=true is in the environment (needed on a
    machine with a GPU: this launcher does not export `use_cpu`). `main_process_port: 0` picks a
    free port.
    """
    conf = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if num_processes > 1 else "NO",
        "num_processes": num_processes,
        "num_machines": 1,
        "machine_rank": 0,
        "mixed_precision": "no",
        "use_cpu": True,
        "gpu_ids": "all",
        "debug": False,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "enable_cpu_affinity": False,
        "downcast_bf16": "no",
    }
    if num_processes > 1:
        conf.update(main_process_ip="127.0.0.1", main_process_port=0)
    return conf


def launch(run_dir: RunDir, num_processes: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate.yaml -m halos_core.train --config run.json`."""
    run_dir.accelerate_yaml.write_text(yaml.safe_dump(accelerate_config(num_processes)))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(run_dir.accelerate_yaml),
        "-m",
        "halos_core.train",
        "--config",
        str(run_dir.run_json),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "TOKENIZERS_PARALLELISM": "false",
        "ACCELERATE_USE_CPU": "true",
    }
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


def _prepare(tmp_path, name, model_dir, sha, feedback, **kw) -> RunDir:
    rd = RunDir(tmp_path / name).create()
    rd.write_config(make_config(rd.path, model_dir, sha, feedback, job_id=name, **kw))
    return rd


def test_accelerate_launch_one_process(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    rd = _prepare(tmp_path, "cli", tiny_model_dir, tiny_sha, pairwise_file, checkpoint_every=2)
    proc = launch(rd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = rd.read_result()
    assert result.status == "ok" and result.step == 6 == result.total_steps
    assert result.manifest_sha256 == read_manifest(rd.final).sha256
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


def _ok(proc: subprocess.CompletedProcess, num_processes: int) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kind = "MULTI_CPU" if num_processes > 1 else "NO"
    assert f"accelerate: DistributedType.{kind}, {num_processes} process(es), backend" in proc.stderr, proc.stderr[
        -3000:
    ]


def _steps(rd: RunDir) -> list[dict]:
    return [m for m in read_jsonl(rd.metrics_jsonl) if m.get("split") != "eval"]


def _assert_same_steps(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert x["examples"] == y["examples"] and x["lr"] == y["lr"]
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margin"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)


def _assert_same_final(a: RunDir, b: RunDir) -> None:
    """Final weights and Adam moments within 1e-5 (float32; the sums are reduced in another order)."""
    wa, wb = load_file(str(a.final / "model.safetensors")), load_file(str(b.final / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)
    oa = torch.load(a.final / "optimizer.pt", weights_only=True)
    ob = torch.load(b.final / "optimizer.pt", weights_only=True)
    assert oa["state"].keys() == ob["state"].keys()
    for idx in oa["state"]:
        assert torch.equal(oa["state"][idx]["step"], ob["state"][idx]["step"])
        torch.testing.assert_close(ob["state"][idx]["exp_avg"], oa["state"][idx]["exp_avg"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            ob["state"][idx]["exp_avg_sq"], oa["state"][idx]["exp_avg_sq"], rtol=1e-4, atol=1e-10
        )


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory, tiny_model_dir, tiny_sha, pairwise_file):
    """The same DPO round (batch 8, microbatch 4, 6 steps, a checkpoint at step 3) launched with
    1 process (gradient accumulation 2) and with 2 processes (accumulation 1)."""
    tmp = tmp_path_factory.mktemp("launch")
    one = _prepare(tmp, "one", tiny_model_dir, tiny_sha, pairwise_file, checkpoint_every=3, warmup_steps=2)
    two = _prepare(tmp, "two", tiny_model_dir, tiny_sha, pairwise_file, checkpoint_every=3, warmup_steps=2)
    _ok(launch(one, 1), 1)
    _ok(launch(two, 2), 2)
    return tmp, one, two


@pytest.mark.e2e
def test_two_cpu_processes_match_one_with_accumulation(straight_runs):
    """DDP over gloo (2 CPU ranks through `accelerate launch`) = 1 process accumulating 2 microbatches."""
    _, one, two = straight_runs
    m1, m2 = _steps(one), _steps(two)
    assert len(m1) == len(m2) == 6
    _assert_same_steps(m1, m2)
    _assert_same_final(one, two)
    assert [m.step for m in two.complete_checkpoints()] == [3]
    assert (two.checkpoint_path(3) / "rng-rank1.pt").is_file()
    assert json.loads((two.checkpoint_path(3) / "trainer_state.json").read_text())["num_processes"] == 2


def _complete_optimizer_state(ckpt: Path, model_dir: Path) -> None:
    """optimizer.pt holds Adam state for EVERY parameter (not one rank's share), shaped like it."""
    from transformers import AutoModelForCausalLM

    params = [p for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters() if p.requires_grad]
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sorted(state["state"]) == list(range(len(params)))
    assert state["param_groups"][0]["params"] == list(range(len(params)))
    for idx, p in enumerate(params):
        st = state["state"][idx]
        assert st["exp_avg"].shape == p.shape == st["exp_avg_sq"].shape and int(st["step"]) == 3
        assert st["exp_avg_sq"].abs().sum() > 0


@pytest.mark.e2e
@pytest.mark.parametrize("source,resume_with", [("two", 1), ("one", 2)])
def test_checkpoint_resumes_with_another_process_count(
    straight_runs, tiny_model_dir, tiny_sha, pairwise_file, source, resume_with
):
    """A step-3 checkpoint written by 2 ranks resumes with 1 (and 1 -> 2); steps 4..6 and the final
    weights equal both uninterrupted runs."""
    tmp, one, two = straight_runs
    src = {"one": one, "two": two}[source]
    ckpt = src.checkpoint_path(3)
    _complete_optimizer_state(ckpt, tiny_model_dir)
    name = f"{source}-to-{resume_with}"
    rd = RunDir(tmp / name).create()
    # a retry of the same job (resume_from must belong to it) in a fresh directory
    rd.write_config(
        make_config(
            rd.path,
            tiny_model_dir,
            tiny_sha,
            pairwise_file,
            job_id=source,
            checkpoint_every=3,
            warmup_steps=2,
            resume_from=str(ckpt),
        )
    )
    _ok(launch(rd, resume_with), resume_with)
    steps = _steps(rd)
    assert [m["step"] for m in steps] == [4, 5, 6]
    _assert_same_steps(_steps(one)[3:], steps)
    _assert_same_steps(_steps(two)[3:], steps)
    _assert_same_final(one, rd)
    _assert_same_final(two, rd)
    result = rd.read_result()
    assert result.step == 6 and result.resumed.optimizer_step == 3
    assert result.resumed.optimizer_state_digest == optimizer_state_digest(
        torch.load(ckpt / "optimizer.pt", weights_only=True)
    )


@pytest.mark.e2e
def test_heads_under_two_processes(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    """DDP with a reward head (LM head frozen: every trained parameter gets a gradient) equals one
    process; PPO's value head trains under DDP too."""
    bt = {"name": "bradley_terry"}
    one = _prepare(tmp_path, "bt1", tiny_model_dir, tiny_sha, pairwise_file, loss=bt)
    two = _prepare(tmp_path, "bt2", tiny_model_dir, tiny_sha, pairwise_file, loss=bt)
    _ok(launch(one, 1), 1)
    _ok(launch(two, 2), 2)
    m1, m2 = _steps(one), _steps(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(m1, m2):
        for key in ("loss", "grad_norm", "rewards/accuracy", "rewards/margin"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    _assert_same_final(one, two)
    h1, h2 = load_file(str(one.final / "head.safetensors")), load_file(str(two.final / "head.safetensors"))
    torch.testing.assert_close(h2["score.weight"], h1["score.weight"], rtol=0, atol=1e-5)

    binary = write_jsonl(binary_records(32, seed=3), tmp_path / "bin.jsonl")
    ppo = _prepare(tmp_path, "ppo2", tiny_model_dir, tiny_sha, [(binary, "binary")], loss={"name": "ppo"})
    _ok(launch(ppo, 2), 2)
    steps = _steps(ppo)
    assert len(steps) == 4 and all(m["critic_loss"] == m["critic_loss"] for m in steps)
    assert ppo.read_result().head == "value" and (ppo.final / "head.safetensors").is_file()


@pytest.mark.e2e
def test_lora_under_two_processes_matches_one(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    """LoRA under DDP (frozen base, adapters all-reduced; reference = adapters disabled) = 1 process."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    one = _prepare(tmp_path, "l1", tiny_model_dir, tiny_sha, pairwise_file, lora=lora, lr=2e-3)
    two = _prepare(tmp_path, "l2", tiny_model_dir, tiny_sha, pairwise_file, lora=lora, lr=2e-3)
    _ok(launch(one, 1), 1)
    _ok(launch(two, 2), 2)
    _assert_same_steps(_steps(one), _steps(two))
    _assert_same_final(one, two)  # merged export + adapter optimizer state
    a1 = load_file(str(one.final / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(two.final / "adapter" / "adapter_model.safetensors"))
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=0, atol=1e-5)

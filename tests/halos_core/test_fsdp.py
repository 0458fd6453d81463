"""FSDP2 through `accelerate launch`, with the accelerate.yaml the worker writes (`worker.launch`).

On CPU (CI): `distributed_type: FSDP` + `use_cpu: true` starts N torchrun ranks with
ACCELERATE_USE_FSDP=true and FSDP_VERSION=2; the trainer (`halos_core.sharded.build_accelerator`)
runs accelerate's FSDP2 path (`fully_shard` per decoder layer + root) over gloo on a CPU mesh.
The claims:

- 2 FSDP ranks = 1 process accumulating 2 microbatches (losses, final weights, Adam moments);
  each rank really holds half of the parameters (the trainer logs it);
- `final/` is the full HF-loadable model written by rank 0, and every `optimizer.pt` is the
  COMPLETE optimizer state in the DDP/1-process layout (index-keyed, every trained parameter with
  `exp_avg`/`exp_avg_sq` of the parameter's full shape, plain tensors), not rank 0's shard;
- a checkpoint crosses strategies and process counts: FSDP(2) -> 1 process and 1 -> FSDP(2),
  and the digest of the optimizer state restored (gathered back from the live shards) equals the
  digest of the optimizer.pt it came from; a round 2 (`init_from`) restores it the same way;
- heads train under FSDP (reward head = 1 process; value head runs); LoRA + FSDP is refused.

The `gpu` test (skipped without CUDA) repeats the equivalence and the cross-resume on GPUs (nccl;
with one GPU FSDP has one rank: it checks the CUDA code path, not the sharding), plus a bf16 run.
`bench/fsdp_check.sh` runs it on a GPU machine.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from halos_core.checkpoint import optimizer_state_digest
from halos_core.run_dir import RunDir
from halos_core.sharded import fqn_keyed, index_keyed
from halos_core.synthetic import binary_records, write_jsonl
from server.settings import Settings
from worker import launch as worker_launch

from .conftest import make_config
from .test_train_cli import ROOT, _assert_same_final, _assert_same_steps, _prepare, _steps

HP = {"checkpoint_every": 3, "warmup_steps": 2}


def launch(
    run_dir: RunDir, num_processes: int, fsdp: bool, cpu: bool = True, mixed_precision: str = "no", timeout: int = 300
) -> subprocess.CompletedProcess:
    """What the worker runs: its accelerate.yaml, its environment and its command line."""
    settings = Settings(
        data_dir=run_dir.path, num_processes=num_processes, fsdp=fsdp, use_cpu=cpu, mixed_precision=mixed_precision
    )
    conf = worker_launch.accelerate_config(settings, main_process_port=0)  # 0: accelerate picks a free port
    run_dir.accelerate_yaml.write_text(yaml.safe_dump(conf, sort_keys=True))
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP")}
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # + carried wheels
    env.update(
        OMP_NUM_THREADS="1", PYTHONPATH=pythonpath, TOKENIZERS_PARALLELISM="false", **worker_launch.launch_env(settings)
    )
    return subprocess.run(
        worker_launch.command(settings, run_dir),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def _ok(proc: subprocess.CompletedProcess, num_processes: int, fsdp: bool) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kind = "FSDP" if fsdp else ("MULTI_CPU" if num_processes > 1 else "NO")
    assert f"accelerate: DistributedType.{kind}, {num_processes} process(es)" in proc.stderr, proc.stderr[-3000:]


def _sharding(proc: subprocess.CompletedProcess) -> dict[int, tuple[int, int, int]]:
    """rank -> (FSDP units, parameter elements held locally, in total), from the trainer's log."""
    import re

    found = re.findall(r"FSDP2 rank (\d+): (\d+) units, (\d+) of (\d+) parameter elements", proc.stderr)
    return {int(r): (int(u), int(local), int(total)) for r, u, local, total in found}


def _trained_params(model_dir: Path) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return [p for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters() if p.requires_grad]


def _assert_complete_optimizer(ckpt: Path, model_dir: Path, step: int) -> dict:
    """optimizer.pt holds plain full-shape Adam state for EVERY trained parameter, index-keyed."""
    params = _trained_params(model_dir)
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sorted(state["state"]) == list(range(len(params)))
    assert state["param_groups"][0]["params"] == list(range(len(params)))
    for idx, p in enumerate(params):
        st = state["state"][idx]
        for key in ("exp_avg", "exp_avg_sq"):
            assert type(st[key]) is torch.Tensor and st[key].shape == p.shape, (idx, key)
        assert int(st["step"]) == step and st["exp_avg_sq"].abs().sum() > 0, idx
    return state


def _assert_same_moments(a: Path, b: Path) -> None:
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    assert oa["state"].keys() == ob["state"].keys()
    for idx in oa["state"]:
        torch.testing.assert_close(ob["state"][idx]["exp_avg"], oa["state"][idx]["exp_avg"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            ob["state"][idx]["exp_avg_sq"], oa["state"][idx]["exp_avg_sq"], rtol=1e-4, atol=1e-10
        )


# --------------------------------------------------------------------------- layouts (no processes)


def test_optimizer_state_layouts_round_trip():
    """DCP's FQN-keyed full optimizer state <-> optimizer.state_dict()'s index-keyed layout."""
    names = ["lm.a.weight", "lm.b.weight", "head.w"]
    fqn = {
        "state": {n: {"step": torch.tensor(3.0), "exp_avg": torch.full((2,), float(i))} for i, n in enumerate(names)},
        "param_groups": [{"lr": 1e-3, "params": names[:2]}, {"lr": 0.0, "params": names[2:]}],
    }
    idx = index_keyed(fqn)
    assert list(idx["state"]) == [0, 1, 2] and [g["params"] for g in idx["param_groups"]] == [[0, 1], [2]]
    assert float(idx["state"][2]["exp_avg"][0]) == 2.0 and idx["param_groups"][1]["lr"] == 0.0
    back = fqn_keyed(idx, names)
    assert back["param_groups"] == fqn["param_groups"] and back["state"].keys() == fqn["state"].keys()
    assert optimizer_state_digest(idx) == optimizer_state_digest(index_keyed(back))
    with pytest.raises(ValueError, match="numbers 3 parameters, this optimizer has 2"):
        fqn_keyed(idx, names[:2])
    assert index_keyed({}) == {}  # ranks > 0 of a gather


# --------------------------------------------------------------------------- CPU, 2 ranks over gloo


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_model_dir, tiny_sha, pairwise_file):
    """The same DPO round (batch 8, microbatch 4, 6 steps, a checkpoint at step 3): 1 process with
    gradient accumulation 2, and 2 FSDP ranks (accumulation 1)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    one = _prepare(tmp, "one", tiny_model_dir, tiny_sha, pairwise_file, **HP)
    two = _prepare(tmp, "fsdp", tiny_model_dir, tiny_sha, pairwise_file, **HP)
    _ok(launch(one, 1, fsdp=False), 1, False)
    proc = launch(two, 2, fsdp=True)
    _ok(proc, 2, True)
    return tmp, one, two, proc


@pytest.mark.e2e
def test_fsdp_two_cpu_ranks_match_one_process(fsdp_runs, tiny_model_dir):
    _, one, two, proc = fsdp_runs
    # really sharded: 2 decoder layers + the root are FSDP units, each rank holds about half
    shards = _sharding(proc)
    assert sorted(shards) == [0, 1], proc.stderr[-3000:]
    for units, local, total in shards.values():
        assert units == 3 and local < 0.51 * total
    assert sum(local for _, local, _ in shards.values()) >= shards[0][2]

    m1, m2 = _steps(one), _steps(two)
    assert len(m1) == len(m2) == 6
    _assert_same_steps(m1, m2)
    _assert_same_final(one, two)  # weights atol 1e-5, Adam moments rtol 1e-4

    # final/: the full HF-loadable model (rank 0), equal to its safetensors file
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(two.final)
    saved = load_file(str(two.final / "model.safetensors"))
    assert saved.keys() == set(loaded.state_dict()) and all(type(t) is torch.Tensor for t in saved.values())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, saved[k]), k

    # the complete optimizer state, intermediate and final; the step-3 moments equal 1 process's
    ckpt = two.checkpoint_path(3)
    _assert_complete_optimizer(ckpt, tiny_model_dir, 3)
    _assert_complete_optimizer(two.final, tiny_model_dir, 6)
    _assert_same_moments(one.checkpoint_path(3), ckpt)
    assert (ckpt / "rng-rank1.pt").is_file()


@pytest.mark.e2e
@pytest.mark.parametrize("source,resume_with,fsdp", [("fsdp", 1, False), ("one", 2, True)])
def test_fsdp_checkpoint_resumes_across_strategies(
    fsdp_runs, tiny_model_dir, tiny_sha, pairwise_file, source, resume_with, fsdp
):
    """FSDP(2)'s step-3 checkpoint resumes in 1 plain process, and 1 process's under FSDP(2):
    steps 4..6 and the final state equal both uninterrupted runs; the restored optimizer state
    (FSDP: gathered back from the live shards) has the digest of the optimizer.pt it came from."""
    tmp, one, two, _ = fsdp_runs
    src = {"one": one, "fsdp": two}[source]
    ckpt = src.checkpoint_path(3)
    rd = RunDir(tmp / f"{source}-to-{resume_with}").create()
    rd.write_config(
        make_config(rd.path, tiny_model_dir, tiny_sha, pairwise_file, job_id=source, resume_from=str(ckpt), **HP)
    )
    _ok(launch(rd, resume_with, fsdp=fsdp), resume_with, fsdp)
    steps = _steps(rd)
    assert [m["step"] for m in steps] == [4, 5, 6]
    _assert_same_steps(_steps(one)[3:], steps)
    _assert_same_steps(_steps(two)[3:], steps)
    _assert_same_final(one, rd)
    _assert_same_final(two, rd)
    _assert_complete_optimizer(rd.final, tiny_model_dir, 6)
    resumed = rd.read_result().resumed
    assert resumed.optimizer_step == 3 and resumed.scheduler_last_epoch == 3
    assert resumed.optimizer_state_digest == optimizer_state_digest(
        torch.load(ckpt / "optimizer.pt", weights_only=True)
    )


@pytest.mark.e2e
def test_fsdp_round_two_restores_the_complete_optimizer_state(fsdp_runs, tiny_model_dir, tiny_sha, pairwise_file):
    """Round 2 under FSDP from round 1's final/ (written by FSDP): `restored` is the digest of
    that optimizer.pt, read back from the live shards; Adam continues at step 6."""
    tmp, _, two, _ = fsdp_runs
    r1 = two.read_result()
    rd = RunDir(tmp / "round2").create()
    rd.write_config(
        make_config(
            rd.path,
            tiny_model_dir,
            tiny_sha,
            pairwise_file,
            job_id="round2",
            init_from=r1.final_dir,
            counters={"step": r1.step, "examples": r1.examples},
            **HP,
        )
    )
    _ok(launch(rd, 2, fsdp=True), 2, True)
    restored = rd.read_result().restored
    parent = torch.load(two.final / "optimizer.pt", weights_only=True)
    assert restored.optimizer_state_digest == optimizer_state_digest(parent)
    assert restored.optimizer_step == 6 and restored.scheduler_last_epoch == 6
    assert [m["step"] for m in _steps(rd)] == [7, 8, 9, 10, 11, 12]
    _assert_complete_optimizer(rd.final, tiny_model_dir, 12)


@pytest.mark.e2e
def test_heads_under_fsdp(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    """Reward head (LM head frozen, in the root FSDP unit) = 1 process; the head file holds the
    full head. PPO's value head trains under FSDP and is exported."""
    bt = {"name": "bradley_terry"}
    one = _prepare(tmp_path, "bt1", tiny_model_dir, tiny_sha, pairwise_file, loss=bt)
    two = _prepare(tmp_path, "bt2", tiny_model_dir, tiny_sha, pairwise_file, loss=bt)
    _ok(launch(one, 1, fsdp=False), 1, False)
    _ok(launch(two, 2, fsdp=True), 2, True)
    m1, m2 = _steps(one), _steps(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(m1, m2):
        for key in ("loss", "grad_norm", "rewards/accuracy", "rewards/margin"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    _assert_same_final(one, two)
    h1, h2 = load_file(str(one.final / "head.safetensors")), load_file(str(two.final / "head.safetensors"))
    assert h1.keys() == h2.keys() == {"score.weight"}
    torch.testing.assert_close(h2["score.weight"], h1["score.weight"], rtol=0, atol=1e-5)

    binary = write_jsonl(binary_records(32, seed=3), tmp_path / "bin.jsonl")
    ppo = _prepare(tmp_path, "ppo2", tiny_model_dir, tiny_sha, [(binary, "binary")], loss={"name": "ppo"})
    _ok(launch(ppo, 2, fsdp=True), 2, True)
    steps = _steps(ppo)
    assert len(steps) == 4 and all(m["critic_loss"] == m["critic_loss"] for m in steps)
    assert ppo.read_result().head == "value"
    head = load_file(str(ppo.final / "head.safetensors"))
    assert all(type(t) is torch.Tensor for t in head.values()) and head


@pytest.mark.e2e
def test_lora_with_fsdp_is_refused_at_start(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    rd = _prepare(tmp_path, "lora-fsdp", tiny_model_dir, tiny_sha, pairwise_file, lora=lora)
    proc = launch(rd, 2, fsdp=True)
    assert proc.returncode != 0
    assert "UnsupportedSharding: LoRA with FSDP is not supported" in proc.stderr, proc.stderr[-3000:]
    assert rd.read_result() is None and not rd.metrics_jsonl.exists()


# --------------------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.e2e
def test_fsdp_on_gpus(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    """FSDP2 on CUDA (nccl; full-state gathers offloaded to CPU): min(2, GPUs) ranks = 1 plain GPU
    process (tolerances for CUDA kernels), the checkpoint resumes in 1 plain process with the
    same digest, and a bf16 (MixedPrecisionPolicy) round exports an fp32 model and complete state.
    With one GPU FSDP runs on a 1-rank mesh: the CUDA code path, not the sharding (CPU tests)."""
    n = min(2, torch.cuda.device_count())
    batch = {"batch_size": 8, "microbatch_size": 4}
    one = _prepare(tmp_path, "g1", tiny_model_dir, tiny_sha, pairwise_file, **HP, **batch)
    fs = _prepare(tmp_path, "gf", tiny_model_dir, tiny_sha, pairwise_file, **HP, **batch)
    _ok(launch(one, 1, fsdp=False, cpu=False), 1, False)
    proc = launch(fs, n, fsdp=True, cpu=False)
    _ok(proc, n, True)
    assert "device cuda" in proc.stderr
    m1, m2 = _steps(one), _steps(fs)
    assert [m["step"] for m in m1] == [m["step"] for m in m2]
    for x, y in zip(m1, m2):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5), x["step"]
    w1, w2 = load_file(str(one.final / "model.safetensors")), load_file(str(fs.final / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4, msg=k)
    ckpt = fs.checkpoint_path(3)
    _assert_complete_optimizer(ckpt, tiny_model_dir, 3)
    _assert_complete_optimizer(fs.final, tiny_model_dir, 6)

    back = RunDir(tmp_path / "gf-to-1").create()
    back.write_config(
        make_config(
            back.path, tiny_model_dir, tiny_sha, pairwise_file, job_id="gf", resume_from=str(ckpt), **HP, **batch
        )
    )
    _ok(launch(back, 1, fsdp=False, cpu=False), 1, False)
    assert back.read_result().resumed.optimizer_state_digest == optimizer_state_digest(
        torch.load(ckpt / "optimizer.pt", weights_only=True)
    )
    for x, y in zip(m1[3:], _steps(back)):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5), x["step"]

    bf = _prepare(tmp_path, "gbf16", tiny_model_dir, tiny_sha, pairwise_file, mixed_precision="bf16", **HP, **batch)
    _ok(launch(bf, n, fsdp=True, cpu=False, mixed_precision="bf16"), n, True)
    assert all(t.dtype == torch.float32 for t in load_file(str(bf.final / "model.safetensors")).values())
    _assert_complete_optimizer(bf.final, tiny_model_dir, 6)

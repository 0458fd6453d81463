"""Heads: bradley_terry (reward head on the last non-pad token) and ppo (value head, GAE) in the
trainer; heads saved in checkpoints and restored by the next round with the optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halos_core.checkpoint import optimizer_state_digest, param_digest
from halos_core.heads import HEAD_FILE, RewardHead, ValueHead, last_token_index
from halos_core.run_dir import CheckpointError, RunDir
from halos_core.synthetic import binary_records, pairwise_records, write_jsonl
from halos_core.train import _release, run
from halos_core.training import Trainer

from .conftest import make_config, read_jsonl


def _steps(run_dir: Path) -> list[dict]:
    return [m for m in read_jsonl(RunDir(run_dir).metrics_jsonl) if m.get("split") != "eval"]


def _reset():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


# --------------------------------------------------------------------------- units


def test_reward_head_reads_the_last_non_pad_token():
    torch.manual_seed(0)
    head = RewardHead(8)
    hidden = torch.randn(3, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [5, 2, 0]
    expected = torch.stack([hidden[0, 5], hidden[1, 2], hidden[2, 0]]) @ head.score.weight[0]
    torch.testing.assert_close(head(hidden, mask), expected)
    # what follows the last token (padding) does not matter
    hidden2 = hidden.clone()
    hidden2[1, 3:] = 100.0
    torch.testing.assert_close(head(hidden2, mask), head(hidden, mask))


def test_value_head_is_fp32_aligned_and_does_not_train_the_body():
    head = ValueHead(8).eval()
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(hidden.to(torch.bfloat16))
    assert values.shape == (2, 4) and values.dtype == torch.float32  # aligned with token log-probs [B, L-1]
    head(hidden).sum().backward()
    assert hidden.grad is None and all(p.grad is not None for p in head.parameters())


# --------------------------------------------------------------------------- bradley_terry


@pytest.fixture(scope="module")
def bt_round(tmp_path_factory, tiny_model_dir, tiny_sha):
    tmp = tmp_path_factory.mktemp("bt")
    fb = write_jsonl(pairwise_records(64, seed=2, test_fraction=0.25), tmp / "pairs.jsonl")
    res = run(
        make_config(
            tmp / "r1",
            tiny_model_dir,
            tiny_sha,
            fb,
            job_id="r1",
            loss={"name": "bradley_terry"},
            lr=1e-3,
            n_epochs=2,
            checkpoint_every=4,
        )
    )
    return tmp, fb, res


def test_bradley_terry_learns_a_reward_model(bt_round, tiny_model_dir):
    tmp, _, res = bt_round
    steps = _steps(tmp / "r1")
    assert res.round_step == len(steps) >= 8
    assert steps[0]["loss"] == pytest.approx(
        torch.nn.functional.softplus(torch.tensor(-steps[0]["rewards/margin"])).item(), abs=0.05
    )
    assert sum(m["loss"] for m in steps[-3:]) / 3 < sum(m["loss"] for m in steps[:3]) / 3 - 0.2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert key in steps[-1]
    assert res.eval["rewards/accuracy"] > 0.8 and res.eval["rewards/margin"] > 0
    result = RunDir(tmp / "r1").read_result()
    assert result.head == "reward" and result.reference_param_digest is None  # no reference model
    # the head is in every checkpoint; the LM head never ran and is unchanged
    final = Path(result.final_dir)
    for d in [m.path for m in RunDir(tmp / "r1").complete_checkpoints()] + [final]:
        assert (d / HEAD_FILE).is_file()
    assert set(load_file(str(final / HEAD_FILE))) == {"score.weight"}
    w, sft = load_file(str(final / "model.safetensors")), load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(w["lm_head.weight"], sft["lm_head.weight"])
    assert not torch.equal(w["model.norm.weight"], sft["model.norm.weight"])


def test_bradley_terry_round_two_restores_head_and_optimizer(bt_round, tiny_model_dir, tiny_sha):
    tmp, fb, res = bt_round
    cfg = make_config(
        tmp / "r2",
        tiny_model_dir,
        tiny_sha,
        fb,
        job_id="r2",
        loss={"name": "bradley_terry"},
        lr=1e-3,
        init_from=str(res.final_dir),
        counters={"step": res.step, "examples": res.examples},
    )
    trainer = Trainer.from_config(cfg)
    try:
        head = trainer.accelerator.unwrap_model(trainer.model).head
        saved = load_file(str(res.final_dir / HEAD_FILE))
        assert torch.equal(head.score.weight.detach(), saved["score.weight"])
        trainer.train()
    finally:
        _release(trainer)
    result2 = RunDir(tmp / "r2").read_result()
    saved_opt = torch.load(res.final_dir / "optimizer.pt", weights_only=True)
    assert result2.restored.optimizer_state_digest == optimizer_state_digest(saved_opt)
    assert result2.restored.optimizer_step == res.round_step
    assert _steps(tmp / "r2")[0]["rewards/accuracy"] > 0.8  # starts as round 1's reward model


# --------------------------------------------------------------------------- ppo


@pytest.fixture(scope="module")
def ppo_round(tmp_path_factory, tiny_model_dir, tiny_sha):
    tmp = tmp_path_factory.mktemp("ppo")
    fb = write_jsonl(binary_records(32, seed=3, test_fraction=0.2), tmp / "bin.jsonl")
    res = run(
        make_config(
            tmp / "r1",
            tiny_model_dir,
            tiny_sha,
            [(fb, "binary")],
            job_id="r1",
            loss={"name": "ppo", "critic_coef": 1.0},
            lr=1e-3,
            n_epochs=3,
        )
    )
    return tmp, fb, res


def test_ppo_trains_policy_and_value_head(ppo_round, tiny_model_dir):
    tmp, _, res = ppo_round
    steps = _steps(tmp / "r1")
    assert res.round_step == len(steps) >= 6
    for key in ("loss", "policy_loss", "critic_loss", "clip_fraction", "kl", "grad_norm"):
        assert key in steps[-1] and steps[-1][key] == steps[-1][key], key
    assert "advantages" not in steps[-1]  # token-level diagnostics stay out of the step metrics
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference (behaviour policy) at step 1
    assert abs(steps[-1]["kl"]) > 1e-4  # the policy moved
    first = sum(m["critic_loss"] for m in steps[:2]) / 2
    last = sum(m["critic_loss"] for m in steps[-2:]) / 2
    assert last < first  # the value head learns the returns
    assert "critic_loss" in res.eval
    result = RunDir(tmp / "r1").read_result()
    assert result.head == "value"
    assert result.reference_param_digest == param_digest(load_file(str(tiny_model_dir / "model.safetensors")))
    final = Path(result.final_dir)
    assert {"summary.0.weight", "summary.6.weight", "summary.6.bias"} <= set(load_file(str(final / HEAD_FILE)))
    w, sft = load_file(str(final / "model.safetensors")), load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(w[k], sft[k]) for k in sft)


def test_ppo_loss_in_the_trainer_uses_reference_logps_as_old_policy(ppo_round, tiny_model_dir, tiny_sha):
    """The trainer feeds losses/ppo.py's compute: reference log-probs as old_policy_logps, +1/-1 rewards."""
    from halos_core.losses import build_loss

    tmp, fb, _ = ppo_round
    cfg = make_config(tmp / "check", tiny_model_dir, tiny_sha, [(fb, "binary")], loss={"name": "ppo"})
    trainer = Trainer.from_config(cfg)
    try:
        inner = trainer.accelerator.unwrap_model(trainer.model).eval()
        mb = trainer.train_loader.microbatches(0)[0]
        out = trainer.compute_loss(mb, train=False)
        stream = mb.streams["target"]
        with torch.no_grad():
            logps, mask, values = inner(stream["input_ids"], stream["attention_mask"], stream["labels"], mode="values")
            ref = trainer.forward.reference_logps(stream)
        rewards = torch.where(mb.desirable, 1.0, -1.0)
        expected = build_loss({"name": "ppo"}).compute(
            policy_logps=logps, old_policy_logps=ref, values=values, rewards=rewards, mask=mask
        )
        torch.testing.assert_close(out.loss, expected.loss)
        torch.testing.assert_close(ref, logps)  # round 1, before any step: policy == reference
    finally:
        _release(trainer)


def test_ppo_round_two_restores_value_head_and_a_headless_round_is_refused(ppo_round, tiny_model_dir, tiny_sha):
    tmp, fb, res = ppo_round
    cfg = make_config(
        tmp / "r2",
        tiny_model_dir,
        tiny_sha,
        [(fb, "binary")],
        job_id="r2",
        loss={"name": "ppo"},
        init_from=str(res.final_dir),
        counters={"step": res.step, "examples": res.examples},
    )
    trainer = Trainer.from_config(cfg)
    try:
        head = trainer.accelerator.unwrap_model(trainer.model).head
        saved = load_file(str(res.final_dir / HEAD_FILE))
        assert all(torch.equal(v.detach(), saved[k]) for k, v in head.state_dict().items())
        assert optimizer_state_digest(trainer.optimizer.state_dict()) == optimizer_state_digest(
            torch.load(res.final_dir / "optimizer.pt", weights_only=True)
        )
    finally:
        _release(trainer)
    # a KTO round cannot continue a checkpoint whose optimizer also holds a value head
    kto = make_config(
        tmp / "r3",
        tiny_model_dir,
        tiny_sha,
        [(fb, "binary")],
        job_id="r3",
        loss={"name": "kto"},
        init_from=str(res.final_dir),
    )
    with pytest.raises(CheckpointError, match="value head"):
        run(kto)
    _reset()


_FSDP_BF16_HEADS = r"""
import os, socket, torch, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from halos_core.heads import RewardHead, ValueHead

class Root(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(16, 16); self.value = ValueHead(16, dropout=0.0); self.reward = RewardHead(16)
    def forward(self, x, mode):
        h = self.body(x)
        return self.value(h) if mode == "v" else self.reward(h, torch.ones(x.shape[:2], dtype=torch.long))

torch.manual_seed(0)
m = Root()
fully_shard(m, mesh=init_device_mesh("cpu", (1,)),
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
x = torch.randn(2, 5, 16)
values, rewards = m(x, "v"), m(x, "r")
assert values.dtype == torch.float32 and values.shape == (2, 4), (values.dtype, values.shape)
assert rewards.dtype == torch.float32 and rewards.shape == (2,)
values.sum().backward()
assert all(p.grad is not None for p in m.value.parameters())
dist.destroy_process_group()
print("OK")
"""


def test_heads_under_fsdp_bf16_mixed_precision():
    """FSDP2 bf16 mixed precision casts the heads' weights to bf16 for the forward: the value head
    (float32 on its own) must run in the weights' dtype and still return float32 values."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FSDP_BF16_HEADS], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]

"""LoRA rounds: the reference is the base with adapters disabled (no second model), checkpoints
hold adapters + optimizer, rounds chain, retries resume exactly, the final export merges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halos_core.checkpoint import load_checkpoint, optimizer_state_digest, param_digest
from halos_core.logprobs import token_logps
from halos_core.lora import ADAPTER_DIR, ADAPTER_WEIGHTS, adapter_state_dict, is_peft
from halos_core.run_dir import CheckpointError, RunDir
from halos_core.train import _release, run
from halos_core.training import Stopped, Trainer

from .conftest import make_config, read_jsonl

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _steps(run_dir: Path) -> list[dict]:
    return [m for m in read_jsonl(RunDir(run_dir).metrics_jsonl) if m.get("split") != "eval"]


def _reset():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def sft(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def round1(tmp_path_factory, tiny_model_dir, tiny_sha, pairwise_file):
    rd = tmp_path_factory.mktemp("lora") / "r1"
    res = run(
        make_config(
            rd,
            tiny_model_dir,
            tiny_sha,
            pairwise_file,
            job_id="r1",
            lora=LORA,
            checkpoint_every=2,
            warmup_steps=3,
            lr=2e-3,
        )
    )
    return res


def test_reference_is_the_base_with_adapters_off_and_no_second_copy(
    tmp_path, tiny_model_dir, tiny_sha, pairwise_file, sft
):
    cfg = make_config(tmp_path / "run", tiny_model_dir, tiny_sha, pairwise_file, lora=LORA)
    trainer = Trainer.from_config(cfg)
    try:
        inner = trainer.accelerator.unwrap_model(trainer.model)
        assert trainer.reference is None and is_peft(inner.lm)
        n_sft = sum(p.numel() for p in sft.parameters())
        lora_params = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        assert lora_params and all(".lora_" in n for n, _ in lora_params)
        # one model in memory: the SFT weights + the adapters, nothing else
        assert sum(p.numel() for p in inner.parameters()) == n_sft + sum(p.numel() for _, p in lora_params)
        held = trainer.optimizer.param_groups[0]["params"]
        assert len(held) == len(lora_params) == 2 * 2 * len(LORA["target_modules"])  # A and B per module per layer
        # make the adapters do something, then: reference == SFT exactly, policy != SFT
        with torch.no_grad():
            for n, p in lora_params:
                if "lora_B" in n:
                    p.normal_(std=0.05)
        (mb,) = trainer.train_loader.microbatches(0)[:1]
        stream = trainer.forward.reference_streams(mb)[0]
        ref = trainer.forward.reference_logps(stream)
        with torch.no_grad():
            expected, _ = token_logps(sft, stream["input_ids"], stream["attention_mask"], stream["labels"])
            policy, _ = trainer.forward.policy_logps(stream, grad=False)
        assert torch.equal(ref, expected)
        assert not torch.allclose(policy, expected, atol=1e-4)
        assert inner.training  # the reference pass put the model back in training mode
    finally:
        _release(trainer)


def test_lora_round_checkpoints_adapters_and_exports_merged(round1, tiny_model_dir, sft):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rd = RunDir(round1.run_dir)
    steps = _steps(rd.path)
    assert round1.round_step == 6 and steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[-1]["loss"] < steps[0]["loss"]
    result = rd.read_result()
    assert result.lora == {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "merged": True}
    assert result.reference_param_digest == param_digest(load_file(str(tiny_model_dir / "model.safetensors")))
    # intermediate checkpoints: adapters + optimizer, no full weights
    for manifest in rd.complete_checkpoints():
        files = set(manifest.files)
        assert {
            f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}",
            f"{ADAPTER_DIR}/adapter_config.json",
            "optimizer.pt",
            "scheduler.pt",
        } <= files
        assert "model.safetensors" not in files
        opt = torch.load(manifest.path / "optimizer.pt", weights_only=True)
        assert len(opt["state"]) == len(load_file(str(manifest.path / ADAPTER_DIR / ADAPTER_WEIGHTS)))
    # final: merged weights under the SFT model's names, loadable with plain transformers
    final = Path(result.final_dir)
    merged, base_w = load_file(str(final / "model.safetensors")), load_file(str(tiny_model_dir / "model.safetensors"))
    assert merged.keys() == base_w.keys()
    changed = {k for k in base_w if not torch.equal(merged[k], base_w[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    plain = AutoModelForCausalLM.from_pretrained(final).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), final / ADAPTER_DIR
    ).eval()
    ids = torch.randint(10, 500, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = plain(ids).logits, adapted(ids).logits, sft(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)


def test_lora_rounds_chain_adapters_optimizer_scheduler(round1, tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    final1 = round1.final_dir
    cfg2 = make_config(
        tmp_path / "r2",
        tiny_model_dir,
        tiny_sha,
        pairwise_file,
        job_id="r2",
        lora=LORA,
        init_from=str(final1),
        counters={"step": round1.step, "examples": round1.examples},
        warmup_steps=3,
        lr=2e-3,
    )
    trainer = Trainer.from_config(cfg2)
    try:
        lm = trainer.accelerator.unwrap_model(trainer.model).lm
        saved_adapters = load_file(str(final1 / ADAPTER_DIR / ADAPTER_WEIGHTS))
        live = adapter_state_dict(lm)
        assert live.keys() == saved_adapters.keys() and all(torch.equal(live[k], saved_adapters[k]) for k in live)
        saved_opt = load_checkpoint(final1).optimizer_state
        assert optimizer_state_digest(trainer.optimizer.state_dict()) == optimizer_state_digest(saved_opt)
        assert trainer.scheduler.last_epoch == round1.step == 6
        trainer.train()
    finally:
        _release(trainer)
    result2 = RunDir(tmp_path / "r2").read_result()
    restored = result2.restored
    assert restored.optimizer_state_digest == optimizer_state_digest(
        torch.load(final1 / "optimizer.pt", weights_only=True)
    )
    assert restored.optimizer_step == 6 and restored.lr_at_start == pytest.approx(2e-3)
    assert result2.reference_param_digest == RunDir(round1.run_dir).read_result().reference_param_digest
    steps2 = _steps(tmp_path / "r2")
    assert steps2[0]["step"] == 7 and steps2[0]["lr"] == pytest.approx(2e-3)  # no second warmup
    assert steps2[0]["loss"] < 0.69  # starts from round 1's adapters, not from the SFT model
    opt2 = torch.load(Path(result2.final_dir) / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in opt2["state"].values()} == {12}

    # a round cannot continue a checkpoint with other trainable state
    full = make_config(tmp_path / "r3", tiny_model_dir, tiny_sha, pairwise_file, job_id="r3", init_from=str(final1))
    with pytest.raises(CheckpointError, match="LoRA"):
        run(full)
    _reset()
    other = make_config(
        tmp_path / "r4",
        tiny_model_dir,
        tiny_sha,
        pairwise_file,
        job_id="r4",
        init_from=str(final1),
        lora={**LORA, "r": 2},
    )
    with pytest.raises(CheckpointError, match="LoRA"):
        run(other)
    _reset()


def test_lora_resume_equals_uninterrupted_and_unmerged_export(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    lora = {**LORA, "merge_on_export": False}
    kw = dict(checkpoint_every=3, warmup_steps=2, lr=2e-3, lora=lora)
    straight = run(make_config(tmp_path / "a", tiny_model_dir, tiny_sha, pairwise_file, job_id="a", **kw))
    cfg_b = make_config(tmp_path / "b", tiny_model_dir, tiny_sha, pairwise_file, job_id="b", **kw)
    with pytest.raises(Stopped):
        run(cfg_b, stop_after=4)
    _reset()
    latest = RunDir(tmp_path / "b").latest_checkpoint()
    assert latest.step == 3
    resumed = run(cfg_b.model_copy(update={"resume_from": str(latest.path)}))
    a, b = _steps(tmp_path / "a"), _steps(tmp_path / "b")
    for m, other in zip(a[3:], b[4:]):
        assert (m["step"], m["loss"], m["grad_norm"], m["lr"]) == (
            other["step"],
            other["loss"],
            other["grad_norm"],
            other["lr"],
        )
    wa = load_file(str(straight.final_dir / ADAPTER_DIR / ADAPTER_WEIGHTS))
    wb = load_file(str(resumed.final_dir / ADAPTER_DIR / ADAPTER_WEIGHTS))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (straight.final_dir / "model.safetensors").exists()  # merge_on_export: false -> adapters only
    assert resumed.result.resumed.optimizer_step == 3

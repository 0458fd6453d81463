"""The trainer: learning, round chaining (T2), resume equivalence (T1), data errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halos_core.checkpoint import load_checkpoint, optimizer_state_digest, param_digest
from halos_core.data.examples import DataError
from halos_core.run_dir import RunDir, read_manifest, tree_sha256
from halos_core.synthetic import binary_records, pairwise_records, write_jsonl
from halos_core.train import _release, run
from halos_core.training import Stopped, Trainer

from .conftest import make_config, read_jsonl


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(d) / "model.safetensors"))


def train_steps(run_dir: Path) -> list[dict]:
    return [m for m in read_jsonl(RunDir(run_dir).metrics_jsonl) if m.get("split") != "eval"]


def test_dpo_learns_the_rule(tmp_path, tiny_model_dir, tiny_sha):
    fb = write_jsonl(pairwise_records(64, seed=2, test_fraction=0.25), tmp_path / "pairs.jsonl")
    cfg = make_config(tmp_path / "run", tiny_model_dir, tiny_sha, fb, lr=2e-3, n_epochs=3)
    res = run(cfg)
    steps = train_steps(tmp_path / "run")
    assert res.result.status == "ok" and res.round_step == res.total_steps == len(steps) > 10
    first = sum(m["loss"] for m in steps[:3]) / 3
    last = sum(m["loss"] for m in steps[-3:]) / 3
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert last < first - 0.2
    assert res.eval["rewards/accuracy"] > 0.8 and res.eval["rewards/margin"] > 0
    for key in (
        "step",
        "round_step",
        "total_steps",
        "examples",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "rewards/margin",
    ):
        assert key in steps[-1]
    assert [m["step"] for m in steps] == list(range(1, len(steps) + 1))
    assert steps[-1]["examples"] == 8 * len(steps)
    result = RunDir(tmp_path / "run").read_result()
    assert result.manifest_sha256 == read_manifest(result.final_dir).sha256
    assert result.reference_sha256 == tiny_sha


def test_round_chaining_restores_optimizer_keeps_reference_no_new_warmup(
    tmp_path, tiny_model_dir, tiny_sha, pairwise_file
):
    common = dict(warmup_steps=4, lr=1e-3)
    r1 = run(make_config(tmp_path / "r1", tiny_model_dir, tiny_sha, pairwise_file, job_id="r1", **common))
    lr1 = [m["lr"] for m in train_steps(tmp_path / "r1")]
    assert r1.step == 6 and lr1 == pytest.approx([1e-3 * k / 4 for k in (1, 2, 3, 4, 4, 4)])

    cfg2 = make_config(
        tmp_path / "r2",
        tiny_model_dir,
        tiny_sha,
        pairwise_file,
        job_id="r2",
        init_from=str(r1.final_dir),
        counters={"step": r1.step, "examples": r1.examples},
        **common,
    )
    trainer = Trainer.from_config(cfg2)
    try:
        saved = load_checkpoint(r1.final_dir).optimizer_state
        now = trainer.optimizer.state_dict()
        assert len(now["state"]) == len(saved["state"]) > 0
        for idx, st in saved["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(now["state"][idx][key].cpu(), st[key]), (idx, key)
        assert trainer.scheduler.last_epoch == r1.step
        trainer.train()
    finally:
        _release(trainer)
    steps2 = train_steps(tmp_path / "r2")
    assert steps2[0]["step"] == r1.step + 1 and steps2[0]["round_step"] == 1
    assert steps2[0]["lr"] == pytest.approx(1e-3)  # post-warmup lr: warmup not repeated
    assert steps2[0]["examples"] == r1.examples + 8
    result1, result2 = RunDir(tmp_path / "r1").read_result(), RunDir(tmp_path / "r2").read_result()
    assert result2.reference_sha256 == tiny_sha == tree_sha256(tiny_model_dir)
    # proof of chaining, read back from the live optimizer right after the restore
    saved_file = torch.load(Path(r1.final_dir) / "optimizer.pt", weights_only=True)
    assert result1.restored is None
    restored = result2.restored
    assert restored.optimizer_state_digest == optimizer_state_digest(saved_file)
    assert restored.optimizer_state_digest != optimizer_state_digest(
        torch.load(Path(result2.final_dir) / "optimizer.pt", weights_only=True)
    )
    assert restored.optimizer_step == r1.round_step == 6
    assert restored.scheduler_last_epoch == r1.step and restored.lr_at_start == pytest.approx(1e-3)
    assert restored.source == str(r1.final_dir)
    # the reference as loaded is the SFT file, tensor for tensor (same names as model.safetensors)
    sft_digest = param_digest(load_file(str(tiny_model_dir / "model.safetensors")))
    assert result1.reference_param_digest == result2.reference_param_digest == sft_digest
    # the round-2 policy moved away from round 1's; the reference (SFT) did not change
    w1, w2, w0 = weights(r1.final_dir), weights(result2.final_dir), weights(tiny_model_dir)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    # round 2 starts from round 1's policy: its first loss is not the fresh-policy log 2
    assert steps2[0]["loss"] < 0.69


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    """T1: 2N steps straight vs N -> checkpoint -> stop -> resume: same losses, lr, step, weights."""
    kw = dict(checkpoint_every=3, warmup_steps=5, lr=1e-3, n_epochs=1, batch_size=8, microbatch_size=4)
    straight = run(make_config(tmp_path / "a", tiny_model_dir, tiny_sha, pairwise_file, job_id="a", **kw))
    assert straight.total_steps == 6

    cfg_b = make_config(tmp_path / "b", tiny_model_dir, tiny_sha, pairwise_file, job_id="b", **kw)
    with pytest.raises(Stopped):
        run(cfg_b, stop_after=4)  # killed after step 4; the last complete checkpoint is step 3
    _release_all()
    latest = RunDir(tmp_path / "b").latest_checkpoint()
    assert latest.step == 3
    resumed = run(cfg_b.model_copy(update={"resume_from": str(latest.path)}))

    a, b = train_steps(tmp_path / "a"), train_steps(tmp_path / "b")
    b_after = {m["step"]: m for m in b[4:]}  # the lines written after the resume (steps 4..6)
    assert sorted(b_after) == [4, 5, 6]
    for m in a[3:]:
        other = b_after[m["step"]]
        for key in ("loss", "lr", "grad_norm", "rewards/chosen", "rewards/rejected", "examples"):
            assert other[key] == m[key], (m["step"], key)
    assert resumed.step == straight.step == 6 and resumed.examples == straight.examples
    assert resumed.result.restored is None  # round 1: nothing restored from a parent
    assert resumed.result.resumed.optimizer_step == 3 and resumed.result.resumed.scheduler_last_epoch == 3
    assert resumed.result.resumed.optimizer_state_digest == optimizer_state_digest(
        torch.load(latest.path / "optimizer.pt", weights_only=True)
    )
    wa, wb = weights(straight.final_dir), weights(resumed.final_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = load_checkpoint(straight.final_dir).optimizer_state, load_checkpoint(resumed.final_dir).optimizer_state
    for idx in oa["state"]:
        assert torch.equal(oa["state"][idx]["step"], ob["state"][idx]["step"])
        assert torch.equal(oa["state"][idx]["exp_avg_sq"], ob["state"][idx]["exp_avg_sq"])


def _release_all():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def test_kto_and_sft_run(tmp_path, tiny_model_dir, tiny_sha):
    fb = write_jsonl(binary_records(32, seed=3), tmp_path / "bin.jsonl")
    res = run(make_config(tmp_path / "kto", tiny_model_dir, tiny_sha, [(fb, "binary")], loss={"name": "kto"}))
    steps = train_steps(tmp_path / "kto")
    assert res.round_step == 4 and "kl" in steps[-1] and "rewards/chosen" in steps[-1]
    res = run(make_config(tmp_path / "sft", tiny_model_dir, tiny_sha, [(fb, "binary")], loss={"name": "sft"}))
    steps = train_steps(tmp_path / "sft")
    # sft: one target per prompt (HALOs: the desirable output, else the best-rewarded one) -> 32 -> 4 steps
    assert res.round_step == 4 and steps[-1]["loss"] < steps[0]["loss"]


def test_two_files_with_the_same_prompt_ids_both_train(tmp_path, tiny_model_dir, tiny_sha):
    f1 = write_jsonl(pairwise_records(8, seed=4), tmp_path / "one.jsonl")
    f2 = write_jsonl(pairwise_records(8, seed=5), tmp_path / "two.jsonl")  # same ids p0..p7
    res = run(make_config(tmp_path / "run", tiny_model_dir, tiny_sha, [(f1, "pairwise"), (f2, "pairwise")]))
    assert res.total_steps == 2 and res.examples == 16


def test_empty_or_too_small_data_fails_fast(tmp_path, tiny_model_dir, tiny_sha):
    only_test = write_jsonl(pairwise_records(8, seed=6, test_fraction=1.0), tmp_path / "test.jsonl")
    with pytest.raises(DataError, match="no training examples"):
        run(make_config(tmp_path / "r1", tiny_model_dir, tiny_sha, only_test))
    _release_all()
    few = write_jsonl(pairwise_records(3, seed=6), tmp_path / "few.jsonl")
    with pytest.raises(DataError, match="fewer than batch_size"):
        run(make_config(tmp_path / "r2", tiny_model_dir, tiny_sha, few))
    _release_all()
    with pytest.raises(ValueError, match="SFT checkpoint changed"):
        run(make_config(tmp_path / "r3", tiny_model_dir, "0" * 64, few))
    _release_all()
    assert not RunDir(tmp_path / "r1").result_json.exists()


@pytest.mark.parametrize("loss", [{"name": "ipo"}, {"name": "cdpo"}, {"name": "simpo"}, {"name": "slic"}])
def test_other_paired_losses_share_the_path(tmp_path, tiny_model_dir, tiny_sha, pairwise_file, loss):
    res = run(make_config(tmp_path / "run", tiny_model_dir, tiny_sha, pairwise_file, loss=loss, n_epochs=1))
    steps = train_steps(tmp_path / "run")
    assert res.round_step == 6 and all(m["loss"] == m["loss"] for m in steps)  # finite, not NaN
    assert "rewards/accuracy" in steps[-1]


def test_grpo_and_csft_run(tmp_path, tiny_model_dir, tiny_sha):
    from halos_core.synthetic import scalar_records

    scal = write_jsonl(scalar_records(8, outputs_per_prompt=4, seed=5), tmp_path / "scal.jsonl")
    res = run(make_config(tmp_path / "grpo", tiny_model_dir, tiny_sha, [(scal, "scalar")], loss={"name": "grpo"}))
    steps = train_steps(tmp_path / "grpo")
    assert res.round_step == 4 and "kl" in steps[-1] and "advantages" in steps[-1]
    fb = write_jsonl(binary_records(16, seed=3), tmp_path / "bin.jsonl")
    res = run(make_config(tmp_path / "csft", tiny_model_dir, tiny_sha, [(fb, "binary")], loss={"name": "csft"}))
    assert res.round_step == 2


def test_kto_from_pairwise_with_conversion_and_eval(tmp_path, tiny_model_dir, tiny_sha):
    fb = write_jsonl(pairwise_records(24, seed=8, test_fraction=0.3), tmp_path / "pairs.jsonl")
    res = run(
        make_config(
            tmp_path / "run",
            tiny_model_dir,
            tiny_sha,
            fb,
            loss={"name": "kto"},
            conversion={"type": "pairwise_to_unpaired"},
        )
    )
    assert res.round_step >= 2 and "kl" in res.eval and res.eval["n"] > 0


def test_reference_logps_computed_once_and_reused_across_rounds(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    cache_dir = tmp_path / "refcache"
    first = run(
        make_config(
            tmp_path / "r1", tiny_model_dir, tiny_sha, pairwise_file, job_id="r1", reference_cache_dir=str(cache_dir)
        )
    )
    shards = list(cache_dir.glob("*/*.safetensors"))
    assert len(shards) == 1 and shards[0].parent.name.startswith(tiny_sha)
    cfg = make_config(
        tmp_path / "r2",
        tiny_model_dir,
        tiny_sha,
        pairwise_file,
        job_id="r2",
        reference_cache_dir=str(cache_dir),
        init_from=str(first.final_dir),
        counters={"step": first.step, "examples": first.examples},
    )
    trainer = Trainer.from_config(cfg)
    try:
        trainer.train()
        assert trainer.forward.reference_cache.misses == 0 and trainer.forward.reference_cache.hits > 0
    finally:
        _release(trainer)
    # a repeat of round 1 served entirely from the cache trains exactly like the fresh computation
    again = run(
        make_config(
            tmp_path / "r3", tiny_model_dir, tiny_sha, pairwise_file, job_id="r3", reference_cache_dir=str(cache_dir)
        )
    )
    a, b = train_steps(tmp_path / "r1"), train_steps(tmp_path / "r3")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert again.step == first.step


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_reference_per_batch_on_cpu_trains_exactly_like_the_pass_up_front(
    tmp_path, tiny_model_dir, tiny_sha, monkeypatch, loss
):
    """On the CPU the reference log-probs are computed as each batch comes (no pass before the
    first step, issue 11); the round is bit-for-bit the round with the pass up front, the eval
    included, and the rows computed on the way still reach the cache directory for later rounds."""
    from halos_core.training.forward import ForwardPass

    fb = write_jsonl(pairwise_records(40, seed=4, test_fraction=0.25), tmp_path / "pairs.jsonl")
    extra = {"conversion": {"type": "pairwise_to_unpaired"}} if loss == "kto" else {}
    runs = {}
    for mode in ("up_front", "per_batch"):
        cfg = make_config(
            tmp_path / mode,
            tiny_model_dir,
            tiny_sha,
            fb,
            loss={"name": loss},
            job_id=mode,
            reference_cache_dir=str(tmp_path / f"cache-{mode}"),
            **extra,
        )
        with monkeypatch.context() as m:
            if mode == "up_front":
                m.setattr(ForwardPass, "reference_up_front", property(lambda self: True))
            else:

                def no_pass(*args, **kwargs):
                    raise AssertionError("the reference pass ran before the first step")

                m.setattr(ForwardPass, "precompute_reference", no_pass)
            runs[mode] = run(cfg)
    a, b = (train_steps(tmp_path / m) for m in ("up_front", "per_batch"))
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/margin") if loss == "dpo" else ("loss", "grad_norm", "kl")
    assert len(a) == len(b) > 1
    assert [[m[k] for k in keys] for m in a] == [[m[k] for k in keys] for m in b]
    assert runs["up_front"].eval == runs["per_batch"].eval and runs["per_batch"].eval["n"] > 0
    wa, wb = weights(tmp_path / "up_front" / "final"), weights(tmp_path / "per_batch" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = {}
    for mode in ("up_front", "per_batch"):
        (shard,) = (tmp_path / f"cache-{mode}").glob("*/*.safetensors")
        rows[mode] = load_file(str(shard))
    assert rows["up_front"].keys() == rows["per_batch"].keys()
    assert all(torch.equal(rows["up_front"][k], rows["per_batch"][k]) for k in rows["up_front"])


def test_fp16_is_refused_bf16_and_fp32_accepted(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    """fp16 would need a loss scaler (unsaved state, skipped steps that still advance the schedule)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        make_config(tmp_path, tiny_model_dir, tiny_sha, pairwise_file, mixed_precision="fp16")
    for precision in ("no", "bf16"):
        assert (
            make_config(tmp_path, tiny_model_dir, tiny_sha, pairwise_file, mixed_precision=precision).mixed_precision
            == precision
        )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(
    tmp_path, tiny_model_dir, tiny_sha, pairwise_file, lora
):
    """hp.gradient_checkpointing recomputes the decoder layers' activations in backward: the same
    losses, gradients and weights as without it (1e-5)."""
    from halos_core.train import _release

    extra = {"lora": {"r": 4, "alpha": 8}} if lora else {}
    grads, trainers = {}, {}
    for ckpt in (False, True):
        cfg = make_config(
            tmp_path / f"gc{ckpt}",
            tiny_model_dir,
            tiny_sha,
            pairwise_file,
            job_id=f"gc{ckpt}",
            gradient_checkpointing=ckpt,
            **extra,
        )
        trainer = Trainer.from_config(cfg)
        try:
            lm = trainer.accelerator.unwrap_model(trainer.model).lm
            assert any(getattr(m, "gradient_checkpointing", False) for m in lm.modules()) == ckpt
            mb = trainer.train_loader.microbatches(0)[0]
            trainer.precompute_reference()
            trainer.model.train()
            out = trainer.compute_loss(mb, train=True)
            out.loss.backward()
            grads[ckpt] = (
                out.loss.item(),
                {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
            )
            trainer.optimizer.zero_grad()
            trainers[ckpt] = trainer.train()
        finally:
            _release(trainer)
    (loss0, g0), (loss1, g1) = grads[False], grads[True]
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-5, msg=name)
    a, b = train_steps(tmp_path / "gcFalse"), train_steps(tmp_path / "gcTrue")
    assert len(a) == len(b) > 1
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5) and y["grad_norm"] == pytest.approx(
            x["grad_norm"], abs=1e-5
        )
    if not lora:
        wa, wb = weights(tmp_path / "gcFalse" / "final"), weights(tmp_path / "gcTrue" / "final")
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)

"""Prefix sharing for paired losses: the same log-probs (and gradients) as the unshared joint stream."""

from __future__ import annotations

import pytest
import torch

from halos_core.logprobs import token_logps
from halos_core.prefix_sharing import UnsupportedPrefixSharing, shared_layout, shared_prefix_token_logps
from halos_core.synthetic import pairwise_records, write_jsonl
from halos_core.train import _release
from halos_core.training import Trainer

from .conftest import make_config

ATOL = 1e-5  # float32: the attention sums run over other shapes, nothing else differs


@pytest.fixture(scope="module")
def joint(tmp_path_factory, tiny_model_dir, tiny_sha):
    """The policy LM and a real joint stream (chosen rows, then rejected rows) from the collator."""
    tmp = tmp_path_factory.mktemp("prefix")
    fb = write_jsonl(pairwise_records(16, seed=11), tmp / "pairs.jsonl")
    trainer = Trainer.from_config(make_config(tmp / "run", tiny_model_dir, tiny_sha, fb, microbatch_size=8))
    try:
        mb = trainer.train_loader.microbatches(0)[0]
        stream = trainer.forward.joint_stream(mb)
        lm = trainer.accelerator.unwrap_model(trainer.model).lm
    finally:
        _release(trainer)  # now: later tests build trainers of their own
    return lm, stream


def _grads(lm, fn, stream):
    lm.zero_grad()
    logps, mask = fn(lm, stream["input_ids"], stream["attention_mask"], stream["labels"])
    (logps * torch.linspace(0.5, 1.5, logps.shape[1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()
    return logps.detach(), mask, grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_logps_and_gradients_equal_the_unshared_path(joint, attn):
    lm, stream = joint
    before = lm.config._attn_implementation
    lm.set_attn_implementation(attn)
    try:
        ref, ref_mask, ref_grads = _grads(lm, token_logps, stream)
        got, got_mask, got_grads = _grads(lm, shared_prefix_token_logps, stream)
    finally:
        lm.set_attn_implementation(before)
    assert torch.equal(got_mask, ref_mask) and ref_mask.any()
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert got[~got_mask].abs().sum() == 0
    assert got_grads.keys() == ref_grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=ATOL, msg=name)


def test_the_prompt_is_run_once(joint):
    lm, stream = joint
    ids, mask, labels = stream["input_ids"], stream["attention_mask"], stream["labels"]
    n = ids.shape[0] // 2
    layout = shared_layout(ids, mask, labels)
    prompt = [int((labels[i] != -100).nonzero()[0]) for i in range(n)]
    real = int(mask.sum())
    # every pair's row holds chosen + rejected minus one copy of the prompt
    shared_tokens = sum(int(mask[i].sum()) + int(mask[n + i].sum()) - prompt[i] for i in range(n))
    assert layout.input_ids.shape[0] == n and min(prompt) > 0
    assert shared_tokens == real - sum(prompt)
    assert layout.input_ids.shape[1] >= max(int(mask[i].sum()) for i in range(2 * n))
    # the rejected response never attends to the chosen response
    lc, end = int(mask[0].sum()), int(mask[0].sum()) + int(mask[n].sum()) - prompt[0]
    assert not layout.allowed[0, lc:end, prompt[0] : lc].any() and layout.allowed[0, lc:end, : prompt[0]].all()
    assert layout.position_ids[0, lc].item() == prompt[0]  # the rejected response starts where the prompt ends


def test_pairs_without_a_common_prefix_and_odd_batches(joint):
    lm, stream = joint
    ids = stream["input_ids"].clone()
    n = ids.shape[0] // 2
    ids[n, 0] = (ids[0, 0] + 1) % lm.config.vocab_size  # pair 0: the rows differ from the first token
    changed = {**stream, "input_ids": ids}
    with torch.no_grad():
        ref, _ = token_logps(lm, ids, stream["attention_mask"], stream["labels"])
        got, _ = shared_prefix_token_logps(lm, ids, stream["attention_mask"], stream["labels"])
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert shared_layout(ids, changed["attention_mask"], changed["labels"]).position_ids[0, 0] == 0
    with pytest.raises(ValueError):
        shared_layout(ids[:-1], stream["attention_mask"][:-1], stream["labels"][:-1])


def test_other_attention_implementations_are_refused(joint):
    lm, stream = joint
    before = lm.config._attn_implementation
    lm.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(UnsupportedPrefixSharing):
            shared_prefix_token_logps(lm, stream["input_ids"], stream["attention_mask"], stream["labels"])
    finally:
        lm.config._attn_implementation = before


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_round_with_prefix_sharing_trains_like_one_without(tmp_path, tiny_model_dir, tiny_sha, monkeypatch, lora):
    """hyperparams.prefix_sharing: the policy and the reference (with LoRA: the base, adapters off)
    run each pair's prompt once; the round's losses, gradient norms and eval stay within float
    tolerance of the unshared round, and its reference rows live apart in the cache (an unshared
    round keeps reading exact rows)."""
    import halos_core.prefix_sharing as ps
    from halos_core.config import Hyperparams
    from halos_core.job_spec import hyperparams_problem
    from halos_core.train import run

    from .conftest import read_jsonl

    calls = []
    real = ps.shared_prefix_token_logps

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(ps, "shared_prefix_token_logps", counting)
    monkeypatch.setattr("halos_core.training.forward.shared_prefix_token_logps", counting)
    fb = write_jsonl(pairwise_records(40, seed=6, test_fraction=0.25), tmp_path / "pairs.jsonl")
    cache = tmp_path / "cache"
    results, steps = {}, {}
    for shared in (False, True):
        cfg = make_config(
            tmp_path / f"run{shared}",
            tiny_model_dir,
            tiny_sha,
            fb,
            job_id=f"run{shared}",
            reference_cache_dir=str(cache),
            prefix_sharing=shared,
            **({"lora": {"r": 4, "alpha": 8}} if lora else {}),
        )
        results[shared] = run(cfg)
        steps[shared] = [m for m in read_jsonl(tmp_path / f"run{shared}" / "metrics.jsonl") if "split" not in m]
    n = len(steps[False])
    assert n == len(steps[True]) > 1
    # every training step ran the shared policy forward (with grad), plus the reference and eval without
    assert calls.count(True) == 2 * n and calls.count(False) > 0  # 2 microbatches per step
    for a, b in zip(steps[False], steps[True]):
        for key in ("loss", "grad_norm", "rewards/margin"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    for key, value in results[False].eval.items():
        assert results[True].eval[key] == pytest.approx(value, abs=1e-4), key
    assert sorted(p.name.split("-", 1)[1] for p in cache.iterdir()) == ["no", "no-prefix-shared"]
    hp = Hyperparams(prefix_sharing=True, packing=True, batch_size=8, microbatch_size=4)
    assert "cannot be combined" in hyperparams_problem("dpo", hp, 1)

"""Sequence packing (`halos_core.data.packing`, `logprobs.packed_token_logps`): packed rows give the
padded log-probs and gradients, no token attends across a sequence boundary, packed rows carry far
less padding, and a training run with `packing` on equals one with it off. Also the optional
length bucketing of `TrainLoader`."""

from __future__ import annotations

import random

import pytest
import torch

from halos_core.data.examples import SFTExample
from halos_core.data.loaders import TrainLoader, example_length
from halos_core.data.packing import (
    check_packing_supported,
    pack_stream,
    padding_stats,
    plan_rows,
)
from halos_core.logprobs import TokenLogprobModel, decoder_and_head, logps_from_hidden, packed_token_logps, token_logps
from halos_core.run_dir import RunDir
from halos_core.synthetic import binary_records, pairwise_records, write_jsonl

from .conftest import make_config, read_jsonl

LENGTHS = [61, 2, 30, 5, 47, 1, 12, 64]  # very different lengths, incl. a 1-token sequence


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=request.param)
    assert m.config._attn_implementation == request.param
    return m


def _stream(vocab: int, lengths=LENGTHS, seed: int = 0, prompt: int = 3):
    g = torch.Generator().manual_seed(seed)
    batch, width = len(lengths), max(lengths)
    ids = torch.randint(10, vocab, (batch, width), generator=g)
    attn = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    ids[attn == 0] = 0  # pad id
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[attn == 0] = -100
    return ids, attn, labels


# --------------------------------------------------------------------------- layout


def test_pack_layout_and_roundtrip():
    ids, attn, labels = _stream(100)
    p = pack_stream(ids, attn, labels, attn_impl="sdpa")
    assert p.input_ids.shape[0] < len(LENGTHS) and p.input_ids.shape[1] == max(LENGTHS)  # bins of the longest
    assert sorted(i for row in p.rows for i in row) == list(range(len(LENGTHS)))
    # unpacking the packed ids gives back the padded ids (pad positions 0)
    assert torch.equal(p.unpack(p.input_ids), ids * attn)
    for r, members in enumerate(p.rows):
        offset = 0
        for i in members:
            n = LENGTHS[i]
            assert p.position_ids[r, offset : offset + n].tolist() == list(range(n))  # restart at 0
            assert p.labels[r, offset] == -100  # a sequence's first token is never a target
            assert torch.equal(p.labels[r, offset + 1 : offset + n], labels[i, 1:n])
            offset += n
        assert (p.labels[r, offset:] == -100).all()


def test_row_planning_and_guards():
    assert plan_rows([5, 3, 2, 4, 0], 7) == [[0, 2], [3, 1]]  # first-fit decreasing, empty rows skipped
    with pytest.raises(ValueError):
        plan_rows([9], 8)
    ids, attn, labels = _stream(100)
    # flash kernels isolate packed sequences only in a single row: everything goes into one
    one = pack_stream(ids, attn, labels, attn_impl="flash_attention_2")
    assert one.input_ids.shape == (1, sum(LENGTHS))
    with pytest.raises(ValueError):
        pack_stream(ids, attn, labels, attn_impl="flash_attention_2", capacity=max(LENGTHS))
    left = attn.flip(1)
    with pytest.raises(ValueError):
        pack_stream(ids, left, labels)  # left padding is refused

    class Cfg:
        _attn_implementation = "some_custom_kernel"  # would skip mask creation: tokens would cross

    with pytest.raises(NotImplementedError):
        check_packing_supported(Cfg())


# --------------------------------------------------------------------------- equality


def test_packed_equals_padded_values_and_grads(model):
    ids, attn, labels = _stream(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.linspace(0.5, 1.5, ids.shape[1] - 1)  # a non-uniform upstream gradient

    a, ma = token_logps(model, ids, attn, labels)
    ga = torch.autograd.grad((a * weights).sum(), params)
    b, mb = packed_token_logps(model, ids, attn, labels)
    gb = torch.autograd.grad((b * weights).sum(), params)

    assert b.shape == a.shape == (len(LENGTHS), max(LENGTHS) - 1) and b.dtype == torch.float32
    assert torch.equal(ma, mb) and (b[~mb] == 0).all()
    diff = (a - b).abs().max().item()
    gdiff = max((x - y).abs().max().item() for x, y in zip(ga, gb))
    print(f"\n[{model.config._attn_implementation}] packed vs padded: max |dlogp| {diff:.2e}, max |dgrad| {gdiff:.2e}")
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-4)
    # the wrapper (what DDP wraps) packs when told to, with small chunks too
    with torch.no_grad():
        c, _ = TokenLogprobModel(model, chunk_tokens=7, packing=True)(ids, attn, labels)
    torch.testing.assert_close(c, a.detach(), atol=1e-5, rtol=0)
    # one row of everything (the flash layout) is also exact on sdpa/eager
    with torch.no_grad():
        d, _ = packed_token_logps(model, ids, attn, labels, capacity=sum(LENGTHS))
    torch.testing.assert_close(d, a.detach(), atol=1e-5, rtol=0)


def _seq_logps_in_one_row(model, ids, attn, labels, *, restrict: bool):
    """Per-sequence log-probs of a pack of all sequences in ONE row; `restrict=False` is the
    negative control: the same row with a plain 2D mask (transformers then uses a plain causal mask)."""
    lengths = attn.sum(1).tolist()
    p = pack_stream(ids, attn, labels, capacity=sum(lengths))
    assert p.input_ids.shape[0] == 1
    decoder, head = decoder_and_head(model)
    mask = None if restrict else torch.ones_like(p.input_ids)
    with torch.no_grad():
        hidden = decoder(
            input_ids=p.input_ids, attention_mask=mask, position_ids=p.position_ids, use_cache=False
        ).last_hidden_state
        logps, _ = logps_from_hidden(head, hidden, p.labels)
    return p.unpack_shifted(logps), p


def test_no_token_attends_across_a_sequence_boundary(model):
    lengths = [20, 13, 9, 6]
    ids, attn, labels = _stream(model.config.vocab_size, lengths, seed=1, prompt=1)
    before, p = _seq_logps_in_one_row(model, ids, attn, labels, restrict=True)
    assert p.rows == [[0, 1, 2, 3]]  # sequence 0 first, then 1, 2, 3 in the same row
    perturbed = ids.clone()
    perturbed[0, : lengths[0]] = torch.randint(
        10, model.config.vocab_size, (lengths[0],), generator=torch.Generator().manual_seed(9)
    )
    after, _ = _seq_logps_in_one_row(model, perturbed, attn, labels, restrict=True)
    assert not torch.equal(before[0], after[0])  # the perturbation did something
    for i in (1, 2, 3):  # ... and nothing at all to the sequences packed after it
        assert torch.equal(before[i], after[i]), i

    # negative control: without the restriction the later sequences DO see sequence 0
    before_x, _ = _seq_logps_in_one_row(model, ids, attn, labels, restrict=False)
    after_x, _ = _seq_logps_in_one_row(model, perturbed, attn, labels, restrict=False)
    assert (before_x[1] - after_x[1]).abs().max() > 1e-4

    # the mask transformers builds from the packed position_ids is exactly block-causal
    if model.config._attn_implementation == "sdpa":
        from transformers.masking_utils import create_causal_mask

        embeds = decoder_and_head(model)[0].embed_tokens(p.input_ids)
        built = create_causal_mask(model.config, embeds, None, None, position_ids=p.position_ids)
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        causal = torch.tril(torch.ones(len(seq), len(seq), dtype=torch.bool))
        assert torch.equal(built[0, 0], causal & (seq[:, None] == seq[None, :]))


def test_padding_fraction_packed_vs_padded(tmp_path, tiny_tokenizer):
    lengths = [120, 7, 33, 64, 5, 90, 12, 48]
    ids, attn, labels = _stream(100, lengths)
    stats = padding_stats(attn, pack_stream(ids, attn, labels))
    print(f"\nsynthetic lengths {lengths}: {stats}")
    assert stats["packed_slots"] < stats["padded_slots"] and stats["packed_rows"] < stats["padded_rows"]
    assert stats["packed_pad_fraction"] < 0.5 * stats["padded_pad_fraction"]
    assert stats == padding_stats(attn)  # the planner alone gives the same figures
    flash = padding_stats(attn, attn_impl="flash_attention_2")  # one row of everything: no padding at all
    print(f"one-row (flash varlen) layout: {flash}")
    assert flash["packed_rows"] == 1 and flash["packed_pad_fraction"] == 0.0

    # real microbatches (chosen + rejected, as the trainer runs them) of varied-length chat data
    from halos_core.data.collate import concat_streams
    from halos_core.data.examples import build_examples
    from halos_core.data.loaders import Batcher
    from halos_core.data.tokenize import ChatEncoder
    from halos_core.feedback import read_records

    path = write_jsonl(_varied(pairwise_records(32, seed=3), "pairwise"), tmp_path / "pairs.jsonl")
    files = [("f0", list(read_records(path)))]
    examples = build_examples(files, "paired", seed=0)
    batcher = Batcher(ChatEncoder(tiny_tokenizer, 256, 48), "paired")
    padded = packed = real = 0
    for k in range(0, 32, 4):
        mb = batcher(examples.train[k : k + 4])
        both = concat_streams([mb.streams["chosen"], mb.streams["rejected"]], 0)
        s = padding_stats(both["attention_mask"])
        padded, packed, real = padded + s["padded_slots"], packed + s["packed_slots"], real + s["real_tokens"]
    print(f"chat microbatches: pad fraction padded-to-longest {1 - real / padded:.1%}, packed {1 - real / packed:.1%}")
    assert 1 - real / packed < 0.5 * (1 - real / padded)


# --------------------------------------------------------------------------- trainer


def _varied(records: list[dict], kind: str, seed: int = 0) -> list[dict]:
    """Outputs repeated 1..8 times: sequences of very different lengths."""
    rng = random.Random(seed)
    fields = ("output_A", "output_B") if kind == "pairwise" else ("output",)
    for r in records:
        for f in fields:
            turn = r[f][0]
            turn["content"] = " ".join([turn["content"]] * rng.randint(1, 8))
    return records


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_training_with_packing_equals_without(tmp_path, tiny_model_dir, tiny_sha, monkeypatch, loss):
    from halos_core.data import packing
    from halos_core.train import run

    if loss == "dpo":
        fb = write_jsonl(_varied(pairwise_records(16, seed=4), "pairwise"), tmp_path / "fb.jsonl")
        feedback = [(fb, "pairwise")]
    else:
        fb = write_jsonl(_varied(binary_records(16, seed=4), "binary"), tmp_path / "fb.jsonl")
        feedback = [(fb, "binary")]
    shapes = []
    real_pack = packing.pack_stream

    def spy(*args, **kwargs):
        out = real_pack(*args, **kwargs)
        shapes.append((args[0].shape[0], out.input_ids.shape[0]))
        return out

    monkeypatch.setattr(packing, "pack_stream", spy)
    runs = {}
    for on in (False, True):
        name = f"{loss}-{'packed' if on else 'padded'}"
        cfg = make_config(
            tmp_path / name,
            tiny_model_dir,
            tiny_sha,
            feedback,
            job_id=name,
            loss={"name": loss, "beta": 0.1},
            max_length=160,
            n_epochs=2,
            lr=2e-3,
            packing=on,
        )
        assert cfg.hyperparams.packing is on
        res = run(cfg)
        assert res.result.status == "ok"
        runs[on] = [m for m in read_jsonl(RunDir(tmp_path / name).metrics_jsonl) if m.get("split") != "eval"]
    assert shapes and all(rows <= batch for batch, rows in shapes)
    assert any(rows < batch for batch, rows in shapes)  # sequences really shared rows
    off, on_ = runs[False], runs[True]
    assert len(off) == len(on_) == 4
    keys = [k for k in off[0] if k.startswith(("loss", "rewards/", "kl")) or k == "grad_norm"]
    assert "loss" in keys and "grad_norm" in keys
    print(f"\n{loss} losses off {[m['loss'] for m in off]}\n{loss} losses on  {[m['loss'] for m in on_]}")
    for a, b in zip(off, on_):
        for k in keys:
            assert b[k] == pytest.approx(a[k], abs=1e-5, rel=1e-5), (a["step"], k)


# --------------------------------------------------------------------------- length buckets


def test_length_buckets_keep_each_step_and_group_similar_lengths():
    rng = random.Random(0)
    examples = [
        SFTExample(("f", str(i)), (("user", "q" * rng.randint(1, 9)),), (("assistant", "a" * rng.randint(1, 300)),))
        for i in range(64)
    ]
    kw = dict(batch_size=16, microbatch_size=2, num_processes=2, n_epochs=2, seed=7)
    plain = [TrainLoader(examples, None, process_index=r, **kw) for r in (0, 1)]
    bucket = [TrainLoader(examples, None, process_index=r, bucket_by_length=True, **kw) for r in (0, 1)]
    spread = {False: 0, True: 0}
    for step in range(plain[0].total_steps):
        for loaders, on in ((plain, False), (bucket, True)):
            mbs = [loader.local_indices(step) for loader in loaders]
            flat = sorted(i for per_rank in mbs for mb in per_rank for i in mb)
            assert flat == sorted(plain[0].step_indices(step))  # the step's examples are unchanged
            for k in range(len(mbs[0])):  # accumulation step k across both processes
                lens = [example_length(examples[i]) for r in (0, 1) for i in mbs[r][k]]
                spread[on] += max(lens) - min(lens)
        again = TrainLoader(examples, None, process_index=1, bucket_by_length=True, **kw)
        assert again.local_indices(step) == bucket[1].local_indices(step)  # deterministic
    print(f"\nsum over microbatches of (longest - shortest) chars: plain {spread[False]}, bucketed {spread[True]}")
    assert spread[True] < 0.5 * spread[False]

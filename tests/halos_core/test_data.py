"""Examples (HALOs semantics), truncation, padding, KL pairs, sharding and resumable positions."""

from __future__ import annotations

import pytest

from halos_core.data.examples import (
    DataError,
    GroupedExample,
    PairedExample,
    UnpairedExample,
    build_examples,
    held_out,
)
from halos_core.data.loaders import Batcher, EvalLoader, TrainLoader
from halos_core.data.tokenize import IGNORE_INDEX, ChatEncoder
from halos_core.feedback import BinaryRecord, PairwiseRecord, ScalarRecord, Turn


def T(role, text):
    return [Turn(role=role, content=text)]


def pair(pid, a, b, label=1, split="train", prompt=None, ra=None, rb=None):
    return PairwiseRecord(
        prompt_id=pid,
        prompt=T("user", prompt or f"prompt {pid}"),
        output_A=T("assistant", a),
        output_B=T("assistant", b),
        label=label,
        reward_A=ra,
        reward_B=rb,
        split=split,
    )


def binary(pid, out, label, split="train", reward=None):
    return BinaryRecord(
        prompt_id=pid,
        prompt=T("user", f"prompt {pid}"),
        output=T("assistant", out),
        label=label,
        reward=reward,
        split=split,
    )


# --------------------------------------------------------------------------- examples


def test_all_pairs_per_prompt_and_prompt_ids_scoped_per_file():
    f1 = [pair("p1", "good one", "bad one", 1), pair("p1", "bad two", "good two", 0), pair("p2", "x", "y", 1)]
    f2 = [pair("p1", "other good", "other bad", 1)]  # same prompt id, other file: kept
    ex = build_examples([("fileA", f1), ("fileB", f2)], "paired")
    assert len(ex.train) == 4 and not ex.eval
    by_key = {}
    for e in ex.train:
        assert isinstance(e, PairedExample)
        by_key.setdefault(e.key, []).append((e.chosen[0][1], e.rejected[0][1]))
    assert by_key[("fileA", "p1")] == [("good one", "bad one"), ("good two", "bad two")]
    assert by_key[("fileB", "p1")] == [("other good", "other bad")]


def test_pair_with_identical_outputs_is_left_out_of_training():
    """The upload reports such a pair as `identical_outputs` ("left out of training"): no loss
    sees it, paired or unpaired (it would be a chosen and a rejected copy of the same reply)."""
    recs = [pair("p1", "same", "same", 1), pair("p1", "good", "bad", 1), pair("p2", "x", "x", 0)]
    paired = build_examples([("f", recs)], "paired")
    assert [(e.chosen[0][1], e.rejected[0][1]) for e in paired.train] == [("good", "bad")]
    unpaired = build_examples([("f", recs)], "unpaired")
    assert sorted((e.output[0][1], e.desirable) for e in unpaired.train) == [("bad", False), ("good", True)]


def test_max_pairs_per_prompt_is_a_seeded_sample():
    recs = [pair("p", f"a{i}", f"b{i}") for i in range(6)]
    a = build_examples([("f", recs)], "paired", max_pairs_per_prompt=2, seed=3)
    b = build_examples([("f", recs)], "paired", max_pairs_per_prompt=2, seed=3)
    assert len(a.train) == 2 and a.train == b.train


def test_split_test_and_eval_fraction():
    recs = [pair("p1", "a", "b"), pair("p2", "a", "b", split="test"), pair("p2", "c", "d")]
    ex = build_examples([("f", recs)], "paired")
    assert [e.key for e in ex.train] == [("f", "p1")]
    assert len(ex.eval) == 2  # a prompt is never split between train and eval
    many = [pair(f"p{i}", "a", "b") for i in range(200)]
    ex = build_examples([("f", many)], "paired", eval_fraction=0.25, seed=0)
    again = build_examples([("f", many)], "paired", eval_fraction=0.25, seed=0)
    assert ex.eval == again.eval and 25 < len(ex.eval) < 75
    assert all(held_out(0, e.key, 0.25) for e in ex.eval)


def test_unpaired_sft_grouped():
    ex = build_examples([("f", [binary("p1", "yes", 1), binary("p1", "no", 0), pair("p2", "A", "B", 0)])], "unpaired")
    got = [(e.key[1], e.output[0][1], e.desirable) for e in ex.train]
    assert got == [("p1", "yes", True), ("p1", "no", False), ("p2", "B", True), ("p2", "A", False)]
    assert all(isinstance(e, UnpairedExample) for e in ex.train)

    sft = build_examples([("f", [binary("p1", "no", 0, reward=0.9), binary("p1", "yes", 1, reward=0.1)])], "sft")
    assert [e.target[0][1] for e in sft.train] == ["yes"]  # first desirable wins over reward
    sft = build_examples([("f", [pair("p", "A", "B", 1, ra=0.2, rb=0.7)])], "sft")
    assert [e.target[0][1] for e in sft.train] == ["B"]  # highest reward (HALOs)

    scal = [
        ScalarRecord(prompt_id="q", prompt=T("user", "q"), output=T("assistant", f"o{i}"), reward=float(i))
        for i in range(3)
    ]
    g = build_examples([("f", scal)], "grouped")
    assert all(isinstance(e, GroupedExample) for e in g.train)
    adv = [e.advantage for e in g.train]
    assert adv[0] < 0 < adv[2] and abs(sum(adv)) < 1e-9

    with pytest.raises(DataError):
        build_examples([("f", [binary("p", "x", 1)])], "paired")


# --------------------------------------------------------------------------- tokenisation


def test_truncation_like_halos(tiny_tokenizer):
    enc = ChatEncoder(tiny_tokenizer, max_length=40, max_prompt_length=16)
    long_prompt = (("user", "the cat " * 40),)
    long_out = (("assistant", "red dog sun " * 40),)
    e = enc.encode(long_prompt, long_out)
    n_prompt = sum(1 for x in e.labels if x == IGNORE_INDEX)
    assert len(e) <= 40 and n_prompt <= 16
    assert e.labels[n_prompt:] == e.input_ids[n_prompt:]
    text = tiny_tokenizer.decode(e.input_ids)
    assert text.startswith("<|user|>the cat")  # the prompt keeps its beginning (HALOs)
    assert "<|assistant|>red dog" in text
    short = enc.encode((("user", "hi"),), (("assistant", "ok"),))
    assert tiny_tokenizer.decode(short.input_ids) == "<|user|>hi<|end|><|assistant|>ok<|end|>"
    assert short.input_ids[-1] == tiny_tokenizer.eos_token_id and short.labels[-1] == tiny_tokenizer.eos_token_id
    # multi-turn prompt: later turns dropped once the budget is used
    multi = (("user", "one " * 5), ("assistant", "two " * 30), ("user", "three"))
    m = enc.encode(multi, (("assistant", "ok"),))
    assert "three" not in tiny_tokenizer.decode(m.input_ids)


def test_padding_to_longest_and_kl_pairs(tiny_tokenizer):
    enc = ChatEncoder(tiny_tokenizer, max_length=128, max_prompt_length=64)
    exs = [
        UnpairedExample(("f", str(i)), (("user", f"q{i}"),), (("assistant", "x" * (i + 1)),), i % 2 == 0)
        for i in range(3)
    ]
    mb = Batcher(enc, "unpaired", kl_pairs=True)(exs)
    tgt = mb.streams["target"]
    lengths = [len(enc.encode(e.prompt, e.output)) for e in exs]
    assert tgt["input_ids"].shape == (3, max(lengths)) and max(lengths) < 128
    assert tgt["attention_mask"].sum(1).tolist() == lengths
    assert (tgt["labels"][tgt["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert mb.desirable.tolist() == [True, False, True]
    kl = mb.streams["kl"]
    for i in range(3):
        want = enc.encode(exs[i].prompt, exs[(i + 1) % 3].output).input_ids
        assert kl["input_ids"][i, : len(want)].tolist() == list(want)


# --------------------------------------------------------------------------- loaders


def _loader(examples, tok, P=1, r=0, **kw):
    enc = ChatEncoder(tok, 64, 32)
    args = dict(batch_size=8, microbatch_size=2, n_epochs=2, seed=7)
    args.update(kw)
    return TrainLoader(examples, Batcher(enc, "paired"), num_processes=P, process_index=r, **args)


def _examples(n):
    return [
        PairedExample(("f", str(i)), (("user", f"q{i}"),), (("assistant", "a"),), (("assistant", "b"),))
        for i in range(n)
    ]


def test_sharding_is_a_partition_of_the_process_independent_global_batch(tiny_tokenizer):
    exs = _examples(21)
    one = _loader(exs, tiny_tokenizer)
    assert one.steps_per_epoch == 2 and one.total_steps == 4 and one.gradient_accumulation_steps == 4
    ranks = [_loader(exs, tiny_tokenizer, P=2, r=r) for r in range(2)]
    assert ranks[0].gradient_accumulation_steps == 2
    for step in range(one.total_steps):
        batch = one.step_indices(step)
        assert len(set(batch)) == 8
        local = [sum(rk.local_indices(step), []) for rk in ranks]
        assert not set(local[0]) & set(local[1])
        assert sorted(local[0] + local[1]) == sorted(batch)
    # each epoch visits distinct examples; epochs are shuffled differently
    e0 = one.step_indices(0) + one.step_indices(1)
    e1 = one.step_indices(2) + one.step_indices(3)
    assert len(set(e0)) == 16 and e0 != e1


def test_resume_from_data_position_and_determinism(tiny_tokenizer):
    exs = _examples(20)
    full = list(_loader(exs, tiny_tokenizer).iter_steps(0))
    again = list(_loader(exs, tiny_tokenizer).iter_steps(0))
    tail = list(_loader(exs, tiny_tokenizer).iter_steps(position=16))
    assert [s for s, _ in tail] == [2, 3]
    for (s1, mbs1), (s2, mbs2) in zip(full[2:], tail):
        assert s1 == s2
        for a, b in zip(mbs1, mbs2):
            assert (a.streams["chosen"]["input_ids"] == b.streams["chosen"]["input_ids"]).all()
    assert all(
        (a.streams["chosen"]["input_ids"] == b.streams["chosen"]["input_ids"]).all()
        for (_, x), (_, y) in zip(full, again)
        for a, b in zip(x, y)
    )
    with pytest.raises(ValueError):
        _loader(exs, tiny_tokenizer).position_to_step(5)
    with pytest.raises(ValueError):
        _loader(exs, tiny_tokenizer, P=3)


def test_eval_loader_shards_everything(tiny_tokenizer):
    exs = _examples(7)
    enc = ChatEncoder(tiny_tokenizer, 64, 32)
    seen = 0
    for r in range(2):
        loader = EvalLoader(exs, Batcher(enc, "paired"), microbatch_size=2, num_processes=2, process_index=r)
        seen += sum(mb.size for mb in loader)
    assert seen == 7

"""Conversions between feedback kinds, checked against hand-computed results."""

from __future__ import annotations

import pytest

from halos_core.config import PairwiseToUnpaired, ScalarToBinary, ScalarToPairs
from halos_core.feedback import (
    BinaryRecord,
    PairwiseRecord,
    ScalarRecord,
    Turn,
    apply_conversion,
    pairwise_to_unpaired,
    scalar_to_binary,
    scalar_to_pairs,
)


def U(text):
    return [Turn(role="user", content=text)]


def A(text):
    return [Turn(role="assistant", content=text)]


def P(i, label, ra=None, rb=None, split="train"):
    return PairwiseRecord(
        prompt_id=f"p{i}",
        prompt=U(f"q{i}"),
        output_A=A(f"a{i}"),
        output_B=A(f"b{i}"),
        label=label,
        reward_A=ra,
        reward_B=rb,
        split=split,
    )


def S(pid, text, reward, split="train"):
    return ScalarRecord(prompt_id=pid, prompt=U(f"prompt {pid}"), output=A(text), reward=reward, split=split)


def texts(records):
    return [(r.output[0].content, r.label, r.reward) for r in records]


PAIRS = [P(0, 1, 0.9, 0.1), P(1, 0, 0.2, 0.8, split="test"), P(2, 1), P(3, 0)]


# --------------------------------------------------------------------------- pairwise -> unpaired


def test_pairwise_to_unpaired_gives_chosen_desirable_and_rejected_undesirable():
    out = pairwise_to_unpaired(PAIRS)
    assert texts(out) == [
        ("a0", 1, 0.9),
        ("b0", 0, 0.1),
        ("b1", 1, 0.8),
        ("a1", 0, 0.2),
        ("a2", 1, None),
        ("b2", 0, None),
        ("b3", 1, None),
        ("a3", 0, None),
    ]
    assert all(isinstance(r, BinaryRecord) for r in out)
    assert [r.prompt_id for r in out] == ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]
    assert [r.split for r in out] == ["train", "train", "test", "test"] + ["train"] * 4
    assert out[0].prompt == U("q0")
    # valid models
    assert [BinaryRecord.model_validate(r.model_dump()) for r in out] == out


def test_pairwise_to_unpaired_fractions_keep_ceil_frac_times_pairs():
    out = pairwise_to_unpaired(PAIRS, frac_unique_desirable=0.5, seed=3)
    labels = [r.label for r in out]
    assert labels.count(1) == 2 and labels.count(0) == 4
    out = pairwise_to_unpaired(PAIRS, frac_unique_desirable=0.26, frac_unique_undesirable=0.25)
    assert [r.label for r in out].count(1) == 2  # ceil(1.04)
    assert [r.label for r in out].count(0) == 1  # ceil(1.0)
    ten = [P(i, 1) for i in range(10)]
    out = pairwise_to_unpaired(ten, frac_unique_desirable=0.3, frac_unique_undesirable=0.7)
    assert [r.label for r in out].count(1) == 3  # not 4 (10 * 0.3 is 3.0000000000000004 in floats)
    assert [r.label for r in out].count(0) == 7


def test_pairwise_to_unpaired_is_deterministic_in_its_seed():
    ten = [P(i, 1) for i in range(10)]
    kept = lambda seed: tuple(r.prompt_id for r in pairwise_to_unpaired(ten, 0.5, 0.5, seed=seed))
    assert kept(0) == kept(0)
    assert len({kept(s) for s in range(10)}) > 1
    # output keeps input order, each pair's desirable example before its undesirable one
    out = pairwise_to_unpaired(ten, 0.5, 0.5, seed=1)
    order = [int(r.prompt_id[1:]) for r in out]
    assert order == sorted(order)


def test_pairwise_to_unpaired_rejects_bad_input():
    with pytest.raises(ValueError):
        pairwise_to_unpaired(PAIRS, frac_unique_desirable=0)
    with pytest.raises(ValueError):
        pairwise_to_unpaired(PAIRS, frac_unique_undesirable=1.5)
    with pytest.raises(TypeError):
        pairwise_to_unpaired([S("x", "y", 1.0)])
    assert pairwise_to_unpaired([]) == []


# --------------------------------------------------------------------------- scalar -> binary

FOUR = [S("a", "r1", 1.0), S("a", "r2", 2.0), S("b", "r3", 3.0), S("c", "r10", 10.0, split="test")]


@pytest.mark.parametrize(
    "method, threshold, labels",
    [
        ("mean", None, [0, 0, 0, 1]),  # mean 4
        ("median", None, [0, 0, 1, 1]),  # median 2.5
        ("threshold", 3.0, [0, 0, 0, 1]),  # equal to the cut is undesirable
        ("threshold", 0.5, [1, 1, 1, 1]),
        ("threshold", 10, [0, 0, 0, 0]),
    ],
)
def test_scalar_to_binary(method, threshold, labels):
    out = scalar_to_binary(FOUR, method, threshold)
    assert [r.label for r in out] == labels
    assert [r.reward for r in out] == [1.0, 2.0, 3.0, 10.0]
    assert [r.prompt_id for r in out] == ["a", "a", "b", "c"]
    assert out[3].split == "test"
    assert out[0].output == A("r1")


def test_scalar_to_binary_median_of_odd_count_and_errors():
    out = scalar_to_binary([S("a", "x", 1.0), S("a", "y", 2.0), S("a", "z", 3.0)], "median")
    assert [r.label for r in out] == [0, 0, 1]
    with pytest.raises(ValueError):
        scalar_to_binary(FOUR, "threshold")
    with pytest.raises(ValueError):
        scalar_to_binary(FOUR, "mode")
    assert scalar_to_binary([], "mean") == []


# --------------------------------------------------------------------------- scalar -> pairs

GROUPS = [
    S("p1", "a", 0.9),
    S("p1", "b", 0.5),
    S("p2", "only", 0.3),
    S("p1", "c", 0.85),
    S("p1", "d", 0.1),
    S("p3", "t1", 0.5),
    S("p3", "t2", 0.5),  # tie: no preference
    S("p4", "low", 0.2),
    S("p4", "top1", 0.7),
    S("p4", "top2", 0.7),  # tied best: the first wins
]


def pairs_of(out):
    return [(r.prompt_id, r.output_A[0].content, r.output_B[0].content, r.reward_A, r.reward_B) for r in out]


def test_scalar_to_pairs_max_is_best_against_worst():
    out = scalar_to_pairs(GROUPS, "max", 0.1)
    assert pairs_of(out) == [("p1", "a", "d", 0.9, 0.1), ("p4", "top1", "low", 0.7, 0.2)]
    assert all(r.label == 1 and r.chosen == r.output_A for r in out)
    assert out[0].prompt == U("prompt p1")


def test_scalar_to_pairs_min_is_best_against_the_closest_output_clearing_the_gap():
    # p1: gaps from a (0.9): b 0.4, c 0.05 (< min_gap 0.1), d 0.8 -> b
    assert pairs_of(scalar_to_pairs(GROUPS, "min", 0.1)) == [
        ("p1", "a", "b", 0.9, 0.5),
        ("p4", "top1", "low", 0.7, 0.2),
    ]
    # min_gap 0: c (gap 0.05) is the closest; ties (gap 0) are never pairs
    assert pairs_of(scalar_to_pairs(GROUPS, "min", 0.0)) == [
        ("p1", "a", "c", 0.9, 0.85),
        ("p4", "top1", "low", 0.7, 0.2),
    ]
    # a gap larger than every group's spread: no pairs
    assert scalar_to_pairs(GROUPS, "min", 0.81) == []
    assert pairs_of(scalar_to_pairs(GROUPS, "max", 0.8)) == [("p1", "a", "d", 0.9, 0.1)]  # gap 0.8 >= 0.8


def test_scalar_to_pairs_random_draws_among_admissible_partners():
    seen = set()
    for seed in range(20):
        out = scalar_to_pairs(GROUPS, "random", 0.1, seed=seed)
        assert out == scalar_to_pairs(GROUPS, "random", 0.1, seed=seed)  # deterministic
        assert [r.prompt_id for r in out] == ["p1", "p4"]
        assert out[0].output_A == A("a") and out[0].output_B[0].content in {"b", "d"}  # never c (gap 0.05)
        assert out[1].output_B == A("low")
        seen.add(out[0].output_B[0].content)
    assert seen == {"b", "d"}


def test_scalar_to_pairs_rejects_bad_arguments():
    with pytest.raises(ValueError):
        scalar_to_pairs(GROUPS, "best", 0.0)
    with pytest.raises(ValueError):
        scalar_to_pairs(GROUPS, "max", -1.0)
    with pytest.raises(TypeError):
        scalar_to_pairs(PAIRS, "max", 0.0)


# --------------------------------------------------------------------------- apply_conversion


def test_apply_conversion_dispatches_on_the_config_models():
    assert apply_conversion(PAIRS, None) == PAIRS
    assert apply_conversion(PAIRS, PairwiseToUnpaired()) == pairwise_to_unpaired(PAIRS)
    assert apply_conversion(PAIRS, PairwiseToUnpaired(frac_unique_desirable=0.5), seed=4) == pairwise_to_unpaired(
        PAIRS, 0.5, 1.0, seed=4
    )
    assert apply_conversion(FOUR, ScalarToBinary(method="mean")) == scalar_to_binary(FOUR, "mean")
    assert apply_conversion(FOUR, ScalarToBinary(method="threshold", threshold=1.5)) == scalar_to_binary(
        FOUR, "threshold", 1.5
    )
    assert apply_conversion(GROUPS, ScalarToPairs(method="random", min_gap=0.1), seed=2) == scalar_to_pairs(
        GROUPS, "random", 0.1, seed=2
    )
    assert apply_conversion(GROUPS, {"type": "scalar_to_pairs", "method": "min", "min_gap": 0.1}) == scalar_to_pairs(
        GROUPS, "min", 0.1
    )


def test_apply_conversion_leaves_other_kinds_alone():
    # a conversion for another kind is a no-op
    assert apply_conversion(PAIRS, ScalarToBinary()) == PAIRS
    assert apply_conversion(FOUR, PairwiseToUnpaired()) == FOUR
    # mixed input: the others first (in order), then the converted records
    out = apply_conversion([FOUR[0], PAIRS[0], FOUR[3]], ScalarToBinary(method="threshold", threshold=5))
    assert out[0] == PAIRS[0]
    assert [(r.output[0].content, r.label) for r in out[1:]] == [("r1", 0), ("r10", 1)]

"""Explicit feedback conversions (a round's `conversion` option), as pure deterministic functions.

Each works on the normal-form records of ONE file (prompt ids are scoped to their file, and
`mean`/`median` cuts are taken over the file's rewards) and returns new records in a stable order;
the same input and `seed` always give the same output.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import TypeAdapter

from ..config import Conversion, PairwiseToUnpaired, ScalarToBinary, ScalarToPairs
from .records import BinaryRecord, FeedbackRecord, PairwiseRecord, ScalarRecord


def _check(records: Iterable[Any], cls: type, name: str) -> list:
    items = list(records)
    for i, r in enumerate(items):
        if not isinstance(r, cls):
            raise TypeError(f"{name} takes {cls.__name__}s; item {i} is a {type(r).__name__}")
    return items


def _kept_count(n: int, frac: float) -> int:
    # ceil(frac * n) without float noise (10 * 0.3 must keep 3, not 4)
    return min(n, math.ceil(round(frac * n, 9)))


def pairwise_to_unpaired(
    records: Iterable[PairwiseRecord],
    frac_unique_desirable: float = 1.0,
    frac_unique_undesirable: float = 1.0,
    seed: int = 0,
) -> list[BinaryRecord]:
    """Pairs -> unpaired examples, as HALOs' `UnpairedPreferenceDataLoader` does for KTO.

    Each pair yields a desirable example (its chosen output, label 1, reward = the chosen output's
    reward) and an undesirable one (its rejected output, label 0). Outputs are not de-duplicated:
    an output that wins two pairs gives two desirable examples, one that wins one pair and loses
    another gives one of each (as in HALOs).

    `frac_unique_desirable` / `frac_unique_undesirable` (0 < frac <= 1) keep only
    ceil(frac x number of pairs) of the desirable / undesirable examples, to study an imbalanced
    dataset while starting from paired data (the KTO paper's setting). HALOs caps each side at
    `frac x N` examples, counting them in its loop (`seen < allowed`, i.e. ceil); N is the number
    of pairs in the KTO-era dataloader, and the number of unique generations per prompt in the
    current one (where any frac >= 0.5 keeps everything on disjoint pairs). We use the number of
    pairs, so frac means "share of the pairs' desirable (undesirable) examples kept". HALOs keeps
    the first ones in its iteration order while its config documents "a random share is thrown
    away"; here the kept ones are a uniform random subset drawn with `random.Random(seed)`
    (desirable subset first, then undesirable).
    Output order: pairs in input order, each giving its desirable example (if kept) and then its
    undesirable one (if kept).
    """
    for name, frac in (
        ("frac_unique_desirable", frac_unique_desirable),
        ("frac_unique_undesirable", frac_unique_undesirable),
    ):
        if not (0 < frac <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {frac}")
    # a pair with identical outputs carries no preference: it gives no examples (quality.py)
    pairs = [p for p in _check(records, PairwiseRecord, "pairwise_to_unpaired") if p.output_A != p.output_B]
    n = len(pairs)
    rng = random.Random(seed)
    k_des = _kept_count(n, frac_unique_desirable)
    k_und = _kept_count(n, frac_unique_undesirable)
    keep_des = set(range(n)) if k_des == n else set(rng.sample(range(n), k_des))
    keep_und = set(range(n)) if k_und == n else set(rng.sample(range(n), k_und))
    out: list[BinaryRecord] = []
    for i, p in enumerate(pairs):
        if i in keep_des:
            out.append(
                BinaryRecord.model_construct(
                    prompt_id=p.prompt_id,
                    prompt=p.prompt,
                    output=p.chosen,
                    label=1,
                    reward=p.chosen_reward,
                    split=p.split,
                )
            )
        if i in keep_und:
            out.append(
                BinaryRecord.model_construct(
                    prompt_id=p.prompt_id,
                    prompt=p.prompt,
                    output=p.rejected,
                    label=0,
                    reward=p.rejected_reward,
                    split=p.split,
                )
            )
    return out


def binary_cut(rewards: Sequence[float], method: str, threshold: float | None = None) -> float:
    """The cut `scalar_to_binary` uses: `threshold`, or the mean / median of `rewards`."""
    if method == "threshold":
        if threshold is None:
            raise ValueError("method 'threshold' needs a threshold value")
        return float(threshold)
    if not rewards:
        raise ValueError(f"no rewards to take the {method} of")
    if method == "mean":
        return math.fsum(rewards) / len(rewards)
    if method == "median":
        return float(statistics.median(rewards))
    raise ValueError(f"unknown method {method!r} (threshold, mean or median)")


def scalar_to_binary(
    records: Iterable[ScalarRecord], method: str, threshold: float | None = None
) -> list[BinaryRecord]:
    """Scalar rewards -> binary labels: label 1 (desirable) iff reward > cut, else 0.

    The cut is `threshold` (method "threshold"), or the arithmetic mean / the median (for an even
    count, the mean of the two middle values) of the rewards of all the given records
    ("mean" / "median"). Strictly greater: a reward equal to the cut is undesirable (so with
    "median" on an odd count the median record itself is undesirable; HALOs' label.py uses >=).
    One binary record per scalar record, same order; the reward is kept.
    """
    items = _check(records, ScalarRecord, "scalar_to_binary")
    if not items:
        if method == "threshold" and threshold is None:
            raise ValueError("method 'threshold' needs a threshold value")
        return []
    cut = binary_cut([r.reward for r in items], method, threshold)
    return [
        BinaryRecord.model_construct(
            prompt_id=r.prompt_id,
            prompt=r.prompt,
            output=r.output,
            label=1 if r.reward > cut else 0,
            reward=r.reward,
            split=r.split,
        )
        for r in items
    ]


def scalar_to_pairs(
    records: Iterable[ScalarRecord], method: str, min_gap: float, seed: int = 0
) -> list[PairwiseRecord]:
    """Scalar rewards -> at most one preference pair per prompt.

    Records are grouped by `prompt_id` (groups in order of first appearance). In each group the
    best output is the one with the highest reward (the first in file order on ties). Its
    candidate partners are the group's other outputs whose gap `best.reward - other.reward` is
    >= `min_gap` AND > 0 (equal rewards express no preference, so they are never paired, even
    with min_gap 0). Among the candidates:

    - "max": the largest gap, i.e. the lowest-reward output (best vs worst; HALOs' "max");
    - "min": the smallest gap, i.e. the highest-reward output that still clears `min_gap`
      (the hardest negative; HALOs' "min" also picks the smallest admissible gap);
    - "random": one candidate uniformly at random (`random.Random(seed)`, one draw per group with
      candidates, groups in order).

    Ties among candidates go to the first in file order. A group with one output or no candidate
    gives no pair. The pair is `output_A` = best, `output_B` = partner, `label` 1, the two rewards,
    the best record's prompt and split (all records of a prompt share both; validation checks it).
    """
    if method not in ("random", "max", "min"):
        raise ValueError(f"unknown method {method!r} (random, max or min)")
    if not (min_gap >= 0):
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    items = _check(records, ScalarRecord, "scalar_to_pairs")
    groups: dict[str, list[ScalarRecord]] = {}
    for r in items:
        groups.setdefault(r.prompt_id, []).append(r)
    rng = random.Random(seed)
    out: list[PairwiseRecord] = []
    for group in groups.values():
        if len(group) < 2:
            continue
        best_i = max(range(len(group)), key=lambda i: (group[i].reward, -i))
        best = group[best_i]
        candidates = [
            r
            for i, r in enumerate(group)
            if i != best_i and best.reward - r.reward >= min_gap and best.reward - r.reward > 0
        ]
        if not candidates:
            continue
        if method == "max":
            other = min(candidates, key=lambda r: r.reward)  # min() keeps the first on ties
        elif method == "min":
            other = _first_max(candidates)  # the first on ties
        else:
            other = candidates[rng.randrange(len(candidates))]
        out.append(
            PairwiseRecord.model_construct(
                prompt_id=best.prompt_id,
                prompt=best.prompt,
                output_A=best.output,
                output_B=other.output,
                label=1,
                reward_A=best.reward,
                reward_B=other.reward,
                split=best.split,
            )
        )
    return out


def _first_max(candidates: list[ScalarRecord]) -> ScalarRecord:
    top = candidates[0]
    for r in candidates[1:]:
        if r.reward > top.reward:
            top = r
    return top


_CONVERSION_ADAPTER: TypeAdapter = TypeAdapter(Conversion)


def apply_conversion(
    records: Iterable[FeedbackRecord], conversion: Conversion | dict | None, seed: int = 0
) -> list[FeedbackRecord]:
    """Apply a round's conversion (`halos_core.config.Conversion`, or its dict form) to the records it
    applies to (scalar records for scalar_to_*, pairwise records for pairwise_to_unpaired).

    Records of other kinds pass through unchanged and come first, in input order, followed by the
    converted records. `None` returns the records unchanged. Call it once per file.
    """
    items = list(records)
    if conversion is None:
        return items
    if isinstance(conversion, dict):
        conversion = _CONVERSION_ADAPTER.validate_python(conversion)
    if isinstance(conversion, PairwiseToUnpaired):
        source = [r for r in items if isinstance(r, PairwiseRecord)]
        rest = [r for r in items if not isinstance(r, PairwiseRecord)]
        converted: list = pairwise_to_unpaired(
            source, conversion.frac_unique_desirable, conversion.frac_unique_undesirable, seed=seed
        )
    elif isinstance(conversion, (ScalarToBinary, ScalarToPairs)):
        source = [r for r in items if isinstance(r, ScalarRecord)]
        rest = [r for r in items if not isinstance(r, ScalarRecord)]
        if isinstance(conversion, ScalarToBinary):
            converted = scalar_to_binary(source, conversion.method, conversion.threshold)
        else:
            converted = scalar_to_pairs(source, conversion.method, conversion.min_gap, seed=seed)
    else:
        raise TypeError(f"unknown conversion {conversion!r}")
    return rest + converted

"""Training examples built from normal-form feedback records (HALOs semantics).

One example is the unit the loaders shuffle, shard and count (`examples` in the metrics):

- `PairedExample`   (dpo, cdpo, ipo, simpo, slic, bradley_terry): one (prompt, chosen, rejected).
  Every pairwise record of a prompt is one pair ("all pairs per prompt", as HALOs), capped at
  `max_pairs_per_prompt` by a seeded sample.
- `UnpairedExample` (kto, csft): one (prompt, output, desirable). From binary records, or from
  pairwise records (chosen ⇒ desirable, rejected ⇒ undesirable, as HALOs' unpaired loader does
  when no explicit conversion ran).
- `SFTExample`      (sft): one (prompt, target) per prompt: the first desirable output, else the
  highest-reward one (binary); the highest-reward output (pairwise/scalar); each sample (sampled).
- `GroupedExample`  (grpo): one (prompt, output, score) with its group advantage computed over
  the whole group of outputs of the prompt (not just the microbatch).

Prompt ids are scoped to their FILE: the grouping key is `(file_id, prompt_id)`, so a round on
several files keeps every file's records even when ids repeat across files.

A pair whose two outputs are identical carries no preference (usually a labelling-tool bug; the
upload reports it as `identical_outputs`, `halos_core.feedback.quality`) and gives no example.

Records whose `split` is "test" form the eval set; when no record says so and
`eval_fraction > 0`, a deterministic share of prompts (by a hash of seed, file id and prompt id)
is held out instead. A prompt's examples are never split between train and eval.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Turns = tuple[tuple[str, str], ...]  # ((role, content), ...): hashable, cheap to cache on
Key = tuple[str, str]  # (file_id, prompt_id)


@dataclass(frozen=True)
class PairedExample:
    key: Key
    prompt: Turns
    chosen: Turns
    rejected: Turns


@dataclass(frozen=True)
class UnpairedExample:
    key: Key
    prompt: Turns
    output: Turns
    desirable: bool


@dataclass(frozen=True)
class SFTExample:
    key: Key
    prompt: Turns
    target: Turns


@dataclass(frozen=True)
class GroupedExample:
    key: Key
    prompt: Turns
    output: Turns
    score: float
    advantage: float
    group: int  # dense id of the key within the data set


Example = PairedExample | UnpairedExample | SFTExample | GroupedExample


@dataclass
class ExampleSets:
    train: list
    eval: list
    data_kind: str

    def __repr__(self) -> str:
        return f"ExampleSets({self.data_kind}: train={len(self.train)}, eval={len(self.eval)})"


class DataError(ValueError):
    """The feedback cannot produce the examples a loss needs (e.g. nothing to train on)."""


# --------------------------------------------------------------------------- record access


def turns(value: Any) -> Turns:
    """Normal-form turns (objects with .role/.content, or dicts, or a bare string) → Turns."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (("assistant", value),)
    out = []
    for turn in value:
        if isinstance(turn, dict):
            out.append((str(turn["role"]), str(turn["content"])))
        else:
            out.append((str(turn.role), str(turn.content)))
    return tuple(out)


def _record_kind(record: Any) -> str:
    if hasattr(record, "output_A"):
        return "pairwise"
    if hasattr(record, "label") and hasattr(record, "output"):
        return "binary"
    if hasattr(record, "sample_id"):
        return "sampled"
    if hasattr(record, "reward") and hasattr(record, "output"):
        return "scalar"
    raise DataError(f"unsupported feedback record {type(record).__name__}")


def _chosen_rejected(record: Any) -> tuple[Turns, Turns]:
    if hasattr(record, "chosen") and hasattr(record, "rejected"):
        return turns(record.chosen), turns(record.rejected)
    if int(record.label) == 1:
        return turns(record.output_A), turns(record.output_B)
    return turns(record.output_B), turns(record.output_A)


def _distinct(record: Any) -> bool:
    chosen, rejected = _chosen_rejected(record)
    return chosen != rejected


def _split(record: Any) -> str | None:
    split = getattr(record, "split", None)
    return None if split is None else str(split)


def _reward(value: Any) -> float | None:
    return None if value is None else float(value)


# --------------------------------------------------------------------------- eval split


def held_out(seed: int, key: Key, fraction: float) -> bool:
    """Deterministic per-prompt hold-out: hash(seed, file id, prompt id) < fraction."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\x00{key[0]}\x00{key[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# --------------------------------------------------------------------------- builders


def _group(files: Sequence[tuple[str, Iterable[Any]]]) -> tuple[dict[Key, list[Any]], dict[Key, bool]]:
    """Records grouped by (file_id, prompt_id), in first-seen order; and whether a key is 'test'."""
    groups: dict[Key, list[Any]] = {}
    is_test: dict[Key, bool] = defaultdict(bool)
    for file_id, records in files:
        for record in records:
            key = (str(file_id), str(record.prompt_id))
            groups.setdefault(key, []).append(record)
            if _split(record) == "test":
                is_test[key] = True
    return groups, is_test


def _paired(key: Key, records: list[Any], max_pairs: int | None, seed: int) -> list[PairedExample]:
    out = []
    for record in records:
        if _record_kind(record) != "pairwise":
            raise DataError(f"paired losses need pairwise feedback, got {_record_kind(record)} ({key[0]}:{key[1]})")
        chosen, rejected = _chosen_rejected(record)
        if chosen == rejected:
            continue
        out.append(PairedExample(key, turns(record.prompt), chosen, rejected))
    if max_pairs is not None and len(out) > max_pairs:
        rng = random.Random(f"{seed}\x00pairs\x00{key[0]}\x00{key[1]}")
        keep = sorted(rng.sample(range(len(out)), max_pairs))
        out = [out[i] for i in keep]
    return out


def _unpaired(key: Key, records: list[Any], max_pairs: int | None, seed: int) -> list[UnpairedExample]:
    out: list[UnpairedExample] = []
    pairwise = [r for r in records if _record_kind(r) == "pairwise" and _distinct(r)]
    if max_pairs is not None and len(pairwise) > max_pairs:
        rng = random.Random(f"{seed}\x00pairs\x00{key[0]}\x00{key[1]}")
        keep = set(rng.sample(range(len(pairwise)), max_pairs))
        pairwise_keep = {id(r) for i, r in enumerate(pairwise) if i in keep}
    else:
        pairwise_keep = {id(r) for r in pairwise}
    for record in records:
        kind = _record_kind(record)
        prompt = turns(record.prompt)
        if kind == "binary":
            label = int(record.label)
            if label not in (0, 1):
                raise DataError(f"label must be 0 or 1, got {record.label!r} ({key[0]}:{key[1]})")
            out.append(UnpairedExample(key, prompt, turns(record.output), label == 1))
        elif kind == "pairwise":
            if id(record) in pairwise_keep:  # (a pair with identical outputs is never kept)
                chosen, rejected = _chosen_rejected(record)
                out.append(UnpairedExample(key, prompt, chosen, True))
                out.append(UnpairedExample(key, prompt, rejected, False))
        else:
            raise DataError(
                f"unpaired losses need binary (or pairwise) feedback, got {kind} ({key[0]}:{key[1]});"
                " convert scalar feedback with {'type': 'scalar_to_binary'}"
            )
    return out


def _sft(key: Key, records: list[Any]) -> list[SFTExample]:
    kind = _record_kind(records[0])
    prompt = turns(records[0].prompt)
    if kind == "sampled":
        return [SFTExample(key, turns(r.prompt), turns(r.output)) for r in records]
    candidates: list[tuple[Turns, float | None, bool]] = []  # (output, reward, desirable)
    for record in records:
        k = _record_kind(record)
        if k == "binary":
            candidates.append((turns(record.output), _reward(getattr(record, "reward", None)), int(record.label) == 1))
        elif k == "pairwise":
            chosen, rejected = _chosen_rejected(record)
            a_first = int(record.label) == 1
            ra, rb = _reward(getattr(record, "reward_A", None)), _reward(getattr(record, "reward_B", None))
            candidates.append((chosen, ra if a_first else rb, True))
            candidates.append((rejected, rb if a_first else ra, False))
        elif k == "scalar":
            candidates.append((turns(record.output), _reward(record.reward), True))
        else:
            candidates.append((turns(record.output), None, True))
    if kind == "binary":
        desirable = [c for c in candidates if c[2]]
        if desirable:
            return [SFTExample(key, prompt, desirable[0][0])]
    rewarded = [c for c in candidates if c[1] is not None]
    if rewarded:
        best = max(range(len(rewarded)), key=lambda i: rewarded[i][1])  # first of the maxima
        return [SFTExample(key, prompt, rewarded[best][0])]
    preferred = [c for c in candidates if c[2]]
    return [SFTExample(key, prompt, (preferred or candidates)[0][0])]


def _grouped_raw(key: Key, records: list[Any]) -> list[tuple[Turns, Turns, float]]:
    out = []
    for record in records:
        kind = _record_kind(record)
        if kind == "scalar":
            out.append((turns(record.prompt), turns(record.output), float(record.reward)))
        elif kind == "binary":
            reward = _reward(getattr(record, "reward", None))
            out.append((turns(record.prompt), turns(record.output), float(record.label) if reward is None else reward))
        else:
            raise DataError(f"grouped losses need scalar or binary feedback, got {kind} ({key[0]}:{key[1]})")
    return out


def _advantages(scores: list[float], eps: float = 0.01) -> list[float]:
    """(s - mean) / (population std + eps) over the group (HALOs' GRPO advantage)."""
    n = len(scores)
    mean = sum(scores) / n
    std = (sum((s - mean) ** 2 for s in scores) / n) ** 0.5
    return [(s - mean) / (std + eps) for s in scores]


def build_examples(
    files: Sequence[tuple[str, Iterable[Any]]],
    data_kind: str,
    *,
    seed: int = 0,
    max_pairs_per_prompt: int | None = None,
    eval_fraction: float = 0.0,
) -> ExampleSets:
    """Examples for `data_kind` from `[(file_id, records), ...]` (records already converted)."""
    groups, is_test = _group(files)
    any_test = any(is_test.values())
    train: list = []
    evals: list = []
    group_ids: dict[Key, int] = {}
    for key, records in groups.items():
        to_eval = is_test[key] if any_test else held_out(seed, key, eval_fraction)
        if data_kind == "paired":
            made = _paired(key, records, max_pairs_per_prompt, seed)
        elif data_kind == "unpaired":
            made = _unpaired(key, records, max_pairs_per_prompt, seed)
        elif data_kind == "sft":
            made = _sft(key, records)
        elif data_kind == "grouped":
            raw = _grouped_raw(key, records)
            advs = _advantages([s for _, _, s in raw])
            gid = group_ids.setdefault(key, len(group_ids))
            made = [GroupedExample(key, p, o, s, a, gid) for (p, o, s), a in zip(raw, advs)]
        else:
            raise DataError(f"unknown data kind {data_kind!r}")
        (evals if to_eval else train).extend(made)
    return ExampleSets(train=train, eval=evals, data_kind=data_kind)

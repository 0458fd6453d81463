"""Synthetic feedback with a rule a tiny model can learn (torch-free).

Used by the demo, the end-to-end tests and the benchmarks, so that nothing is downloaded.
The rule: a reply that *repeats the prompt's topic word* and ends with "thanks" is preferred
over one that names some other word and ends abruptly. A model trained on the pairs should
assign a higher implicit reward to the preferred reply on held-out prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

TOPICS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "garden",
    "rocket",
    "candle",
    "forest",
    "mirror",
    "bridge",
    "pepper",
    "island",
    "violin",
    "desert",
    "marble",
    "harbor",
    "meadow",
    "copper",
    "falcon",
    "lantern",
    "orchid",
    "glacier",
    "saddle",
    "thunder",
    "velvet",
    "walnut",
    "anchor",
    "blossom",
]
PROMPT_TEMPLATES = ["Tell me about the {t}.", "What do you know about a {t}?", "Describe the {t} briefly."]


def _pair(rng: random.Random, topic: str) -> tuple[str, str, str]:
    prompt = rng.choice(PROMPT_TEMPLATES).format(t=topic)
    other = rng.choice([w for w in TOPICS if w != topic])
    good = f"The {topic} is a fine {topic}, thanks."
    bad = f"A {other} is here"
    return prompt, good, bad


def _turns(text: str, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def pairwise_records(n: int, seed: int = 0, test_fraction: float = 0.0, id_prefix: str = "p") -> list[dict]:
    """HALOs `pairwise_feedback` records; label 1 means output_A is preferred (A/B order is random)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt, good, bad = _pair(rng, topic)
        a_is_good = rng.random() < 0.5
        out_a, out_b = (good, bad) if a_is_good else (bad, good)
        records.append(
            {
                "type": "pairwise_feedback",
                "prompt_id": f"{id_prefix}{i}",
                "prompt": _turns(prompt, "user"),
                "output_A": _turns(out_a, "assistant"),
                "output_B": _turns(out_b, "assistant"),
                "label": 1 if a_is_good else 0,
                "reward_A": 1.0 if a_is_good else 0.0,
                "reward_B": 0.0 if a_is_good else 1.0,
                "split": "test" if rng.random() < test_fraction else "train",
            }
        )
    return records


def binary_records(n: int, seed: int = 0, test_fraction: float = 0.0, id_prefix: str = "b") -> list[dict]:
    """HALOs `binary_feedback` records: half desirable (label 1), half undesirable (label 0)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt, good, bad = _pair(rng, topic)
        desirable = i % 2 == 0
        records.append(
            {
                "type": "binary_feedback",
                "prompt_id": f"{id_prefix}{i}",
                "prompt": _turns(prompt, "user"),
                "output": _turns(good if desirable else bad, "assistant"),
                "label": 1 if desirable else 0,
                "reward": 1.0 if desirable else 0.0,
                "split": "test" if rng.random() < test_fraction else "train",
            }
        )
    return records


def scalar_records(n_prompts: int, outputs_per_prompt: int = 4, seed: int = 0, id_prefix: str = "s") -> list[dict]:
    """HALOs `scalar_feedback` records: several outputs per prompt, reward = how well it follows the rule."""
    rng = random.Random(seed)
    records = []
    for i in range(n_prompts):
        topic = rng.choice(TOPICS)
        prompt, good, bad = _pair(rng, topic)
        for _ in range(outputs_per_prompt):
            quality = rng.random()
            text = good if quality > 0.5 else bad
            records.append(
                {
                    "type": "scalar_feedback",
                    "prompt_id": f"{id_prefix}{i}",
                    "prompt": _turns(prompt, "user"),
                    "output": _turns(text, "assistant"),
                    "reward": round(quality, 4),
                }
            )
    return records


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return path


def to_jsonl_bytes(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()

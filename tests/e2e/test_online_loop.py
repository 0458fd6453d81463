"""The online loop end to end at the CI size: examples/online_loop.py --small --no-control against a
real `halos serve` (embedded defaults: SQLite, embedded broker, one worker), entirely over HTTP:
warm start (sft) → reward model (bradley_terry) → 3 iterations of sample-from-head → label with
the reward model → train (DPO, KTO, DPO, each with the held-out pairs as its eval set).

At this size the loop's plumbing is asserted (every iteration ran, scores and accuracies were
measured, the warm start scores chance on the held-out pairs, the rounds chained through the head).
Whether the figures rise is the full-size example's business (README, "The online loop": the
reward-model score does; the held-out accuracy is made by the first round)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "online_loop.py"


def test_online_loop_small() -> None:
    spec = importlib.util.spec_from_file_location("online_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        out = module.main(["--small", "--no-control"])
    finally:
        sys.modules.pop(spec.name, None)
    rows = out["loop"]
    assert [r["loss"] for r in rows] == ["-", "dpo", "kto", "dpo"]
    assert all(math.isfinite(r["fresh_score"]) for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # iteration 0 is the warm start = the run's reference: every held-out pair ties, counted 1/2
    assert rows[0]["accuracy"] == 0.5 and rows[0]["accuracy_strict"] == 0.0
    assert all(r["promoted"] is not None for r in rows[1:])
    assert out["heldout_pairs"] > 0  # the warm start's samples of the held-out prompts, labelled by the reward model
    assert isinstance(out["passed"], bool) and out["control"] is None

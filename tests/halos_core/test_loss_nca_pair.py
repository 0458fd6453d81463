"""NCA, pairwise (halos_core/losses/nca_pair.py): values computed by hand, the direction it pushes
each output, and the learning-signal check on the synthetic task."""

from __future__ import annotations

import math

import pytest
import torch

from halos_core.losses import build_loss
from tests.halos_core.conftest import assert_learns, chained_eval

D = torch.float64


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _inputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    # row 0: chosen log-ratio sum +1.0, rejected -1.0; row 1: chosen -3.0, rejected +0.5 (one masked token)
    t = lambda rows: torch.tensor(rows, dtype=D, requires_grad=requires_grad)
    return {
        "policy_chosen_logps": t([[-1.0, -2.0], [-4.0, -3.0]]),
        "reference_chosen_logps": t([[-1.5, -2.5], [-2.0, -2.0]]),
        "policy_rejected_logps": t([[-3.0, -1.0], [-1.0, 0.0]]),
        "reference_rejected_logps": t([[-2.0, -1.0], [-1.5, 0.0]]),
        "chosen_mask": torch.tensor([[1, 1], [1, 1]]),
        "rejected_mask": torch.tensor([[1, 1], [1, 0]]),
    }


def test_values_computed_by_hand():
    beta = 0.5
    out = build_loss({"name": "nca_pair", "beta": beta}).compute(**_inputs())
    chosen, rejected = [beta * 1.0, beta * -3.0], [beta * -1.0, beta * 0.5]
    expected = [-log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r) for c, r in zip(chosen, rejected)]
    assert out.values["losses"].tolist() == pytest.approx(expected, abs=1e-12)
    assert out.values["chosen_rewards"].tolist() == pytest.approx(chosen)
    assert out.values["rejected_rewards"].tolist() == pytest.approx(rejected)
    assert out.values["margins"].tolist() == pytest.approx([c - r for c, r in zip(chosen, rejected)])
    assert out.loss.item() == pytest.approx(sum(expected) / 2)
    # r_w = 0.5, r_l = -0.5: log(1 + e^-0.5) + 0.5 log(1 + e^0.5) + 0.5 log(1 + e^-0.5)
    assert expected[0] == pytest.approx(0.474077 + 0.5 * 0.974077 + 0.5 * 0.474077, abs=1e-5)


def test_each_reward_is_judged_on_its_own():
    """d/dr_w = 1.5 sigmoid(r_w) - 1: a chosen reward below log 2 is pushed up, one above it down (an
    anchor, not an unbounded push); the rejected reward is always pushed down."""
    inputs = _inputs(requires_grad=True)  # r_w = 0.5 and -1.5, both below log 2
    build_loss({"name": "nca_pair", "beta": 0.5}).compute(**inputs).loss.backward()
    g_chosen, g_rejected = inputs["policy_chosen_logps"].grad, inputs["policy_rejected_logps"].grad
    assert (g_chosen < 0).all()
    assert (g_rejected[inputs["rejected_mask"] == 1] > 0).all() and g_rejected[1, 1] == 0

    high = _inputs(requires_grad=True)  # beta 1: r_w = 1.0 > log 2
    build_loss({"name": "nca_pair", "beta": 1.0}).compute(**high).loss.backward()
    assert (high["policy_chosen_logps"].grad[0] > 0).all()


def test_learns_the_synthetic_rule_across_chained_rounds(tmp_path, tiny_model_dir, tiny_sha):
    assert_learns(chained_eval(tmp_path, tiny_model_dir, tiny_sha, {"name": "nca_pair", "beta": 0.1}, rounds=2))

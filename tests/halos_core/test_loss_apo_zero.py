"""APO-zero (halos_core/losses/apo_zero.py): values computed by hand, the direction it pushes each
output, humanline, and the learning-signal check on the synthetic task."""

from __future__ import annotations

import math

import pytest
import torch

from halos_core.config import Hyperparams
from halos_core.losses import build_loss
from tests.halos_core.conftest import assert_learns, chained_eval

D = torch.float64


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _inputs(requires_grad: bool = False) -> dict[str, torch.Tensor]:
    # row 0: chosen log-ratio sum +1.0, rejected -1.0; row 1: chosen -0.5 (one masked token), rejected +2.0
    t = lambda rows: torch.tensor(rows, dtype=D, requires_grad=requires_grad)
    return {
        "policy_chosen_logps": t([[-1.0, -2.0], [-0.5, 0.0]]),
        "reference_chosen_logps": t([[-1.5, -2.5], [0.0, 0.0]]),
        "policy_rejected_logps": t([[-3.0, -1.0], [-1.0, -1.0]]),
        "reference_rejected_logps": t([[-2.0, -1.0], [-2.0, -2.0]]),
        "chosen_mask": torch.tensor([[1, 1], [1, 0]]),
        "rejected_mask": torch.tensor([[1, 1], [1, 1]]),
    }


def test_values_computed_by_hand():
    beta = 0.1
    out = build_loss({"name": "apo_zero", "beta": beta}).compute(**_inputs())
    chosen, rejected = [beta * 1.0, beta * -0.5], [beta * -1.0, beta * 2.0]
    expected = [(1 - sigmoid(c)) + sigmoid(r) for c, r in zip(chosen, rejected)]
    assert out.values["losses"].tolist() == pytest.approx(expected, abs=1e-12)
    assert out.values["chosen_rewards"].tolist() == pytest.approx(chosen)
    assert out.values["rejected_rewards"].tolist() == pytest.approx(rejected)
    assert out.values["accuracies"].tolist() == [1.0, 0.0]
    assert out.loss.item() == pytest.approx(sum(expected) / 2)
    assert expected[0] == pytest.approx(0.950041625, abs=1e-9)  # 2 (1 - sigmoid(0.1))


def test_anchors_each_output_chosen_up_rejected_down():
    """Unlike DPO (only the gap matters), the gradient raises the chosen log-probs and lowers the
    rejected ones on their own, whatever the other output does."""
    inputs = _inputs(requires_grad=True)
    build_loss({"name": "apo_zero", "beta": 0.1}).compute(**inputs).loss.backward()
    g_chosen, g_rejected = inputs["policy_chosen_logps"].grad, inputs["policy_rejected_logps"].grad
    assert (g_chosen[inputs["chosen_mask"] == 1] < 0).all()  # descending the loss raises chosen log-probs
    assert (g_rejected > 0).all()
    assert g_chosen[1, 1] == 0  # a masked token gets no gradient


def test_humanline_clamps_each_token_ratio():
    hp = Hyperparams(humanline=True, log_epsilon_p=-0.2, log_epsilon_r=0.2)
    out = build_loss({"name": "apo_zero", "beta": 1.0}, hp).compute(**_inputs())
    assert out.values["chosen_rewards"].tolist() == pytest.approx([0.4, -0.2])  # 0.5+0.5 -> 0.2+0.2; -0.5 -> -0.2
    assert out.values["rejected_rewards"].tolist() == pytest.approx([-0.2, 0.4])


def test_learns_the_synthetic_rule_across_chained_rounds(tmp_path, tiny_model_dir, tiny_sha):
    assert_learns(chained_eval(tmp_path, tiny_model_dir, tiny_sha, {"name": "apo_zero", "beta": 0.1}, rounds=2))


def test_paired_losses_report_ties_for_a_policy_equal_to_its_reference():
    """HALOs' accuracy is strict: a policy equal to its reference (every reward exactly 0) scores
    0.0, so the share of exact ties is reported too (`rewards/ties`: chance = accuracy + ties/2)."""
    from halos_core.metrics import MetricAccumulator

    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    same = {
        "policy_chosen_logps": logps,
        "policy_rejected_logps": logps.flip(0),
        "reference_chosen_logps": logps,
        "reference_rejected_logps": logps.flip(0),
    }
    out = build_loss({"name": "dpo", "beta": 0.1}).compute(**same)
    assert out.values["accuracies"].tolist() == [0.0, 0.0] and out.values["ties"].tolist() == [1.0, 1.0]
    moved = build_loss({"name": "dpo", "beta": 0.1}).compute(**_inputs())
    assert moved.values["ties"].tolist() == [0.0, 0.0]
    acc = MetricAccumulator()
    acc.add_values(out.values, per_example=2)
    acc.add_values(moved.values, per_example=2)
    reduced = acc.reduce()
    assert reduced["rewards/ties"] == 0.5 and reduced["rewards/accuracy"] == 0.25

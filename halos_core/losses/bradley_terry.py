"""Bradley-Terry reward model (Bradley & Terry, 1952; as used for RLHF reward models by
Ouyang et al., 2022, https://arxiv.org/abs/2203.02155).

    P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))
    L = -log sigmoid(r_w - r_l)               (= BCE-with-logits with label 1, as HALOs)

compute(chosen_scores, rejected_scores)   [B] outputs of the scalar head (a [B, 1] head output is
flattened). out.loss = losses.mean(); values: losses, chosen_rewards, rejected_rewards (the
scores), margins, accuracy (1.0 where r_w > r_l).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from halos_core.loss_registry import BradleyTerryLoss

from .base import Forward, Loss, LossOutput, Microbatch, as_float, detached, safe_mean


class BradleyTerry(Loss[BradleyTerryLoss]):
    name = "bradley_terry"

    def inputs(self, forward: Forward, mb: Microbatch, train: bool) -> dict[str, Any]:
        scores = forward.policy_outputs(forward.joint_stream(mb), grad=train, mode="reward")
        return {"chosen_scores": scores[: mb.size], "rejected_scores": scores[mb.size :]}

    def compute(self, chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> LossOutput:
        chosen = as_float(chosen_scores).reshape(-1)
        rejected = as_float(rejected_scores).reshape(-1).to(chosen.dtype)
        if chosen.shape != rejected.shape:
            raise ValueError(f"chosen ({chosen.shape[0]}) and rejected ({rejected.shape[0]}) scores differ in length")
        margins = chosen - rejected
        losses = -F.logsigmoid(margins)
        values = {
            "losses": losses,
            "chosen_rewards": chosen,
            "rejected_rewards": rejected,
            "margins": margins,
            "accuracy": (margins > 0).to(chosen.dtype),
        }
        return LossOutput(loss=safe_mean(losses), values=detached(values))

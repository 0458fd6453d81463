"""DPO: Direct Preference Optimization (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290).

    r(x, y)  = beta * sum_t [log pi_theta(y_t|.) - log pi_ref(y_t|.)]     (humanline: each term clamped)
    L(x, y_w, y_l) = -log sigmoid(r(x, y_w) - r(x, y_l))

Rewards are reported already multiplied by beta (HALOs' convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from halos_core.loss_registry import DPOLoss

from .base import PairedLoss


def dpo_rewards(loss, pc, pr, rc, rr, mc, mr, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta-scaled sequence rewards of chosen and rejected (shared with cDPO)."""
    chosen = beta * loss.humanline.token_log_ratios(pc, rc, mc).sum(-1)
    rejected = beta * loss.humanline.token_log_ratios(pr, rr, mr).sum(-1)
    return chosen, rejected


class DPO(PairedLoss[DPOLoss]):
    name = "dpo"
    uses_humanline = True

    def paired_losses(self, pc, pr, rc, rr, mc, mr):
        chosen, rejected = dpo_rewards(self, pc, pr, rc, rr, mc, mr, self.config.beta)
        losses = -F.logsigmoid(chosen - rejected)
        return losses, chosen, rejected

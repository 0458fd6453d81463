"""IPO: Identity Preference Optimization (Azar et al., 2023, https://arxiv.org/abs/2310.12036).

    h(x, y) = sum_t [log pi_theta - log pi_ref] / #{t : log pi_theta - log pi_ref != 0}
              (length-normalised, HALOs' convention; humanline: each term clamped first)
    L = (h(x, y_w) - h(x, y_l) - 1 / (2 tau))^2

Rewards are the length-normalised log-ratios (not scaled).
"""

from __future__ import annotations

from halos_core.loss_registry import IPOLoss

from .base import PairedLoss, length_normalized


class IPO(PairedLoss[IPOLoss]):
    name = "ipo"
    uses_humanline = True

    def paired_losses(self, pc, pr, rc, rr, mc, mr):
        chosen = length_normalized(self.humanline.token_log_ratios(pc, rc, mc))
        rejected = length_normalized(self.humanline.token_log_ratios(pr, rr, mr))
        losses = (chosen - rejected - 1.0 / (2.0 * self.config.tau)).pow(2)
        return losses, chosen, rejected

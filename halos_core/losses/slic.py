"""SLiC-HF: Sequence Likelihood Calibration (Zhao et al., 2023, https://arxiv.org/abs/2305.10425).

    r(x, y) = sum_t log pi_theta(y_t|.)                                   (sequence log-prob)
    L = max(0, beta - r(x, y_w) + r(x, y_l)) + lambda * (-r(x, y_w))

The regulariser is the sequence NLL of the chosen output, as in the paper. (HALOs' code adds
the [B, T] token tensor -policy_chosen_logps here, which broadcasts into a [B, T] "loss"; the
golden fixture uses the sequence NLL, and so do we.) No reference model; humanline does not apply.
"""

from __future__ import annotations

from halos_core.loss_registry import SLiCLoss

from .base import PairedLoss


class SLiC(PairedLoss[SLiCLoss]):
    name = "slic"

    def paired_losses(self, pc, pr, rc, rr, mc, mr):
        chosen = (pc * mc).sum(-1)
        rejected = (pr * mr).sum(-1)
        calibration = (self.config.beta - chosen + rejected).clamp(min=0)
        losses = calibration + self.config.lambda_coef * (-chosen)
        return losses, chosen, rejected

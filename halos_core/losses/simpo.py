"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al., 2024,
https://arxiv.org/abs/2405.14734).

    r(x, y) = (1/|y|) sum_t log pi_theta(y_t|.)     (|y| = tokens with non-zero log-prob, HALOs' convention)
    L = -log sigmoid(beta * (r_w - r_l - gamma/beta))

`gamma_beta_ratio` is gamma/beta. The reference tensors are accepted and ignored; humanline does
not apply (there is no reference log-ratio to clamp). Rewards are the unscaled average log-probs.
"""

from __future__ import annotations

import torch.nn.functional as F

from halos_core.loss_registry import SimPOLoss

from .base import PairedLoss, length_normalized


class SimPO(PairedLoss[SimPOLoss]):
    name = "simpo"

    def paired_losses(self, pc, pr, rc, rr, mc, mr):
        chosen = length_normalized(pc * mc)
        rejected = length_normalized(pr * mr)
        losses = -F.logsigmoid(self.config.beta * (chosen - rejected - self.config.gamma_beta_ratio))
        return losses, chosen, rejected

"""Conservative DPO (label-smoothed DPO; Mitchell, 2023, https://ericmitchell.ai/cdpo.pdf).

With epsilon the probability that a preference label is flipped:

    r(x, y) = beta * sum_t [log pi_theta - log pi_ref]                    (humanline: each term clamped)
    L = (1 - epsilon) * -log sigmoid(r_w - r_l) + epsilon * -log sigmoid(r_l - r_w)
"""

from __future__ import annotations

import torch.nn.functional as F

from halos_core.loss_registry import CDPOLoss

from .base import PairedLoss
from .dpo import dpo_rewards


class CDPO(PairedLoss[CDPOLoss]):
    name = "cdpo"
    uses_humanline = True

    def paired_losses(self, pc, pr, rc, rr, mc, mr):
        chosen, rejected = dpo_rewards(self, pc, pr, rc, rr, mc, mr, self.config.beta)
        eps = self.config.epsilon
        losses = (1 - eps) * -F.logsigmoid(chosen - rejected) + eps * -F.logsigmoid(rejected - chosen)
        return losses, chosen, rejected

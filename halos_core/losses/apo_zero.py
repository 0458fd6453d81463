"""APO-zero: Anchored Preference Optimization with the "zero" anchor (D'Oosterlinck et al., 2024,
"Anchored Preference Optimization and Contrastive Revisions", https://arxiv.org/abs/2408.06266,
eq. 7; TRL's `loss_type="apo_zero"`).

    r(x, y) = beta * sum_t [log pi_theta(y_t|.) - log pi_ref(y_t|.)]     (humanline: each term clamped)
    L(x, y_w, y_l) = (1 - sigmoid(r(x, y_w))) + sigmoid(r(x, y_l))

DPO only widens the gap between the two outputs, and may push both down. APO-zero anchors each
output to the reference: the chosen output's likelihood goes up and the rejected one's goes down in
absolute terms — the variant for data whose chosen outputs are better than what the model
produces today (e.g. human-written corrections). Rewards are reported beta-scaled, as DPO's.
"""

from __future__ import annotations

import torch

from halos_core.loss_registry import APOZeroLoss

from .base import PairedLoss
from .dpo import dpo_rewards


class APOZero(PairedLoss[APOZeroLoss]):
    name = "apo_zero"
    uses_humanline = True

    def paired_losses(self, pc, pr, rc, rr, mc, mr):
        chosen, rejected = dpo_rewards(self, pc, pr, rc, rr, mc, mr, self.config.beta)
        losses = (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected)
        return losses, chosen, rejected

"""NCA: Noise Contrastive Alignment, pairwise form (Chen et al., 2024, "Noise Contrastive Alignment
of Language Models with Explicit Rewards", https://arxiv.org/abs/2402.05369; TRL's
`loss_type="nca_pair"`).

    r(x, y) = beta * sum_t [log pi_theta(y_t|.) - log pi_ref(y_t|.)]     (humanline: each term clamped)
    L(x, y_w, y_l) = -log sigmoid(r(x, y_w)) - 1/2 log sigmoid(-r(x, y_w)) - 1/2 log sigmoid(-r(x, y_l))

Each reward is judged on its own rather than only through the difference r_w - r_l as in DPO: the
rejected reward is always pushed down, the chosen one towards log 2 (d L / d r_w = 1.5 sigmoid(r_w) - 1),
so the chosen output's likelihood is not dragged down with the rejected one's.
Rewards are reported beta-scaled, as DPO's.
"""

from __future__ import annotations

import torch.nn.functional as F

from halos_core.loss_registry import NCAPairLoss

from .base import PairedLoss
from .dpo import dpo_rewards


class NCAPair(PairedLoss[NCAPairLoss]):
    name = "nca_pair"
    uses_humanline = True

    def paired_losses(self, pc, pr, rc, rr, mc, mr):
        chosen, rejected = dpo_rewards(self, pc, pr, rc, rr, mc, mr, self.config.beta)
        losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
        return losses, chosen, rejected

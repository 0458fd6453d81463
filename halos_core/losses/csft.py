"""CSFT: conditional SFT with control tokens (Korbak et al., 2023, "Pretraining Language Models with
Human Preferences", https://arxiv.org/abs/2302.08582; the HALOs `csft` loss).

The data layer prepends `control_tokens[0]` (chosen, e.g. "<|good|>") to desirable outputs and
`control_tokens[1]` (rejected, e.g. "<|bad|>") to undesirable ones; the loss is then plain SFT:

    L = -sum_{b,t} mask * log pi_theta(y_t|.) / sum_{b,t} mask        (microbatch token mean, as HALOs)

At inference, prompting with the chosen control token steers towards desirable outputs.
compute(policy_logps, mask=None); values as SFT.
"""

from __future__ import annotations

import torch

from halos_core.loss_registry import CSFTLoss

from .base import LossOutput, TargetLoss, detached
from .sft import token_mean_nll


class CSFT(TargetLoss[CSFTLoss]):
    name = "csft"

    @property
    def control_tokens(self) -> tuple[str, str]:
        """(chosen control token, rejected control token)."""
        return (self.config.chosen_control_token, self.config.rejected_control_token)

    def compute(self, policy_logps: torch.Tensor, mask: torch.Tensor | None = None) -> LossOutput:
        loss, values = token_mean_nll(policy_logps, mask)
        return LossOutput(loss=loss, values=detached(values))

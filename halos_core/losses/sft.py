"""SFT: maximum likelihood on the target tokens.

    L = -sum_{b,t} mask * log pi_theta(y_t|.) / sum_{b,t} mask

Normalisation: HALOs' SFTTrainer divides the summed token NLL of the microbatch by the number
of target tokens in that microbatch (a token mean over the microbatch, not a mean of per-example
means), and so do we. See e.g. Ouyang et al., 2022 (https://arxiv.org/abs/2203.02155) for SFT as the
first stage of alignment.

compute(policy_logps, mask=None)  ([B, T], 0.0 where mask is 0; mask defaults to logps != 0)
values: losses (per-example token-mean NLL), tokens (per-example token count), logps (per-example
summed log-prob).
"""

from __future__ import annotations

import torch

from halos_core.loss_registry import SFTLoss

from .base import LossOutput, TargetLoss, as_float, detached, mask_like


def token_mean_nll(
    policy_logps: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logps = as_float(policy_logps)
    m = mask_like(mask if mask is not None else logps != 0, logps)
    nll = -(logps * m)
    tokens = m.sum(-1)
    loss = nll.sum() / tokens.sum().clamp(min=1)
    values = {
        "losses": nll.sum(-1) / tokens.clamp(min=1),
        "tokens": tokens,
        "logps": (logps * m).sum(-1),
    }
    return loss, values


class SFT(TargetLoss[SFTLoss]):
    name = "sft"

    def compute(self, policy_logps: torch.Tensor, mask: torch.Tensor | None = None) -> LossOutput:
        loss, values = token_mean_nll(policy_logps, mask)
        return LossOutput(loss=loss, values=detached(values))

"""GRPO: Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath,
https://arxiv.org/abs/2402.03300), as in HALOs (offline: the outputs are given, not sampled here).

Advantages, per group of outputs sharing a prompt id (population std):

    A_i = (s_i - mean_g(s)) / (std_g(s) + 0.01)        (a group of one output gets A = 0)

Per token, with rho_t = exp(l_t), l_t = log pi_theta(y_t|.) - log pi_old(y_t|.)  (humanline: l_t clamped):

    KL_t   = exp(ref_t - pol_t) - (ref_t - pol_t) - 1                  (k3 estimator; humanline: clamped)
    loss_t = -min(A rho_t, A clip(rho_t, 1 - eps, 1 + eps)) + beta KL_t
    L      = sum_{b,t} mask * loss_t / sum_{b,t} mask                  (masked token mean of the microbatch)

compute(policy_logps, reference_logps, mask, prompt_ids, scores, old_policy_logps=None, advantages=None)

- `old_policy_logps`: the behaviour policy of the importance ratio. Default: `reference_logps`,
  which is what HALOs does (its ratio is pi_theta / pi_ref, the reference being synced to the
  policy in its online loop) and what the golden fixture encodes. Pass the sampling policy's
  log-probs to get the textbook PPO-style ratio; the KL term always uses the reference.
- `advantages`: optional precomputed [B] advantages (e.g. group statistics taken over the batch
  gathered from every process); otherwise computed from `prompt_ids` and `scores` of this call.

values: advantages [B]; loss, kl (masked token mean of KL_t), weighted_advantage (masked token
mean of |A rho_t|, the quantity the golden fixture records), clip_fraction — scalars.
"""

from __future__ import annotations

from typing import Any

import torch

from halos_core.loss_registry import GRPOLoss

from .base import Forward, Loss, LossOutput, Microbatch, as_float, detached, mask_like

ADVANTAGE_STD_EPS = 0.01


def group_advantages(prompt_ids: torch.Tensor, scores: torch.Tensor, eps: float = ADVANTAGE_STD_EPS) -> torch.Tensor:
    """(score - group mean) / (group population std + eps), groups given by equal prompt ids."""
    scores = as_float(torch.as_tensor(scores))
    prompt_ids = torch.as_tensor(prompt_ids, device=scores.device).reshape(-1)
    if prompt_ids.shape[0] != scores.shape[0]:
        raise ValueError(f"prompt_ids ({prompt_ids.shape[0]}) and scores ({scores.shape[0]}) differ in length")
    _, group = torch.unique(prompt_ids, return_inverse=True)
    n_groups = int(group.max().item()) + 1 if group.numel() else 0
    count = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, group, torch.ones_like(scores)
    )
    mean = torch.zeros_like(count).index_add_(0, group, scores) / count
    centered = scores - mean[group]
    var = torch.zeros_like(count).index_add_(0, group, centered**2) / count
    return centered / (var.sqrt()[group] + eps)


class GRPO(Loss[GRPOLoss]):
    name = "grpo"
    uses_humanline = True

    def inputs(self, forward: Forward, mb: Microbatch, train: bool) -> dict[str, Any]:
        target = mb.streams["target"]
        logps, mask = forward.policy_logps(target, grad=train)
        return {
            "policy_logps": logps,
            "reference_logps": forward.reference_logps(target),
            "mask": mask,
            "prompt_ids": mb.group,
            "scores": mb.scores,
            "advantages": mb.advantages,
        }

    def compute(
        self,
        policy_logps: torch.Tensor,
        reference_logps: torch.Tensor,
        mask: torch.Tensor | None = None,
        prompt_ids: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        old_policy_logps: torch.Tensor | None = None,
        advantages: torch.Tensor | None = None,
    ) -> LossOutput:
        pol = as_float(policy_logps)
        ref = as_float(reference_logps).to(pol.dtype)
        old = as_float(old_policy_logps).to(pol.dtype).detach() if old_policy_logps is not None else ref
        m = mask_like(mask if mask is not None else pol != 0, pol)

        if advantages is None:
            if prompt_ids is None or scores is None:
                raise ValueError("loss 'grpo' needs prompt_ids and scores (or precomputed advantages)")
            advantages = group_advantages(prompt_ids, scores)
        adv = as_float(torch.as_tensor(advantages)).to(device=pol.device, dtype=pol.dtype).reshape(-1)
        if adv.shape[0] != pol.shape[0]:
            raise ValueError(f"{adv.shape[0]} advantages for {pol.shape[0]} sequences")

        ratio = torch.exp(self.humanline.clamp(pol - old))
        log_ratio_ref = self.humanline.clamp(pol - ref)
        kl = torch.exp(-log_ratio_ref) + log_ratio_ref - 1

        eps = self.config.epsilon
        a = adv.unsqueeze(-1)
        weighted = a * ratio
        weighted_clipped = a * ratio.clamp(1 - eps, 1 + eps)
        token_losses = -(torch.min(weighted, weighted_clipped) - self.config.beta * kl)

        n_tokens = m.sum().clamp(min=1)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return (x * m).sum() / n_tokens

        loss = token_mean(token_losses)

        values = {
            "advantages": adv,
            "loss": loss,
            "kl": token_mean(kl),
            "weighted_advantage": token_mean(weighted.abs()),
            "clip_fraction": token_mean((weighted_clipped < weighted).to(pol.dtype)),
        }
        return LossOutput(loss=loss, values=detached(values))

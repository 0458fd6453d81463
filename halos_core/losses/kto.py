"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al., 2024, https://arxiv.org/abs/2402.01306).

    r(x, y) = sum_t [log pi_theta(y_t|.) - log pi_ref(y_t|.)]            (humanline: each term clamped)
    z0      = max(0, mean over non-empty rows of r(x, y'))   with (x, y') mismatched pairs, detached
    desirable y:   L = lambda_D * (1 - sigmoid(beta * (r(x, y) - z0)))
    undesirable y: L = lambda_U * (1 - sigmoid(beta * (z0 - r(x, y))))

compute(policy_chosen_logps, policy_rejected_logps, policy_kl_logps,
        reference_chosen_logps, reference_rejected_logps, reference_kl_logps,
        chosen_mask, rejected_mask, kl_mask)

"chosen" rows are the desirable examples of the microbatch, "rejected" the undesirable ones;
either may have 0 rows. The KL tensors may have any number of rows (the trainer may pass them
already gathered across processes, so every process uses the same z0). A KL row is "non-empty"
when its mask has at least one token. The KL estimate never carries gradient.

out.loss = mean over the concatenated (desirable, undesirable) losses (HALOs).
values: losses (desirable then undesirable, weighted), chosen_rewards, rejected_rewards
(unscaled log-ratio sums), kl (shape [1]).
"""

from __future__ import annotations

from typing import Any

import torch

from halos_core.loss_registry import KTOLoss

from .base import Forward, Loss, LossOutput, Microbatch, as_float, as_rows, detached, mask_like, safe_mean


class KTO(Loss[KTOLoss]):
    name = "kto"
    uses_humanline = True

    def inputs(self, forward: Forward, mb: Microbatch, train: bool) -> dict[str, Any]:
        target, kl_stream = mb.streams["target"], mb.streams["kl"]
        logps, mask = forward.policy_logps(target, grad=train)
        ref = forward.reference_logps(target)
        kl_logps, kl_mask = forward.policy_logps(kl_stream, grad=False)
        kl_ref = forward.reference_logps(kl_stream)
        if train:  # every process must use the same z0
            kl_logps, kl_ref, kl_mask_long = forward.gather_rows(kl_logps, kl_ref, kl_mask.long())
            kl_mask = kl_mask_long.bool()
        d = mb.desirable
        return {
            "policy_chosen_logps": logps[d],
            "policy_rejected_logps": logps[~d],
            "policy_kl_logps": kl_logps,
            "reference_chosen_logps": ref[d],
            "reference_rejected_logps": ref[~d],
            "reference_kl_logps": kl_ref,
            "chosen_mask": mask[d],
            "rejected_mask": mask[~d],
            "kl_mask": kl_mask,
        }

    def kl_estimate(
        self, policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor, kl_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z0: clamped (>= 0) mean log-ratio over the non-empty rows of the mismatched pairs (detached)."""
        p = as_float(policy_kl_logps).detach()
        r = as_float(reference_kl_logps).detach().to(p.dtype)
        m = mask_like(kl_mask if kl_mask is not None else p != 0, p)
        rewards = self.humanline.token_log_ratios(p, r, m).sum(-1)
        non_empty = (m.sum(-1) > 0).to(p.dtype)
        return ((rewards * non_empty).sum() / non_empty.sum().clamp(min=1)).clamp(min=0)

    def compute(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        policy_kl_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        reference_kl_logps: torch.Tensor,
        chosen_mask: torch.Tensor | None = None,
        rejected_mask: torch.Tensor | None = None,
        kl_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        kl = self.kl_estimate(policy_kl_logps, reference_kl_logps, kl_mask)
        beta = self.config.beta

        pc = as_rows(as_float(policy_chosen_logps))
        pr = as_rows(as_float(policy_rejected_logps))
        rc = as_rows(as_float(reference_chosen_logps)).to(pc.dtype)
        rr = as_rows(as_float(reference_rejected_logps)).to(pr.dtype)
        mc = mask_like(as_rows(chosen_mask) if chosen_mask is not None else pc != 0, pc)
        mr = mask_like(as_rows(rejected_mask) if rejected_mask is not None else pr != 0, pr)
        chosen_rewards = self.humanline.token_log_ratios(pc, rc, mc).sum(-1)
        rejected_rewards = self.humanline.token_log_ratios(pr, rr, mr).sum(-1)

        kl = kl.to(chosen_rewards.dtype)
        chosen_losses = self.config.desirable_weight * (1 - torch.sigmoid(beta * (chosen_rewards - kl)))
        rejected_losses = self.config.undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected_rewards)))
        losses = torch.cat((chosen_losses, rejected_losses), 0)

        values = {
            "losses": losses,
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "kl": kl.reshape(1),
        }
        return LossOutput(loss=safe_mean(losses), values=detached(values))

"""Offline PPO with a value head, as in HALOs' PPOTrainer (Schulman et al., 2017,
https://arxiv.org/abs/1707.06347; GAE: Schulman et al., 2016, https://arxiv.org/abs/1506.02438).

Offline, one step: the outputs and their per-sequence rewards (scores) are given; nothing is sampled.

1. Token rewards: each sequence's scalar reward sits on its last unmasked token, 0 elsewhere.
2. GAE over the detached values V (`old_values`, masked; V = 0 past the end of the sequence):
       delta_t = r_t + gamma V_{t+1} - V_t
       A_t     = delta_t + gamma lam A_{t+1}
       G_t     = r_t + gamma G_{t+1}          (discounted future reward: the critic's target, as HALOs)
   Advantages are whitened over the unmasked tokens of the microbatch:
       A <- (A - mean) / sqrt(var + 1e-8)     (population variance)
3. Losses (masked token means over the microbatch):
       rho_t       = exp(log pi_theta - log pi_old)                     (humanline: log-ratio clamped)
       policy_loss = mean_t max(-A rho_t, -A clip(rho_t, 1 - c, 1 + c))  (c = cliprange)
       critic_loss = 0.5 mean_t (V_theta,t - G_t)^2
       L           = policy_loss + critic_coef * critic_loss

HALOs does not clip the value loss (its critic target is G_t, not A + V_old) and its KL_coef
term is not in this project's PPOLoss config, so neither appears here. In HALOs log pi_old is the
reference model's log-probs (offline: the data is treated as sampled from the reference).

compute(policy_logps, old_policy_logps, values, rewards, mask=None, old_values=None)
  policy_logps      [B, T] current policy token log-probs (with grad)
  old_policy_logps  [B, T] behaviour-policy token log-probs (HALOs: the reference's), no grad
  values            [B, T] current value-head outputs aligned with the tokens (with grad)
  rewards           [B]    per-sequence scalar rewards (HALOs: +1 desirable / -1 undesirable, or RM scores)
  mask              [B, T] 1 on response tokens; default `policy_logps != 0`
  old_values        [B, T] value-head outputs when the batch was built; default values.detach()
values: loss, policy_loss, critic_loss, clip_fraction, kl (mean of log pi_old - log pi_theta) —
scalars; advantages (whitened), value_targets (G) — [B, T].
"""

from __future__ import annotations

from typing import Any

import torch

from halos_core.loss_registry import PPOLoss

from .base import Forward, Loss, LossOutput, Microbatch, as_float, detached, mask_like


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def sequence_rewards_to_tokens(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] rewards -> [B, T], each on the last unmasked token of its row (rows with no token get none)."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(-1).values
    token_rewards = torch.zeros_like(mask)
    has_tokens = last >= 0
    rows = torch.nonzero(has_tokens).reshape(-1)
    token_rewards[rows, last[rows]] = rewards[rows].to(mask.dtype)
    return token_rewards


def gae(
    values: torch.Tensor, token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unwhitened) GAE advantages and discounted future rewards, both masked, [B, T]."""
    values = values * mask
    token_rewards = token_rewards * mask
    T = values.shape[-1]
    advantages = torch.zeros_like(values)
    future = torch.zeros_like(values)
    running_adv = torch.zeros_like(values[:, 0])
    running_ret = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running_adv = delta + gamma * lam * running_adv
        running_ret = token_rewards[:, t] + gamma * running_ret
        advantages[:, t] = running_adv
        future[:, t] = running_ret
    return advantages * mask, future * mask


class PPO(Loss[PPOLoss]):
    name = "ppo"
    uses_humanline = True

    def inputs(self, forward: Forward, mb: Microbatch, train: bool) -> dict[str, Any]:
        target = mb.streams["target"]
        logps, mask, values = forward.policy_outputs(target, grad=train, mode="values")
        # HALOs: +1 for a desirable output, -1 for an undesirable one, on its last token; the
        # reference's log-probs are the behaviour policy's (offline, one step)
        rewards = torch.where(mb.desirable, 1.0, -1.0).to(device=logps.device, dtype=torch.float32)
        return {
            "policy_logps": logps,
            "old_policy_logps": forward.reference_logps(target),
            "values": values,
            "rewards": rewards,
            "mask": mask,
        }

    def compute(
        self,
        policy_logps: torch.Tensor,
        old_policy_logps: torch.Tensor,
        values: torch.Tensor,
        rewards: torch.Tensor,
        mask: torch.Tensor | None = None,
        old_values: torch.Tensor | None = None,
    ) -> LossOutput:
        pol = as_float(policy_logps)
        old = as_float(old_policy_logps).to(pol.dtype).detach()
        v = as_float(values).to(pol.dtype)
        v_old = (as_float(old_values).to(pol.dtype) if old_values is not None else v).detach()
        m = mask_like(mask if mask is not None else pol != 0, pol)
        r = as_float(torch.as_tensor(rewards)).to(device=pol.device, dtype=pol.dtype).reshape(-1)
        if r.shape[0] != pol.shape[0]:
            raise ValueError(f"{r.shape[0]} rewards for {pol.shape[0]} sequences")

        with torch.no_grad():
            token_rewards = sequence_rewards_to_tokens(r, m)
            raw_adv, targets = gae(v_old, token_rewards, m, self.config.gamma, self.config.lam)
            adv = (raw_adv - masked_mean(raw_adv, m)) * torch.rsqrt(masked_var(raw_adv, m) + 1e-8) * m

        critic_loss = 0.5 * masked_mean((v - targets) ** 2, m)

        ratio = torch.exp(self.humanline.clamp(pol - old))
        c = self.config.cliprange
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1 - c, 1 + c)
        policy_loss = masked_mean(torch.max(unclipped, clipped), m)

        loss = policy_loss + self.config.critic_coef * critic_loss
        out = {
            "loss": loss,
            "policy_loss": policy_loss,
            "critic_loss": critic_loss,
            "clip_fraction": masked_mean((clipped > unclipped).to(pol.dtype), m),
            "kl": masked_mean(old - pol, m),
            "advantages": adv,
            "value_targets": targets,
        }
        return LossOutput(loss=loss, values=detached(out))

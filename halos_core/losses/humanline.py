"""Humanline clamping of per-token log-ratios.

"Humanline" alignment (Ethayarajh et al., HALOs; https://github.com/ContextualAI/HALOs)
limits how far any single token may move the sequence reward: every per-token log-ratio
log pi_theta(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t) is clamped to
[log_epsilon_p, log_epsilon_r] (defaults [-1.0, 1.5]) before it is summed into a sequence
reward (DPO, cDPO, IPO, KTO) or exponentiated into a probability ratio (GRPO, PPO). Tokens
outside the band contribute the bound and no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from halos_core.config import Hyperparams


@dataclass(frozen=True)
class Humanline:
    enabled: bool = False
    low: float = -1.0  # log_epsilon_p
    high: float = 1.5  # log_epsilon_r

    @classmethod
    def from_hyperparams(cls, hp: Hyperparams) -> Humanline:
        if hp.humanline and hp.log_epsilon_p > hp.log_epsilon_r:
            raise ValueError(
                f"humanline needs log_epsilon_p <= log_epsilon_r, got [{hp.log_epsilon_p}, {hp.log_epsilon_r}]"
            )
        return cls(enabled=hp.humanline, low=hp.log_epsilon_p, high=hp.log_epsilon_r)

    @classmethod
    def off(cls) -> Humanline:
        return cls(enabled=False)

    def clamp(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """Clamp per-token log-ratios when enabled (identity otherwise)."""
        if not self.enabled:
            return log_ratio
        return log_ratio.clamp(min=self.low, max=self.high)

    def token_log_ratios(
        self, policy_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-token (policy - reference), clamped if enabled, exactly 0 where mask is 0."""
        return self.clamp(policy_logps - reference_logps) * mask

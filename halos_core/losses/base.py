"""Shared pieces of the loss units: the output record, the base class and tensor helpers.

A loss is a small object built from its config (`halos_core.config.*Loss`) and the run's
`Hyperparams` (only the humanline fields are read). `compute(**tensors)` takes keyword tensors
and returns a `LossOutput`: the scalar to backprop and a dict of detached diagnostic values.
No model, optimizer or process-group logic lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from halos_core.config import Hyperparams

from .humanline import Humanline


@dataclass
class LossOutput:
    """What `Loss.compute` returns.

    loss:   scalar tensor to backprop (attached to the graph of the policy inputs).
    values: named diagnostics, all detached (per-example vectors or scalars).
    """

    loss: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss:
    """Base class of every registered loss.

    Subclasses set the class attributes and implement `compute`. They keep the config as
    `self.config` and the humanline clamp as `self.humanline` (a no-op unless
    `hyperparams.humanline` is true).
    """

    name: ClassVar[str]
    data_kind: ClassVar[str]  # "paired" | "unpaired" | "grouped" | "sft" (= config.LOSS_DATA_KIND)
    needs_reference: ClassVar[bool]
    config_class: ClassVar[type]
    uses_humanline: ClassVar[bool] = False  # whether Hyperparams.humanline changes this loss

    def __init__(self, config: Any = None, hyperparams: Hyperparams | None = None):
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.hyperparams = hyperparams if hyperparams is not None else Hyperparams()
        self.humanline = Humanline.from_hyperparams(self.hyperparams) if self.uses_humanline else Humanline.off()

    def compute(self, **tensors: torch.Tensor) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, **tensors: torch.Tensor) -> LossOutput:
        return self.compute(**tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, humanline={self.humanline.enabled})"


# --------------------------------------------------------------------------- helpers


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32 (sums over tokens in bf16 lose too much)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if not x.is_floating_point():
        return x.to(torch.get_default_dtype())
    return x


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View an empty 1-D tensor (a microbatch with no rows of this kind) as [0, 0]."""
    if x.ndim == 1 and x.numel() == 0:
        return x.reshape(0, 0)
    return x


def mask_like(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask in the dtype and device of `like`."""
    return mask.to(dtype=like.dtype, device=like.device)


def length_normalized(token_values: torch.Tensor) -> torch.Tensor:
    """Sum over tokens divided by the number of non-zero tokens (HALOs' convention), at least 1."""
    count = (token_values != 0).sum(-1).clamp(min=1).to(token_values.dtype)
    return token_values.sum(-1) / count


def safe_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that stays on the graph (and is 0, not NaN) when `x` is empty."""
    return x.mean() if x.numel() else x.sum()


def detached(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in values.items()}


def require(name: str, value: torch.Tensor | None, loss: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"loss '{loss}' needs the tensor '{name}'")
    return value


class PairedLoss(Loss):
    """Base of the paired-preference losses (dpo, cdpo, ipo, simpo, slic).

    compute(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
            reference_rejected_logps, chosen_mask, rejected_mask)
    All [B, T] token-level log-probs, 0.0 where the mask is 0 (chosen and rejected may have
    different T). Masks default to `logps != 0`. Reference tensors may be None for losses
    that do not use them. out.loss = losses.mean(); values: losses, chosen_rewards,
    rejected_rewards, margins, accuracies (per example, detached).
    """

    data_kind = "paired"

    def compute(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor | None = None,
        reference_rejected_logps: torch.Tensor | None = None,
        chosen_mask: torch.Tensor | None = None,
        rejected_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        pc, pr = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
        if pc.shape[0] != pr.shape[0]:
            raise ValueError(f"chosen and rejected batches differ: {pc.shape[0]} vs {pr.shape[0]}")
        mc = mask_like(chosen_mask if chosen_mask is not None else pc != 0, pc)
        mr = mask_like(rejected_mask if rejected_mask is not None else pr != 0, pr)
        rc = as_float(reference_chosen_logps).to(pc.dtype) if reference_chosen_logps is not None else None
        rr = as_float(reference_rejected_logps).to(pr.dtype) if reference_rejected_logps is not None else None
        if self.needs_reference and (rc is None or rr is None):
            raise ValueError(f"loss '{self.name}' needs reference_chosen_logps and reference_rejected_logps")
        losses, chosen_rewards, rejected_rewards = self.paired_losses(pc, pr, rc, rr, mc, mr)
        values = {
            "losses": losses,
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "margins": chosen_rewards - rejected_rewards,
            "accuracies": (chosen_rewards > rejected_rewards).to(losses.dtype),
        }
        return LossOutput(loss=safe_mean(losses), values=detached(values))

    def paired_losses(
        self,
        pc: torch.Tensor,
        pr: torch.Tensor,
        rc: torch.Tensor | None,
        rr: torch.Tensor | None,
        mc: torch.Tensor,
        mr: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """Return per-example (losses, chosen_rewards, rejected_rewards)."""
        raise NotImplementedError

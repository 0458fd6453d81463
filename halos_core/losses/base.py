"""Shared pieces of the loss units: the output record, the base class and tensor helpers.

A loss is a small object built from its parameters (a `halos_core.loss_registry` model) and the
run's `Hyperparams` (only the humanline fields are read). Its declaration in the registry (data
kind, reference, head, batch constraints) is `self.spec`. Two methods:

- `inputs(forward, mb, train)`: the keyword tensors `compute` needs for one microbatch, obtained
  through the trainer's `Forward` (policy / reference log-probs, head outputs). This is where a
  loss says what it consumes, so the trainer has no per-loss branch.
- `compute(**tensors)`: the scalar to backprop and a dict of detached diagnostic values.

No model, optimizer or process-group logic lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from halos_core.config import Hyperparams
from halos_core.data.collate import Microbatch
from halos_core.loss_registry import LossParams, LossSpec, loss_spec

from .humanline import Humanline

C = TypeVar("C", bound=LossParams)
Stream = dict[str, torch.Tensor]


@dataclass
class LossOutput:
    """What `Loss.compute` returns.

    loss:   scalar tensor to backprop (attached to the graph of the policy inputs).
    values: named diagnostics, all detached (per-example vectors or scalars).
    """

    loss: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)


class Forward(Protocol):
    """What the trainer offers a loss to build its inputs (halos_core.training.forward)."""

    def policy_logps(self, stream: Stream, grad: bool, paired: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] token log-probs of the policy and their mask. `paired`: `stream` is a joint stream
        (`joint_stream`), whose pairs may share their prompt's computation."""

    def policy_outputs(self, stream: Stream, grad: bool, mode: str) -> Any:
        """The policy wrapper's other modes: "reward" -> [B] scores, "values" -> (logps, mask, values)."""

    def reference_logps(self, stream: Stream, paired: bool = False) -> torch.Tensor:
        """[B, T] token log-probs of the frozen reference (cached across rounds); `paired` as above."""

    def joint_stream(self, mb: Microbatch) -> Stream:
        """A paired microbatch's chosen rows then rejected rows as one padded batch."""

    def gather_rows(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Every process's rows (so statistics such as KTO's KL estimate agree across processes)."""


class Loss(Generic[C]):
    """Base class of every registered loss.

    Subclasses set `name` (their registry entry) and implement `inputs` and `compute`. They keep
    their parameters as `self.config` and the humanline clamp as `self.humanline` (a no-op unless
    `hyperparams.humanline` is true).
    """

    name: ClassVar[str]
    spec: ClassVar[LossSpec]
    uses_humanline: ClassVar[bool] = False  # whether Hyperparams.humanline changes this loss
    control_tokens: tuple[str, str] | None = None  # prefixed to desirable/undesirable outputs by the batcher

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.spec = loss_spec(cls.name)

    @property
    def data_kind(self) -> str:
        return self.spec.data

    @property
    def needs_reference(self) -> bool:
        return self.spec.needs_reference

    def __init__(self, config: C | None = None, hyperparams: Hyperparams | None = None):
        config_class = self.spec.config
        if config is None:
            config = config_class()  # type: ignore[assignment]  # every parameter has a default
        if not isinstance(config, config_class):
            raise TypeError(f"{type(self).__name__} needs a {config_class.__name__}, got {type(config).__name__}")
        self.config: C = config
        self.hyperparams = hyperparams if hyperparams is not None else Hyperparams()
        self.humanline = Humanline.from_hyperparams(self.hyperparams) if self.uses_humanline else Humanline.off()

    def inputs(self, forward: Forward, mb: Microbatch, train: bool) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self, **tensors: Any) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, **tensors: Any) -> LossOutput:
        return self.compute(**tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, humanline={self.humanline.enabled})"


class TargetLoss(Loss[C]):
    """Losses on one target stream's token log-probs (sft, csft): compute(policy_logps, mask)."""

    def inputs(self, forward: Forward, mb: Microbatch, train: bool) -> dict[str, Any]:
        logps, mask = forward.policy_logps(mb.streams["target"], grad=train)
        return {"policy_logps": logps, "mask": mask}


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


class PairedLoss(Loss[C]):
    """Base of the paired-preference losses (dpo, cdpo, ipo, simpo, slic).

    compute(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
            reference_rejected_logps, chosen_mask, rejected_mask)
    All [B, T] token-level log-probs, 0.0 where the mask is 0 (chosen and rejected may have
    different T). Masks default to `logps != 0`. Reference tensors may be None for losses
    that do not use them. out.loss = losses.mean(); values: losses, chosen_rewards,
    rejected_rewards, margins, accuracies, ties (per example, detached).
    """

    def inputs(self, forward: Forward, mb: Microbatch, train: bool) -> dict[str, Any]:
        both = forward.joint_stream(mb)
        logps, mask = forward.policy_logps(both, grad=train, paired=True)
        ref = forward.reference_logps(both, paired=True) if self.needs_reference else None
        n = mb.size
        return {
            "policy_chosen_logps": logps[:n],
            "policy_rejected_logps": logps[n:],
            "reference_chosen_logps": None if ref is None else ref[:n],
            "reference_rejected_logps": None if ref is None else ref[n:],
            "chosen_mask": mask[:n],
            "rejected_mask": mask[n:],
        }

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
            # HALOs' accuracy is strict, so a policy equal to its reference (every reward exactly 0)
            # scores 0.0; the share of exact ties lets a reader count them as 1/2 (chance = 0.5)
            "ties": (chosen_rewards == rejected_rewards).to(losses.dtype),
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

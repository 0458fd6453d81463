"""The loss registry (torch-free): one declaration per loss, read by every layer.

A `LossSpec` says everything the server, the worker and the trainer need to know about a loss:
its parameters (a pydantic model whose `name` literal is the loss's name), the data it trains on,
the head it trains (if any), whether it needs the frozen reference, its batch constraints, and
where its implementation lives (`module:Class` under `halos_core.losses`, imported by the trainer
only — that package needs torch). From the declarations below come:

- `LossConfig`, the discriminated union the API validates round requests with (its OpenAPI schema
  lists every loss with its parameters);
- `loss_feedback_problem` / `hyperparams_problem`, the submit-time checks of the API and the
  claim-time re-check of the worker;
- the trainer's dispatch: `halos_core.losses.build_loss` imports `implementation`, and each loss
  class turns a microbatch into its own inputs (`Loss.inputs`), so the trainer has no per-loss branch.

Adding a loss = a config model and a `LossSpec` here, its module in `halos_core/losses/`, a test.
Parameter names follow the reference implementation (ContextualAI/HALOs config/loss/*.yaml) where
it has the loss, else TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

DataKind = Literal["paired", "unpaired", "grouped", "sft"]
HeadKind = Literal["reward", "value"]

# Feedback kinds (after a round's explicit conversion) each data kind can be built from.
DATA_KIND_ACCEPTS: dict[str, frozenset[str]] = {
    "paired": frozenset({"pairwise"}),
    "unpaired": frozenset({"binary", "unpaired"}),
    "grouped": frozenset({"scalar", "binary"}),
    "sft": frozenset({"binary", "pairwise", "scalar", "sampled"}),
}


class LossParams(BaseModel):
    """Base of every loss's parameter model: unknown parameters are refused."""

    model_config = ConfigDict(extra="forbid")
    name: str


# --------------------------------------------------------------------------- parameter models


class SFTLoss(LossParams):
    """Supervised fine-tuning on the target outputs."""

    name: Literal["sft"] = "sft"


class CSFTLoss(LossParams):
    """SFT with a control token prepended to desirable / undesirable outputs (https://arxiv.org/abs/2302.08582)."""

    name: Literal["csft"] = "csft"
    chosen_control_token: str = "<|good|>"
    rejected_control_token: str = "<|bad|>"


class DPOLoss(LossParams):
    """Direct Preference Optimization (https://arxiv.org/abs/2305.18290)."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)


class CDPOLoss(LossParams):
    """Conservative DPO: DPO with label smoothing (https://ericmitchell.ai/cdpo.pdf)."""

    name: Literal["cdpo"] = "cdpo"
    beta: float = Field(0.1, gt=0)
    epsilon: float = Field(0.2, ge=0, lt=0.5)  # label-smoothing probability that a label is flipped


class IPOLoss(LossParams):
    """Identity Preference Optimization (https://arxiv.org/abs/2310.12036)."""

    name: Literal["ipo"] = "ipo"
    tau: float = Field(0.1, gt=0)


class SimPOLoss(LossParams):
    """Simple Preference Optimization, reference-free (https://arxiv.org/abs/2405.14734)."""

    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0)
    gamma_beta_ratio: float = Field(0.5, ge=0)


class SLiCLoss(LossParams):
    """Sequence Likelihood Calibration (https://arxiv.org/abs/2305.10425)."""

    name: Literal["slic"] = "slic"
    beta: float = Field(1.0, gt=0)
    lambda_coef: float = Field(0.1, ge=0)


class KTOLoss(LossParams):
    """Kahneman-Tversky Optimization on desirable/undesirable outputs (https://arxiv.org/abs/2402.01306)."""

    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class GRPOLoss(LossParams):
    """Group Relative Policy Optimization on scored groups of outputs (https://arxiv.org/abs/2402.03300)."""

    name: Literal["grpo"] = "grpo"
    beta: float = Field(0.01, ge=0)
    epsilon: float = Field(0.2, gt=0)  # ratio clip


class BradleyTerryLoss(LossParams):
    """Reward-model training: a scalar head on the policy, -log sigmoid(r_chosen - r_rejected)."""

    name: Literal["bradley_terry"] = "bradley_terry"


class PPOLoss(LossParams):
    """HALOs' offline PPO: value head, rewards from the feedback, GAE (https://arxiv.org/abs/1707.06347)."""

    name: Literal["ppo"] = "ppo"
    cliprange: float = Field(0.5, gt=0)
    critic_coef: float = Field(0.01, ge=0)
    lam: float = Field(0.95, ge=0, le=1)
    gamma: float = Field(0.99, ge=0, le=1)


class APOZeroLoss(LossParams):
    """Anchored Preference Optimization, zero anchor: chosen up, rejected down (https://arxiv.org/abs/2408.06266)."""

    name: Literal["apo_zero"] = "apo_zero"
    beta: float = Field(0.1, gt=0)


class NCAPairLoss(LossParams):
    """Noise Contrastive Alignment, pairwise: each reward judged on its own (https://arxiv.org/abs/2402.05369)."""

    name: Literal["nca_pair"] = "nca_pair"
    beta: float = Field(0.1, gt=0)


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class LossSpec:
    """One loss, as every layer sees it."""

    config: type[LossParams]  # its parameters; `config.name`'s literal is the loss's name
    data: DataKind  # the batches it trains on (halos_core.data.loaders.Batcher)
    implementation: str  # "module:Class" under halos_core.losses (imported by the trainer only)
    needs_reference: bool  # loads the frozen reference (or, with LoRA, disables the adapters)
    head: HeadKind | None = None  # trains a head on the policy (halos_core.heads)
    min_microbatch: int = 1  # smallest microbatch_size it can train with
    min_microbatch_reason: str = ""
    kl_pairs: bool = False  # the batcher also builds mismatched (prompt, other output) streams

    @property
    def name(self) -> str:
        return str(self.config.model_fields["name"].default)

    @property
    def summary(self) -> str:
        return (self.config.__doc__ or "").strip().splitlines()[0] if self.config.__doc__ else ""


_DECLARED: tuple[LossSpec, ...] = (
    LossSpec(SFTLoss, "sft", "sft:SFT", needs_reference=False),
    LossSpec(CSFTLoss, "unpaired", "csft:CSFT", needs_reference=False),
    LossSpec(DPOLoss, "paired", "dpo:DPO", needs_reference=True),
    LossSpec(CDPOLoss, "paired", "cdpo:CDPO", needs_reference=True),
    LossSpec(IPOLoss, "paired", "ipo:IPO", needs_reference=True),
    LossSpec(SimPOLoss, "paired", "simpo:SimPO", needs_reference=False),
    LossSpec(SLiCLoss, "paired", "slic:SLiC", needs_reference=False),
    LossSpec(
        KTOLoss,
        "unpaired",
        "kto:KTO",
        needs_reference=True,
        kl_pairs=True,
        min_microbatch=2,
        min_microbatch_reason="its KL estimate pairs each prompt with another example's output",
    ),
    LossSpec(GRPOLoss, "grouped", "grpo:GRPO", needs_reference=True),
    LossSpec(BradleyTerryLoss, "paired", "bradley_terry:BradleyTerry", needs_reference=False, head="reward"),
    LossSpec(PPOLoss, "unpaired", "ppo:PPO", needs_reference=True, head="value"),
    LossSpec(APOZeroLoss, "paired", "apo_zero:APOZero", needs_reference=True),
    LossSpec(NCAPairLoss, "paired", "nca_pair:NCAPair", needs_reference=True),
)

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _DECLARED}

if TYPE_CHECKING:  # type checkers see the common base; pydantic validates the real union below
    LossConfig = LossParams
else:
    # a union built at run time from the registry (Union[...] of a tuple; `|` cannot spell it)
    LossConfig = Annotated[Union[tuple(spec.config for spec in _DECLARED)], Field(discriminator="name")]  # noqa: UP007 - see above


def loss_spec(name: str) -> LossSpec:
    """The declaration of loss `name`; ValueError naming the known losses otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None


def head_kind(loss_name: str) -> HeadKind | None:
    return loss_spec(loss_name).head


# --------------------------------------------------------------------------- checks


def loss_feedback_problem(loss_name: str, feedback_kinds: list[str], conversion: Any | None) -> str | None:
    """Why `loss_name` cannot train on files of these kinds after `conversion`, or None when it can."""
    from halos_core.config import effective_kind

    data_kind = loss_spec(loss_name).data
    accepted = DATA_KIND_ACCEPTS[data_kind]
    for kind in feedback_kinds:
        eff = effective_kind(kind, conversion)
        if eff not in accepted:
            hint = {
                ("unpaired", "pairwise"): " (add conversion {'type': 'pairwise_to_unpaired'})",
                ("unpaired", "scalar"): " (add conversion {'type': 'scalar_to_binary'})",
                ("paired", "scalar"): " (add conversion {'type': 'scalar_to_pairs'})",
            }.get((data_kind, eff), "")
            return f"loss '{loss_name}' trains on {data_kind} data and cannot use {eff} feedback{hint}"
    return None


def loss_batch_problem(loss_name: str, microbatch_size: int) -> str | None:
    """Why this loss cannot train with microbatches of `microbatch_size`, or None."""
    spec = loss_spec(loss_name)
    if microbatch_size < spec.min_microbatch:
        return f"{loss_name.upper()} needs microbatch_size >= {spec.min_microbatch} ({spec.min_microbatch_reason})"
    return None

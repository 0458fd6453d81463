"""Can a round continue a checkpoint? The one rule, read by the API at submit time and by the
trainer when it loads the checkpoint (torch-free).

A round continues its parent's weights AND optimizer state, so both must train the same parameters:
the same LoRA structure (r, alpha, target modules) or full weights, and the same head (a reward head
for `bradley_terry`, a value head for `ppo`, none for the other losses). A checkpoint records what it
trained in `trainer_state.json` (`lora`: the structure, `head`: {kind, …}, `loss`); older or foreign
checkpoints may only have `meta.json` (`lora`: a bool, `head`: the kind). What neither records is not
checked here (the trainer still checks the optimizer's parameter names when it loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from halos_core.config import LoraSettings, lora_structure
from halos_core.loss_registry import head_kind

_UNKNOWN: Any = object()


@dataclass(frozen=True)
class TrainedParams:
    """What a round trains besides the base weights. `lora`: the LoRA structure, None for full
    weights, True/False when only "LoRA or not" is known; `head`: the head kind or None.
    `_UNKNOWN` marks what a checkpoint does not record."""

    lora: Any = _UNKNOWN
    head: Any = _UNKNOWN
    loss: str | None = None  # the loss that wrote the checkpoint, when recorded (for messages)


def round_params(loss_name: str, lora: LoraSettings | None) -> TrainedParams:
    """What a round with this loss and these LoRA settings trains."""
    return TrainedParams(
        lora=lora_structure(lora) if lora is not None else None, head=head_kind(loss_name), loss=loss_name
    )


def recorded_params(trainer_state: dict[str, Any] | None, meta: dict[str, Any] | None = None) -> TrainedParams:
    """What a checkpoint trained, from its trainer_state.json (else its meta.json extras)."""
    state, meta = trainer_state or {}, meta or {}
    lora: Any = _UNKNOWN
    if "lora" in state:
        lora = state["lora"]
    elif isinstance(meta.get("lora"), bool):
        lora = meta["lora"]
    head: Any = _UNKNOWN
    if "head" in state:
        head = state["head"].get("kind") if isinstance(state["head"], dict) else state["head"]
    elif "head" in meta:
        head = meta["head"]
    loss = state.get("loss")
    return TrainedParams(lora=lora, head=head, loss=loss if isinstance(loss, str) else None)


@dataclass(frozen=True)
class Incompatibility:
    reason: Literal["lora", "head"]
    have: Any  # what the checkpoint trains
    want: Any  # what the round trains
    parent_loss: str | None
    loss: str | None

    def message(self, where: str) -> str:
        """`where` names the parent, e.g. "checkpoint ckpt_… (round 2)"."""
        if self.reason == "lora":
            return (
                f"the parent {where} trains {_lora_words(self.have)}; this round trains {_lora_words(self.want)}"
                " (the run's `lora`): its weights and optimizer state cannot be continued. Continue from a"
                " checkpoint trained with the run's settings, or start a new run."
            )
        return (
            f"the parent {where} trains {_head_words(self.have)}"
            + (f" (loss {self.parent_loss!r})" if self.parent_loss else "")
            + f"; loss {self.loss!r} trains {_head_words(self.want)}: its weights and optimizer state cannot"
            " be continued. Use a loss that trains the same head (reward: bradley_terry; value: ppo; none:"
            " every other loss), or start a new run for this loss."
        )


def incompatibility(have: TrainedParams, want: TrainedParams) -> Incompatibility | None:
    """Why a round that trains `want` cannot continue a checkpoint that trained `have`, or None."""
    if have.lora is not _UNKNOWN:
        if isinstance(have.lora, bool):  # only "LoRA or not" is recorded
            differs = have.lora != (want.lora is not None)
        else:
            differs = have.lora != want.lora
        if differs:
            return Incompatibility("lora", have.lora, want.lora, have.loss, want.loss)
    if have.head is not _UNKNOWN and have.head != want.head:
        return Incompatibility("head", have.head, want.head, have.loss, want.loss)
    return None


def _lora_words(value: Any) -> str:
    if not value:
        return "full weights"
    return f"LoRA {value}" if isinstance(value, dict) else "LoRA"


def _head_words(kind: Any) -> str:
    return f"a {kind} head" if kind else "no head"

"""Heads on the policy's final hidden states: a scalar reward head and a value head.

- `RewardHead` (`bradley_terry`): one bias-free linear map `hidden -> 1` applied to the hidden
  state of each sequence's LAST non-padding token (right padding: position
  `attention_mask.sum(1) - 1`), the layout of `*ForSequenceClassification` scoring heads. The
  body is trained together with the head.
- `ValueHead` (`ppo`): HALOs' value head (`train/models.py`, from TRL): an MLP
  `hidden -> hidden -> hidden -> 1` with ReLU and dropout, run in float32 (in the head's weight
  dtype: bf16 under FSDP bf16 mixed precision; the values are float32) on DETACHED hidden
  states, so the critic loss trains only the head and the policy loss only the body. Values are
  returned for every position, aligned with the token log-probs: `values[:, t]` belongs to the
  state that predicts token t+1, i.e. `[B, L-1]` like `halos_core.logprobs.token_logps`.

A head's weights live in `head.safetensors` next to the model in every checkpoint; its kind
and shape are in `trainer_state.json` (`head`), so a later round restores it with the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from halos_core.loss_registry import head_kind

HEAD_FILE = "head.safetensors"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last non-padding token of each row (right padding; 0 for an empty row)."""
    return (attention_mask.long().sum(-1) - 1).clamp(min=0)


class RewardHead(nn.Module):
    kind = "reward"

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.score = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (hidden_size + 1) ** 0.5)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] scalar rewards from [B, L, H] hidden states."""
        idx = last_token_index(attention_mask).to(hidden.device)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden_size": self.hidden_size}


class ValueHead(nn.Module):
    kind = "value"

    def __init__(self, hidden_size: int, dropout: float = 0.1):
        super().__init__()
        self.hidden_size = hidden_size
        self.dropout = dropout
        drop = (lambda: nn.Dropout(dropout)) if dropout else nn.Identity
        self.summary = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            drop(),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            drop(),
            nn.ReLU(),
            nn.Linear(hidden_size, 1),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, L-1] float32 values from [B, L, H] hidden states (no gradient into the body).

        Runs in the dtype of the head's weights: float32, unless FSDP's mixed precision cast the
        (unsharded) parameters to bf16 for the forward; the values are returned in float32."""
        h = hidden[:, :-1].detach().to(self.summary[0].weight.dtype)
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.summary(h).squeeze(-1).float()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden_size": self.hidden_size, "dropout": self.dropout}


def build_head(loss_name: str, hidden_size: int) -> nn.Module | None:
    """The head a loss trains (None for the plain language-model losses)."""
    kind = head_kind(loss_name)
    if kind == "reward":
        return RewardHead(hidden_size)
    if kind == "value":
        return ValueHead(hidden_size)
    return None


def head_from_description(desc: dict[str, Any]) -> nn.Module:
    if desc["kind"] == "reward":
        return RewardHead(int(desc["hidden_size"]))
    if desc["kind"] == "value":
        return ValueHead(int(desc["hidden_size"]), float(desc.get("dropout", 0.1)))
    raise ValueError(f"unknown head kind {desc['kind']!r}")

"""Padding to the longest sequence of the microbatch (never to max_length).

A `Microbatch` holds one or more *streams* of sequences that go through the model:
  paired:   "chosen", "rejected"        (row i of both is the same example)
  unpaired: "target" (+ "kl" for KTO: prompt i with the output of example i+1 of the microbatch)
  sft:      "target"
  grouped:  "target"
Each stream is `{"input_ids", "attention_mask", "labels"}` [B, L] (right padding, labels -100 on
prompt and padding). `concat_streams` pads several streams to a common length for one forward.
With `hyperparams.packing` the log-prob passes re-lay these rows into packed rows (`packing.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .tokenize import IGNORE_INDEX, Encoded

Stream = dict[str, torch.Tensor]


@dataclass
class Microbatch:
    kind: str
    streams: dict[str, Stream]
    size: int  # examples in this microbatch
    desirable: torch.Tensor | None = None  # [B] bool (unpaired)
    group: torch.Tensor | None = None  # [B] long (grouped)
    scores: torch.Tensor | None = None  # [B] float (grouped)
    advantages: torch.Tensor | None = None  # [B] float (grouped)
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens of the trained streams (the KL stream is not counted)."""
        return int(sum(s["attention_mask"].sum().item() for k, s in self.streams.items() if k != "kl"))

    def to(self, device) -> Microbatch:
        moved = {k: {n: t.to(device) for n, t in s.items()} for k, s in self.streams.items()}

        def opt(t):  # optional tensors move too
            return None if t is None else t.to(device)

        return Microbatch(
            self.kind,
            moved,
            self.size,
            opt(self.desirable),
            opt(self.group),
            opt(self.scores),
            opt(self.advantages),
            self.meta,
        )


def pad_stream(seqs: Sequence[Encoded], pad_token_id: int, length: int | None = None) -> Stream:
    longest = max((len(s) for s in seqs), default=0)
    length = longest if length is None else max(length, longest)
    n = len(seqs)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(seqs):
        k = len(s)
        input_ids[i, :k] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[i, :k] = 1
        labels[i, :k] = torch.tensor(s.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = torch.full((t.shape[0], length - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def concat_streams(streams: Sequence[Stream], pad_token_id: int) -> Stream:
    """Rows of several streams in one [sum B, max L] batch (for a single forward pass)."""
    length = max(s["input_ids"].shape[1] for s in streams)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.cat([_pad_to(s[k], length, v) for s in streams], dim=0) for k, v in fill.items()}

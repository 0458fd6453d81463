"""Token log-probs of preference pairs with the shared prompt computed once (issue 11).

A paired loss runs chosen and rejected through the model as one batch of 2n rows (the joint
stream: rows i and n+i are pair i). Both rows start with the same prompt, so the decoder computes
the prompt twice. `shared_prefix_token_logps` lays each pair out as ONE row

    prompt | chosen response | rejected response

with position ids that restart the rejected response where the prompt ends (so it sits at the
positions it has in its own row) and a 4D attention mask in which the rejected response attends
to the prompt and to itself but not to the chosen response. Every token then sees exactly the
context it sees in its own row, and the hidden states are mapped back to the joint stream's
[2n, L] layout before the (chunked) LM head: the result has the layout and meaning of
`halos_core.logprobs.token_logps` on the joint stream, equal to it within float tolerance (the
attention sums run over other shapes; tests/halos_core/test_prefix_sharing.py: 1e-5 in float32).

The shared prefix of a pair is the longest common prefix of its two rows' tokens that lies before
the first label of either (the prompt, possibly less); a pair with nothing in common still works
(its rows simply do not share). Rows must be right-padded (what the collator produces). The mask
is handed to the decoder as a prepared 4D mask: boolean for `sdpa`, additive for `eager`; other
attention implementations are refused (`UnsupportedPrefixSharing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from halos_core.logprobs import IGNORE_INDEX, LogitTransform, decoder_and_head, logit_transform, logps_from_hidden


class UnsupportedPrefixSharing(ValueError):
    """The model's attention implementation cannot take the prefix-sharing mask."""


@dataclass
class SharedLayout:
    input_ids: torch.Tensor  # [n, T] one row per pair
    position_ids: torch.Tensor  # [n, T]
    allowed: torch.Tensor  # [n, T, T] bool: query t may attend to key k
    source_row: torch.Tensor  # [2n] the shared row of each joint-stream row
    source_pos: torch.Tensor  # [2n, L] the shared position holding each joint-stream position


def _first_label(labels: torch.Tensor, length: int) -> int:
    hits = (labels[:length] != IGNORE_INDEX).nonzero()
    return int(hits[0]) if len(hits) else length


def shared_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> SharedLayout:
    rows, width = input_ids.shape
    if rows % 2:
        raise ValueError(f"a joint stream has 2n rows (chosen then rejected), got {rows}")
    n = rows // 2
    lengths = attention_mask.sum(1).tolist()
    for i, length in enumerate(lengths):
        if not bool(attention_mask[i, :length].all()):
            raise ValueError("prefix sharing needs right-padded rows")
    pieces, positions, shared_len, spans = [], [], [], []
    for i in range(n):
        lc, lr = int(lengths[i]), int(lengths[n + i])
        c, r = input_ids[i, :lc], input_ids[n + i, :lr]
        limit = min(_first_label(labels[i], lc), _first_label(labels[n + i], lr))
        same = (c[:limit] == r[:limit]).long()
        s = int(same.cumprod(0).sum()) if limit else 0
        pieces.append(torch.cat([c, r[s:]]))
        positions.append(torch.cat([torch.arange(lc), torch.arange(s, lr)]))
        shared_len.append(s)
        spans.append((lc, lr))
    total = max(len(p) for p in pieces)
    ids = input_ids.new_zeros((n, total))  # padding: any id, padded positions are never read back
    pos = torch.zeros((n, total), dtype=torch.long)
    causal = torch.ones((total, total), dtype=torch.bool).tril()
    allowed = causal.expand(n, total, total).clone()
    source_pos = torch.zeros((rows, width), dtype=torch.long)
    for i, (piece, p, s, (lc, lr)) in enumerate(zip(pieces, positions, shared_len, spans)):
        end = len(piece)
        ids[i, :end] = piece
        pos[i, :end] = p
        allowed[i, lc:end, s:lc] = False  # the rejected response does not see the chosen one
        source_pos[i, :lc] = torch.arange(lc)
        source_pos[n + i, :lr] = torch.cat([torch.arange(s), torch.arange(lc, lc + lr - s)])
    device = input_ids.device
    return SharedLayout(
        input_ids=ids,
        position_ids=pos.to(device),
        allowed=allowed.to(device),
        source_row=torch.arange(rows, device=device) % n,
        source_pos=source_pos.to(device),
    )


def _attention_mask(decoder: nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    impl = getattr(getattr(decoder, "config", None), "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return allowed[:, None]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[:, None]
    raise UnsupportedPrefixSharing(f"prefix sharing needs sdpa or eager attention, the model uses {impl!r}")


def shared_prefix_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
    transform: LogitTransform | None | str = "config",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` of a joint stream (rows i and n+i: pair i) with each pair's prompt run once:
    ([2n, L-1] float32 log-probs, 0 where masked; [2n, L-1] bool mask)."""
    if transform == "config":
        transform = logit_transform(getattr(model, "config", None))
    decoder, head = decoder_and_head(model)
    layout = shared_layout(input_ids, attention_mask, labels)
    dtype = decoder.get_input_embeddings().weight.dtype
    if torch.is_autocast_enabled(input_ids.device.type):
        dtype = torch.get_autocast_dtype(input_ids.device.type)
    hidden = decoder(
        input_ids=layout.input_ids,
        attention_mask=_attention_mask(decoder, layout.allowed, dtype),
        position_ids=layout.position_ids,
        use_cache=False,
    ).last_hidden_state
    gathered = hidden[layout.source_row[:, None], layout.source_pos]  # [2n, L, H]
    return logps_from_hidden(head, gathered, labels, chunk_tokens, transform=transform)

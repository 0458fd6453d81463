"""Sequence packing for the log-prob passes: several sequences per row, none attending to another.

The collator pads a microbatch to its longest sequence ([B, L], right padding). `pack_stream`
re-lays the real tokens of those rows into R <= B rows of width W:

    packed input_ids   [R, W]  sequences back to back, first-fit decreasing by length
    position_ids       [R, W]  restart at 0 for every sequence (and for the pad tail of a row)
    labels             [R, W]  the sequence's labels, -100 on each sequence's FIRST token (the
                               token before it belongs to another sequence) and on the pad tail

The attention restriction comes from transformers itself (5.x, `masking_utils`): when a decoder
gets `position_ids` and `attention_mask=None`, `find_packed_sequence_indices` splits each row
wherever the positions do not increase by one, and `create_causal_mask` builds a block-causal
mask (causal within a sequence, nothing across) for `sdpa`, `eager` and `flex_attention`.
`flash_attention_*` reads the same position_ids as varlen `cu_seqlens`, but ONLY for a single
row (`_is_packed_sequence` requires batch size 1), so for flash kernels everything is packed
into one row. Any other attention implementation makes transformers skip mask creation
entirely, which would let tokens attend across sequences: `check_packing_supported` refuses it.

Row width: for sdpa/eager the block-causal mask is materialised and attention costs R x W^2, so
rows are bins of the longest sequence's length (attention never costs more than the padded
batch; the MLP / LM-head work shrinks with the padding). For flash kernels one row of all the
tokens (varlen attention costs the sum of n_i^2).

`PackedStream.unpack_shifted` maps the packed per-token log-probs [R, W-1] back to the [B, L-1]
layout of `halos_core.logprobs.token_logps` (differentiable: an index copy), so losses are
unchanged. `padding_stats` reports the pad share of both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# attention implementations whose masks honour packed position_ids (transformers 5.x)
BLOCK_MASK_IMPLEMENTATIONS = frozenset({"sdpa", "eager", "flex_attention"})


def _is_flash(impl: str | None) -> bool:
    return bool(impl) and "flash" in impl


def attn_implementation(config) -> str | None:
    return getattr(config, "_attn_implementation", None)


def check_packing_supported(config) -> str:
    """The attention implementation, if packed position_ids isolate sequences with it; else raise."""
    impl = attn_implementation(config)
    if impl in BLOCK_MASK_IMPLEMENTATIONS or _is_flash(impl):
        return impl
    raise NotImplementedError(
        f"sequence packing needs an attention implementation that builds a block-causal mask from "
        f"position_ids (sdpa, eager, flex_attention, flash_attention_*); this model uses {impl!r}"
    )


def sequence_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Lengths of right-padded rows; raises if a row's mask is not a prefix of ones."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(prefix, mask):
        raise ValueError("packing expects right padding (each attention_mask row a prefix of ones)")
    return [int(n) for n in lengths.tolist()]


def plan_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: row -> sequence indices (deterministic; ties by index).
    Empty sequences are not placed."""
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of {capacity}")
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n == 0:
            continue
        for r, free in enumerate(space):
            if n <= free:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(capacity - n)
    return rows


def row_capacity(lengths: list[int], attn_impl: str | None) -> int:
    """Longest sequence (block mask materialised), or all tokens in one row (flash varlen)."""
    if _is_flash(attn_impl):
        return max(1, sum(lengths))
    return max([1, *lengths])


@dataclass
class PackedStream:
    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W]
    labels: torch.Tensor  # [R, W]
    src: torch.Tensor  # [N] flat index into the padded [B*L] layout of each real token
    dst: torch.Tensor  # [N] flat index into the packed [R*W] layout of the same token
    batch: int
    length: int
    lengths: list[int]
    rows: list[list[int]]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[R, W, *rest] -> [B, L, *rest] (zeros on padding); differentiable."""
        rest = packed.shape[2:]
        flat = packed.reshape(-1, *rest)
        out = flat.new_zeros((self.batch * self.length, *rest))
        out = out.index_copy(0, self.src, flat.index_select(0, self.dst))
        return out.view(self.batch, self.length, *rest)

    def unpack_shifted(self, packed: torch.Tensor) -> torch.Tensor:
        """Token log-probs [R, W-1] (position t predicts t+1) -> [B, L-1]."""
        full = torch.cat([packed, packed.new_zeros((packed.shape[0], 1))], dim=1)
        return self.unpack(full)[:, : max(self.length - 1, 0)]


def pack_stream(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    capacity: int | None = None,
    attn_impl: str | None = "sdpa",
    pad_token_id: int = 0,
) -> PackedStream:
    """Pack a right-padded stream [B, L]; `capacity` None: `row_capacity(lengths, attn_impl)`.
    Flash kernels only isolate sequences in a single row: a capacity that would need several
    rows is refused for them."""
    batch, length = input_ids.shape
    lengths = sequence_lengths(attention_mask)
    if capacity is None:
        capacity = row_capacity(lengths, attn_impl)
    rows = plan_rows(lengths, capacity)
    if _is_flash(attn_impl) and len(rows) > 1:
        raise ValueError(f"{attn_impl} isolates packed sequences only in a single row; got {len(rows)} rows")
    if not rows:  # nothing but empty sequences: one empty-ish row keeps shapes valid
        rows_n, width = 1, 1
    else:
        rows_n, width = len(rows), max(sum(lengths[i] for i in r) for r in rows)
    device = input_ids.device
    ids = torch.full((rows_n, width), pad_token_id, dtype=input_ids.dtype, device=device)
    pos = torch.zeros((rows_n, width), dtype=torch.long, device=device)
    lab = torch.full((rows_n, width), IGNORE_INDEX, dtype=labels.dtype, device=device)
    src, dst = [], []
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            n = lengths[i]
            ids[r, offset : offset + n] = input_ids[i, :n]
            lab[r, offset + 1 : offset + n] = labels[i, 1:n]  # the first token is never a target
            pos[r, offset : offset + n] = torch.arange(n, device=device)
            src.append(torch.arange(i * length, i * length + n))
            dst.append(torch.arange(r * width + offset, r * width + offset + n))
            offset += n
        if offset < width:  # the pad tail: its own pseudo-sequence (positions restart at 0)
            pos[r, offset:] = torch.arange(width - offset, device=device)
    empty = torch.zeros(0, dtype=torch.long)
    return PackedStream(
        input_ids=ids,
        position_ids=pos,
        labels=lab,
        src=(torch.cat(src) if src else empty).to(device),
        dst=(torch.cat(dst) if dst else empty).to(device),
        batch=batch,
        length=length,
        lengths=lengths,
        rows=rows,
    )


def padding_stats(
    attention_mask: torch.Tensor, packed: PackedStream | None = None, attn_impl: str | None = "sdpa"
) -> dict:
    """Token slots and pad share of the padded [B, L] layout and of the packed [R, W] one."""
    lengths = sequence_lengths(attention_mask)
    real = sum(lengths)
    padded_slots = attention_mask.numel()
    if packed is None:
        rows = plan_rows(lengths, row_capacity(lengths, attn_impl))
        packed_rows = max(1, len(rows))
        packed_slots = packed_rows * max([1, *(sum(lengths[i] for i in r) for r in rows)])
    else:
        packed_rows, packed_slots = packed.input_ids.shape[0], packed.input_ids.numel()
    return {
        "real_tokens": real,
        "padded_rows": attention_mask.shape[0],
        "padded_slots": padded_slots,
        "padded_pad_fraction": 1 - real / padded_slots if padded_slots else 0.0,
        "packed_rows": packed_rows,
        "packed_slots": packed_slots,
        "packed_pad_fraction": 1 - real / packed_slots if packed_slots else 0.0,
    }

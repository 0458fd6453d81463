"""Per-token log-probabilities of the labels without a float32 [batch, tokens, vocab] tensor.

`token_logps(model, input_ids, attention_mask, labels)` runs the model's *base* (decoder) to get
the final hidden states, then applies the LM head chunk by chunk over token positions and keeps,
per chunk, only `logit[label] - logsumexp(logits)`. With gradients enabled each chunk runs under
non-reentrant activation checkpointing, so the backward pass recomputes one chunk's logits at a
time instead of keeping all of them: peak extra memory is a few chunks' [B, c, V] logits (the
recomputed logits, their gradient, logsumexp's temporaries), independent of the sequence length.
A chunk holds at most `DEFAULT_CHUNK_TOKENS` positions and `DEFAULT_CHUNK_BYTES` of float32
logits (`chunk_tokens_for`). `tests/halos_core/test_logprobs.py` measures the peak of live
tensor bytes of both paths.

Alignment: position t predicts token t+1, so the result is [B, L-1] with
`logps[b, t] = log p(labels[b, t+1] | input_ids[b, :t+1])`, and 0.0 where `labels[b, t+1]` is
-100 (prompt or padding). The matching mask is `labels[:, 1:] != -100`.

Packing (`packing=True`, `packed_token_logps`): the real tokens of the batch are re-laid into
fewer rows (`halos_core.data.packing`), position_ids restarting at 0 per sequence and no 2D
attention mask, so transformers builds a block-causal mask (no token attends across a sequence
boundary); the packed log-probs are mapped back to the same [B, L-1] layout. Only the "logps"
mode packs; the reward and value heads run on the padded layout.

Logits post-processed after the LM head (`logit_transform`, read from the model config): the
chunked path applies the same transform to each chunk's logits (in float32) — Gemma-2/3
`final_logit_softcapping` (cap * tanh(x / cap)), Granite `logits_scaling` (x / s), Cohere
`logit_scale` (x * s). Any other post-processing known in transformers' modeling code (see
`UNSUPPORTED_LOGIT_ATTRS`) is refused with `UnsupportedLogits` rather than silently ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 4096  # at most this many token positions (batch x time) per LM-head chunk
DEFAULT_CHUNK_BYTES = 512 << 20  # ... and at most this many bytes of float32 logits per chunk


def chunk_tokens_for(
    vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_tokens: int = DEFAULT_CHUNK_TOKENS
) -> int:
    """Token positions per chunk so that one chunk's float32 logits [c, V] stay within `chunk_bytes`
    (a 128k vocabulary gets ~1k positions, a 32k one the 4096 cap)."""
    return max(1, min(max_tokens, chunk_bytes // (4 * max(1, vocab_size))))


class UnsupportedLogits(TypeError):
    """The model post-processes its logits in a way the chunked log-prob path does not reproduce."""


# config attributes with which transformers' causal LMs change the logits after (or the hidden
# states right before) the LM head, beyond the three supported ones; refused unless a no-op
UNSUPPORTED_LOGIT_ATTRS = {
    "logits_soft_cap": None,  # RecurrentGemma: tanh soft cap under another name
    "lm_head_multiplier": 1.0,  # Falcon-H1: logits * m
    "output_multiplier": 1.0,  # logits * m
    "dim_model_base": None,  # MiniCPM: hidden / (hidden_size / dim_model_base) before the head
    "unpadded_vocab_size": None,  # logits truncated to the unpadded vocabulary
}


class LogitTransform:
    """What a causal LM does to `lm_head(hidden)` before returning its logits (see the module doc)."""

    def __init__(self, softcap: float | None = None, multiply: float | None = None, divide: float | None = None):
        self.softcap, self.multiply, self.divide = softcap, multiply, divide

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def __repr__(self) -> str:
        return f"LogitTransform(softcap={self.softcap}, multiply={self.multiply}, divide={self.divide})"


def logit_transform(config) -> LogitTransform | None:
    """The logit post-processing of a model with this config (None: plain `lm_head(hidden)`);
    raises `UnsupportedLogits` for one this module does not reproduce."""
    if config is None:
        return None
    configs = [config]
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not config:
            configs.append(text)
    found: dict[str, float] = {}
    model_type = ""
    for cfg in configs:
        model_type = getattr(cfg, "model_type", "") or model_type
        for name, identity in UNSUPPORTED_LOGIT_ATTRS.items():
            value = getattr(cfg, name, None)
            if (
                value is not None
                and value != identity
                and not (name == "dim_model_base" and value == getattr(cfg, "hidden_size", None))
            ):
                raise UnsupportedLogits(
                    f"{type(cfg).__name__}.{name}={value!r}: the model post-processes its logits in a way "
                    "halos_core.logprobs does not support"
                )
        for name in ("final_logit_softcapping", "logits_scaling", "logit_scale"):
            value = getattr(cfg, name, None)
            if value is not None and not isinstance(value, (int, float)):
                raise UnsupportedLogits(f"{type(cfg).__name__}.{name}={value!r} is not a number")
            if value is not None:
                found[name] = float(value)
    softcap = found.get("final_logit_softcapping") or None  # 0 / None: no cap
    scaling = found.get("logits_scaling", 1.0)
    scale = found.get("logit_scale", 1.0)
    if scaling != 1.0 and not model_type.startswith("granite"):
        # Granite divides by logits_scaling; others (HyperCLOVA X) multiply by it
        raise UnsupportedLogits(
            f"logits_scaling={scaling} on model type {model_type!r}: only Granite's (x / s) is supported"
        )
    if sum([softcap is not None, scaling != 1.0, scale != 1.0]) > 1:
        raise UnsupportedLogits(f"more than one logit transform in {type(config).__name__}: {found}")
    if softcap is None and scaling == 1.0 and scale == 1.0:
        return None
    return LogitTransform(
        softcap=softcap, multiply=scale if scale != 1.0 else None, divide=scaling if scaling != 1.0 else None
    )


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(base model that returns hidden states, LM head) of a causal LM."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    if head is None or decoder is model:
        raise TypeError(f"{type(model).__name__} does not expose a decoder and an LM head")
    return decoder, head


def _chunk_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, transform: LogitTransform | None = None
) -> torch.Tensor:
    logits = head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [B, L-1] with -100 replaced by 0, mask [B, L-1] bool)."""
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    return tgt.masked_fill(~mask, 0), mask


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
    packing: bool = False,
    transform: LogitTransform | None | str = "config",
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L-1] float32 token log-probs, 0 where masked; [B, L-1] bool mask).

    `chunk_tokens` None: sized from the vocabulary (`chunk_tokens_for`). `packing`: run the
    sequences packed (`packed_token_logps`); same result. `transform`: the logit post-processing,
    by default read from `model.config` (`logit_transform`)."""
    if transform == "config":
        transform = logit_transform(getattr(model, "config", None))
    if packing:
        return packed_token_logps(model, input_ids, attention_mask, labels, chunk_tokens, transform=transform)
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return logps_from_hidden(head, hidden, labels, chunk_tokens, transform=transform)


def packed_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
    capacity: int | None = None,
    transform: LogitTransform | None | str = "config",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` computed on packed rows (`halos_core.data.packing.pack_stream`): same
    [B, L-1] result; the decoder and the LM head only see real tokens plus each row's pad tail."""
    from halos_core.data.packing import check_packing_supported, pack_stream

    if transform == "config":
        transform = logit_transform(getattr(model, "config", None))
    decoder, head = decoder_and_head(model)
    impl = check_packing_supported(decoder.config)
    packed = pack_stream(input_ids, attention_mask, labels, capacity=capacity, attn_impl=impl)
    hidden = decoder(
        input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids, use_cache=False
    ).last_hidden_state
    logps, _ = logps_from_hidden(head, hidden, packed.labels, chunk_tokens, transform=transform)
    _, mask = shifted_targets(labels)
    return packed.unpack_shifted(logps).masked_fill(~mask, 0.0), mask


def _vocab_size(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    return (
        int(weight.shape[0]) if weight is not None and weight.ndim == 2 else int(getattr(head, "out_features", 0) or 0)
    )


def logps_from_hidden(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
    transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked log-probs from final hidden states; `transform`: the model's logit post-processing."""
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(_vocab_size(head))
    targets, mask = shifted_targets(labels)
    hidden = hidden[:, :-1]
    batch, steps = targets.shape
    if steps == 0:
        return hidden.new_zeros((batch, 0), dtype=torch.float32), mask
    width = max(1, chunk_tokens // max(batch, 1))
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad
    pieces = []
    for start in range(0, steps, width):
        h, t = hidden[:, start : start + width], targets[:, start : start + width]
        if use_ckpt:
            pieces.append(checkpoint(_chunk_logps, head, h, t, transform, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, h, t, transform))
    logps = torch.cat(pieces, dim=1)
    return logps.masked_fill(~mask, 0.0), mask


def naive_token_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path: full logits, log_softmax, gather (materialises [B, L, V])."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    targets, mask = shifted_targets(labels)
    logps = logits[:, :-1].log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logps.masked_fill(~mask, 0.0), mask


class TokenLogprobModel(nn.Module):
    """Wraps a causal LM (and an optional head) so that `forward` returns what the loss needs
    (what DDP/FSDP wrap).

    Going through this module's forward (rather than calling the inner model's pieces) keeps
    the distributed wrapper's gradient hooks and autocast in the path.

        forward(ids, mask, labels)                    -> (logps [B, L-1], mask [B, L-1])
        forward(ids, mask, labels, mode="paired_logps") -> the same for a joint stream (rows i and
                                                          B/2+i: a pair), each prompt run once
                                                          (halos_core.prefix_sharing)
        forward(ids, mask, labels, mode="values")     -> (logps, mask, values [B, L-1])  (value head)
        forward(ids, mask, mode="reward")             -> rewards [B]                      (reward head;
                                                          the LM head is not run at all)
    """

    def __init__(
        self,
        lm: nn.Module,
        chunk_tokens: int | None = None,
        head: nn.Module | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        packing: bool = False,
    ):
        super().__init__()
        self.lm = lm
        self.packing = packing  # "logps" mode only (see `packed_token_logps`)
        if chunk_tokens is None:
            out = lm.get_output_embeddings()
            chunk_tokens = chunk_tokens_for(_vocab_size(out) if out is not None else 0, chunk_bytes)
        self.chunk_tokens = chunk_tokens
        self.head = head
        self.logit_transform = logit_transform(getattr(lm, "config", None))  # refuses unsupported ones

    def forward(self, input_ids, attention_mask, labels=None, mode: str = "logps"):
        if mode == "logps":
            return token_logps(
                self.lm,
                input_ids,
                attention_mask,
                labels,
                self.chunk_tokens,
                packing=self.packing,
                transform=self.logit_transform,
            )
        if mode == "paired_logps":
            from halos_core.prefix_sharing import shared_prefix_token_logps

            return shared_prefix_token_logps(
                self.lm, input_ids, attention_mask, labels, self.chunk_tokens, transform=self.logit_transform
            )
        if self.head is None:
            raise ValueError(f"mode {mode!r} needs a head")
        decoder, lm_head = decoder_and_head(self.lm)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if mode == "reward":
            return self.head(hidden, attention_mask)
        if mode == "values":
            logps, mask = logps_from_hidden(lm_head, hidden, labels, self.chunk_tokens, transform=self.logit_transform)
            return logps, mask, self.head(hidden)
        raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------- reference cache


class ReferenceLogpCache:
    """Reference token log-probs per sequence, keyed by its token ids and label mask.

    The reference (the SFT model) is fixed for a whole run, so its log-probs of a sequence never
    change: they are computed once (on the CPU as each batch comes; on an accelerator up front for
    the round, after which the reference leaves the device) and, when `directory` is given, persisted under
    `directory/<reference sha256>-<precision>/` as safetensors shards so later rounds reuse them
    (on the CPU also with each intermediate checkpoint: a retry resuming from it then serves a
    sequence that repeats across the resume point the value the first attempt computed, and
    trains exactly as an uninterrupted attempt). Rows are stored unpadded ([n_tokens - 1] float32).
    """

    def __init__(self, directory: str | None = None, reference_sha256: str = "", precision: str = "no"):
        self.rows: dict[str, torch.Tensor] = {}
        self.new: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.directory = None
        if directory:
            self.directory = Path(directory) / f"{reference_sha256 or 'unknown'}-{precision}"
            self._load()

    def _load(self) -> None:
        from safetensors.torch import load_file

        if not self.directory.is_dir():
            return
        for shard in sorted(self.directory.glob("*.safetensors")):
            try:
                self.rows.update(load_file(str(shard)))
                os.utime(shard)  # its mtime is its last use: the server evicts least recently used shards
            except Exception:  # evicted under us, or unreadable: a miss, recomputed
                continue

    @staticmethod
    def keys(stream: dict[str, torch.Tensor]) -> list[str]:
        ids = stream["input_ids"].detach().cpu()
        labels = stream["labels"].detach().cpu()
        lengths = stream["attention_mask"].sum(1).tolist()
        out = []
        for i, n in enumerate(lengths):
            h = hashlib.sha256(ids[i, :n].to(torch.int64).numpy().tobytes())
            h.update((labels[i, :n] != IGNORE_INDEX).numpy().tobytes())
            out.append(h.hexdigest()[:40])
        return out

    def get(self, stream: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[B, L-1] log-probs if every row is cached, else None."""
        keys = self.keys(stream)
        if not all(k in self.rows for k in keys):
            self.misses += 1
            return None
        self.hits += 1
        return self._assemble(stream, keys)

    def put_and_get(self, stream: dict[str, torch.Tensor], logps: torch.Tensor) -> torch.Tensor:
        """Store freshly computed `logps` and return them as the cache serves them (rows cut at
        their length, 0.0 beyond): a batch computed now and one served later are the same tensor."""
        self.put(stream, logps)
        return self._assemble(stream, self.keys(stream))

    def _assemble(self, stream: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        batch, length = stream["input_ids"].shape
        out = torch.zeros((batch, max(length - 1, 0)), dtype=torch.float32)
        for i, k in enumerate(keys):
            row = self.rows[k]
            out[i, : row.shape[0]] = row
        return out.to(stream["input_ids"].device)

    def put(self, stream: dict[str, torch.Tensor], logps: torch.Tensor) -> None:
        keys = self.keys(stream)
        lengths = stream["attention_mask"].sum(1).tolist()
        cpu = logps.detach().float().cpu()
        for i, (k, n) in enumerate(zip(keys, lengths)):
            if k not in self.rows:
                row = cpu[i, : max(n - 1, 0)].clone()
                self.rows[k] = row
                self.new[k] = row

    def flush(self, name: str) -> None:
        """Persist the rows computed in this process as one shard (atomic rename)."""
        if self.directory is None or not self.new:
            return
        from safetensors.torch import save_file

        target = self.directory / f"{name}.safetensors"
        tmp = self.directory / f".tmp-{name}.safetensors"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in self.new.items()}, str(tmp))
            os.replace(tmp, target)
        except OSError as exc:  # a cache: a full disk costs later rounds a recomputation, not this round
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            warnings.warn(f"reference cache shard {target} not written: {exc}", stacklevel=2)
        self.new = {}

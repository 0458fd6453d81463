"""What the training benchmarks train on: a random-weight Llama of a given shape and synthetic
feedback whose lengths are given in tokens. Nothing is downloaded.

Used by `bench/train_throughput.py` and `bench/gpu_round.py`.

- `build_model`: a `LlamaForCausalLM` with seeded random weights, saved (safetensors) with the
  project's small local BPE tokenizer (`halos_core.tiny.build_tokenizer`, at most
  `TOKENIZER_VOCAB_CAP` tokens). The model's vocabulary may be larger (Llama-3's 128256): the
  tokenizer's ids are a subset of it, which changes no FLOP or memory figure (the embedding and
  the LM head keep their full size). The weights are created directly in the saved dtype, on the
  GPU when asked, so an 8B model takes seconds, not the minutes of a float32 CPU init.
- `TextPool` + `make_records`: HALOs feedback records (pairwise, binary or scalar) whose rendered
  length (prompt + response, chat template included) is drawn uniformly in [seq_min, seq_max].
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halos_core.tiny import SYLLABLES

TOKENIZER_VOCAB_CAP = 1024  # the local BPE tokenizer; the model's vocabulary may be larger
CHAT_OVERHEAD = 4  # <|user|> <|end|> <|assistant|> ... <|end|>: tokens the template adds


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, {self.layers} layers, {self.heads}/{self.kv_heads} heads, intermediate "
            f"{self.intermediate}, vocab {self.vocab}{', tied' if self.tie else ''}"
        )


@contextlib.contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_model(
    path: Path, shape: LlamaShape, *, bf16: bool, device: str, seed: int, max_positions: int
) -> dict[str, int]:
    """Random-weight Llama of `shape` + the local BPE tokenizer, saved to `path`; returns the
    parameter counts (`matmul_params`: all but the input embedding table, a tied table counted
    once, as the LM head — the N of the 6·N FLOPs-per-token rule)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from halos_core.tiny import build_tokenizer

    tokenizer = build_tokenizer(seed=seed, vocab_size=min(shape.vocab, TOKENIZER_VOCAB_CAP))
    config = LlamaConfig(
        vocab_size=max(shape.vocab, len(tokenizer)),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=shape.tie,
        attention_dropout=0.0,
    )
    init_device = "cuda" if device == "cuda" else "cpu"
    with torch.random.fork_rng(devices=[]), _default_dtype(torch.bfloat16 if bf16 else torch.float32):
        torch.manual_seed(seed)
        with torch.device(init_device):
            model = LlamaForCausalLM(config)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    tied = emb.data_ptr() == head.data_ptr()
    counts = {
        "params": total,
        "matmul_params": total if tied else total - emb.numel(),
        "vocab": config.vocab_size,
        "tokenizer_vocab": len(tokenizer),
    }
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    del model, emb, head
    gc.collect()
    if init_device == "cuda":
        torch.cuda.empty_cache()
    return counts


class TextPool:
    """Random word text whose token count is known: `text(n)` ~ n tokens of the tokenizer."""

    WORDS = SYLLABLES

    def __init__(self, tokenizer: Any, seed: int, n_tokens: int = 20000):
        rng = random.Random(seed)
        n_words = n_tokens
        while True:
            self.raw = " ".join(
                "".join(rng.choice(self.WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n_words)
            )
            # the fast tokenizer's backend directly: no "longer than model_max_length" warning
            self.offsets = tokenizer.backend_tokenizer.encode(self.raw, add_special_tokens=False).offsets
            if len(self.offsets) >= n_tokens:
                break
            n_words *= 2
        self.rng = rng

    def text(self, n: int) -> str:
        n = max(1, min(n, len(self.offsets) - 1))
        start = self.rng.randrange(0, len(self.offsets) - n)
        return self.raw[self.offsets[start][0] : self.offsets[start + n - 1][1]].strip() or "ka"


def make_records(
    kind: str, n_examples: int, pool: TextPool, seq_min: int, seq_max: int, max_prompt: int, seed: int
) -> list[dict]:
    """HALOs feedback records (normal form) whose rendered lengths fall in [seq_min, seq_max]."""
    rng = random.Random(seed)

    def turns(text: str, role: str) -> list[dict[str, str]]:
        return [{"role": role, "content": text}]

    def prompt_and_lengths(k: int) -> tuple[str, list[int]]:
        totals = [rng.randint(seq_min, seq_max) for _ in range(k)]
        p = max(1, min(int(min(totals) * rng.uniform(0.2, 0.5)), max_prompt - CHAT_OVERHEAD))
        return pool.text(p), [max(1, t - p - CHAT_OVERHEAD) for t in totals]

    records: list[dict] = []
    if kind == "pairwise":
        for i in range(n_examples):
            prompt, (la, lb) = prompt_and_lengths(2)
            label = rng.randint(0, 1)
            records.append(
                {
                    "type": "pairwise_feedback",
                    "prompt_id": f"p{i}",
                    "prompt": turns(prompt, "user"),
                    "output_A": turns(pool.text(la), "assistant"),
                    "output_B": turns(pool.text(lb), "assistant"),
                    "label": label,
                }
            )
    elif kind == "binary":
        for i in range(n_examples):
            prompt, (length,) = prompt_and_lengths(1)
            records.append(
                {
                    "type": "binary_feedback",
                    "prompt_id": f"b{i}",
                    "prompt": turns(prompt, "user"),
                    "output": turns(pool.text(length), "assistant"),
                    "label": i % 2,
                    "reward": float(i % 2),
                }
            )
    elif kind == "scalar":
        group = 4
        for i in range(math.ceil(n_examples / group)):
            prompt, lengths = prompt_and_lengths(group)
            for length in lengths:
                records.append(
                    {
                        "type": "scalar_feedback",
                        "prompt_id": f"s{i}",
                        "prompt": turns(prompt, "user"),
                        "output": turns(pool.text(length), "assistant"),
                        "reward": round(rng.random(), 4),
                    }
                )
    else:
        raise ValueError(kind)
    return records

"""A tiny, fully local causal LM + tokenizer for tests and the demo (nothing is downloaded).

`build_tiny_model(path, seed)` trains a byte-level BPE tokenizer with the `tokenizers` library on
seeded generated text, wraps it as a `PreTrainedTokenizerFast` with pad/eos tokens and a simple
chat template, builds a `LlamaForCausalLM` with seeded random weights and saves both with
`save_pretrained` (safetensors). Same arguments ⇒ byte-identical files, so the directory's
content hash (`halos_core.run_dir.tree_sha256`) is stable.

    python -m halos_core.tiny PATH [--seed 0] [--vocab-size 512] [--hidden-size 64] [--layers 2] [--heads 4]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

# Chat special tokens. `<|end|>` closes every turn and is the eos token; `<|pad|>` only pads.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
END_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
CONTROL_TOKENS = ("<|good|>", "<|bad|>")  # csft control tokens (config.CSFTLoss defaults)
SPECIAL_TOKENS = (PAD_TOKEN, END_TOKEN, *ROLE_TOKENS, *CONTROL_TOKENS)

# Every turn is `<|role|>content<|end|>`; the generation prompt is `<|assistant|>`. The prompt
# rendering is therefore a strict token prefix of prompt + response (special tokens split text).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# word pieces of the random text the tiny tokenizer is trained on (bench/ reuses them)
SYLLABLES = (
    "ka",
    "to",
    "mi",
    "ra",
    "ne",
    "su",
    "lo",
    "pe",
    "di",
    "ga",
    "vu",
    "shi",
    "an",
    "or",
    "el",
    "is",
    "the",
    "and",
    "good",
    "bad",
    "yes",
    "no",
    "one",
    "two",
    "red",
    "blue",
    "cat",
    "dog",
    "sun",
    "sea",
)


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(3, 14)):
            words.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))))
        sentence = " ".join(words)
        if rng.random() < 0.3:
            sentence = sentence.capitalize() + rng.choice([".", "?", "!", ","])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 999)}"
        out.append(sentence)
    return out


def build_tokenizer(seed: int = 0, vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` with the chat special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS + CONTROL_TOKENS),
        model_max_length=2048,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: str | Path,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
) -> Path:
    """Build and save a tiny Llama + tokenizer into `path`; returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    # Seeded weights without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args(argv)
    out = build_tiny_model(args.path, args.seed, args.vocab_size, args.hidden_size, args.layers, args.heads)
    from halos_core.run_dir import tree_sha256

    print(f"{out} {tree_sha256(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

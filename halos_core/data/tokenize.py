"""Chat-template tokenisation with HALOs' truncation rules.

`ChatEncoder.encode(prompt, output)` returns the token ids of prompt + output rendered with the
tokenizer's chat template and the labels (-100 on the prompt tokens), after truncation:

1. The prompt (rendered with the generation prompt) is cut to `max_prompt_length` tokens the way
   HALOs does it: turns are kept from the start of the conversation; the first turn that does not
   fit has its *content* truncated (token-wise, then decoded) to the space left, and later turns
   are dropped. (HALOs computes the space left with a sign slip; we use the real remainder.)
2. The output turns are then cut the same way so that prompt + output fits in `max_length`.
3. A final hard clamp guarantees the limits even when re-tokenising the truncated text is not
   exact: the prompt keeps its last `max_prompt_length` tokens (so the assistant header
   survives), the whole keeps its first `max_length` tokens.

Labels are -100 on the prompt tokens (the prompt rendering minus a trailing eos/pad, as HALOs),
so the loss only sees the response tokens, including the end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .examples import Turns

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _as_messages(t: Turns) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in t]


class ChatEncoder:
    def __init__(self, tokenizer: Any, max_length: int, max_prompt_length: int, cache_size: int = 1 << 16):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        if max_prompt_length >= max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.pad_token_id = int(tokenizer.pad_token_id)
        self._specials = {
            x for x in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if x is not None
        }
        self.encode = lru_cache(maxsize=cache_size)(self._encode)  # type: ignore[method-assign]  # a per-instance cache

    # ---- template helpers
    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
        )
        if hasattr(out, "keys"):  # a BatchEncoding from tokenizers that ignore return_dict
            out = out["input_ids"]
        return list(out)

    def _content_ids(self, text: str) -> list[int]:
        return [t for t in self.tokenizer.encode(text, add_special_tokens=False) if t not in self._specials]

    def _fit(self, fixed: list[dict[str, str]], turns_: list[dict[str, str]], budget: int, generation_prompt: bool):
        """Keep turns from the start; truncate the content of the first that overflows; drop the rest."""
        kept: list[dict[str, str]] = []
        for turn in turns_:
            length = len(self.render(fixed + kept + [turn], generation_prompt))
            if length <= budget:
                kept.append(turn)
                continue
            overhead = len(self.render(fixed + kept + [{**turn, "content": ""}], generation_prompt))
            room = budget - overhead
            if room > 0:
                ids = self._content_ids(turn["content"])[:room]
                kept.append({**turn, "content": self.tokenizer.decode(ids)})
            elif not kept and not fixed:
                kept.append({**turn, "content": ""})  # keep the role so the prompt is not empty
            break
        return kept

    # ---- the encoder
    def _encode(self, prompt: Turns, output: Turns) -> Encoded:
        conv = _as_messages(prompt)
        gen = _as_messages(output)
        prompt_ids = self.render(conv, True)
        if len(prompt_ids) > self.max_prompt_length:
            conv = self._fit([], conv, self.max_prompt_length, True)
            prompt_ids = self.render(conv, True)
        full = self.render(conv + gen, False)
        if len(full) > self.max_length:
            budget = self.max_length
            gen = self._fit(conv, gen, budget, False)
            full = self.render(conv + gen, False)
        n_prompt = len(prompt_ids)
        if prompt_ids and prompt_ids[-1] in (self.tokenizer.eos_token_id, self.pad_token_id):
            n_prompt -= 1
        if full[:n_prompt] != prompt_ids[:n_prompt]:
            # A template whose prompt rendering is not a prefix of prompt+response: mask by length.
            n_prompt = min(n_prompt, len(full))
        # hard clamps
        if n_prompt > self.max_prompt_length:
            cut = n_prompt - self.max_prompt_length
            full = full[cut:]
            n_prompt = self.max_prompt_length
        full = full[: self.max_length]
        labels = [IGNORE_INDEX] * min(n_prompt, len(full)) + full[n_prompt:]
        return Encoded(tuple(full), tuple(labels))

"""Batched sampling with transformers `generate` (KV cache on), on CPU or one GPU.

Prompts are rendered with the chat template (generation prompt on), cut to their last
`max_prompt_length` tokens and LEFT-padded so every row's continuation starts at the same
position. Each batch seeds torch's generator with `seed + batch index` before `generate`, so the
same seed (and batch size) gives the same samples, whatever ran before in the process.

A LoRA checkpoint without merged weights is loaded as its base model + the adapter (peft).
"""

from __future__ import annotations

from typing import Any

import torch

from halos_core.artefact_spec import Generator, SamplingParams
from halos_core.feedback.records import Turn
from halos_core.generation import cut_at_stop


def load_causal_lm(generator: Generator) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a generator: full weights, or base + LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if generator.adapter_path is not None:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(generator.base_path or generator.model_path, dtype=dtype)
        model = PeftModel.from_pretrained(base, generator.adapter_path).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(generator.base_path or generator.model_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(generator.model_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(generator.model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer


def render(tokenizer: Any, prompt: list[Turn], max_prompt_length: int) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in prompt],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)[-max_prompt_length:]


class HFEngine:
    name = "hf"

    def __init__(self, generator: Generator):
        self.model, self.tokenizer = load_causal_lm(generator)
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[list[Turn]], params: SamplingParams, batch_index: int) -> list[list[str]]:
        tok = self.tokenizer
        rows = [render(tok, p, params.max_prompt_length) for p in prompts]
        width = max(len(r) for r in rows)
        pad = int(tok.pad_token_id)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        sample = params.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "num_return_sequences": params.n,
            "use_cache": True,
            "pad_token_id": pad,
            "eos_token_id": tok.eos_token_id,
            "do_sample": sample,
        }
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        torch.manual_seed(params.seed + batch_index)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        # generate returns the n samples of prompt i at rows i*n .. i*n+n-1
        return [
            [cut_at_stop(texts[i * params.n + j], params.stop) for j in range(params.n)] for i in range(len(prompts))
        ]

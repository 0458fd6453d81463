"""Sampling with vLLM (optional extra; GPU only). UNTESTED in this project's CI: no GPU there.

The model is served from the generator's directory; a LoRA checkpoint without merged weights is
served as its base model with the checkpoint's adapter attached per request (`LoRARequest`), so
no merged copy is written. Prompts are rendered with the model's chat template, cut to their last
`max_prompt_length` tokens, and sent as token ids; `n` completions per prompt share the prompt's
prefix. `SamplingParams.seed` is set per request (`seed + prompt index`), so results do not depend
on batch composition; vLLM does not promise bitwise-identical results across GPUs or versions.
"""

from __future__ import annotations

from typing import Any

from halos_core.artefact_spec import Generator, SamplingParams
from halos_core.feedback.records import Turn
from halos_core.generation import cut_at_stop


class VLLMEngine:
    name = "vllm"

    def __init__(self, generator: Generator, params: SamplingParams):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.lora = None
        if generator.adapter_path is not None:
            from vllm.lora.request import LoRARequest

            model_dir = generator.base_path or generator.model_path
            self.lora = LoRARequest("checkpoint", 1, generator.adapter_path)
            self.llm = LLM(model=model_dir, enable_lora=True, seed=params.seed)
        else:
            model_dir = generator.model_path
            self.llm = LLM(model=model_dir, seed=params.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def generate(self, prompts: list[list[Turn]], params: SamplingParams, batch_index: int) -> list[list[str]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        from halos_core.generation.hf import render

        inputs: list[Any] = [
            TokensPrompt(prompt_token_ids=render(self.tokenizer, p, params.max_prompt_length)) for p in prompts
        ]
        first = batch_index * params.batch_size
        sampling = [
            VSamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=params.seed + first + i,
                stop=list(params.stop) or None,
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate(inputs, sampling, lora_request=self.lora, use_tqdm=False)
        return [[cut_at_stop(c.text, params.stop) for c in out.outputs] for out in outs]

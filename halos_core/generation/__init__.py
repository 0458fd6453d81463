"""Sampling engines: batched transformers `generate` (CPU and GPU; what CI tests) and vLLM (an
optional extra, `pip install halos-server[vllm]`, used when it is installed and a GPU is present).

    engine = pick(params.engine)            # "hf" | "vllm"
    texts = engine.generate(prompts, params) # n completions per prompt, in prompt order

Both take chat prompts (lists of turns), render them with the model's chat template (with the
generation prompt) and return the completion text cut at the first stop string.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

from halos_core.artefact_spec import Generator, SamplingParams
from halos_core.feedback.records import Turn


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[list[Turn]], params: SamplingParams, batch_index: int) -> list[list[str]]:
        """`params.n` completions per prompt."""
        ...


def vllm_usable() -> bool:
    """vLLM is installed and a CUDA device is present (vLLM has no CPU path we support)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pick(choice: str) -> str:
    """The engine for `choice` ("auto" | "hf" | "vllm"); asking for vLLM where it cannot run is an error."""
    if choice == "hf":
        return "hf"
    if choice == "vllm":
        if not vllm_usable():
            raise RuntimeError(
                "engine 'vllm' was asked for but vLLM is not installed or no GPU is present "
                "(pip install halos-server[vllm] on a GPU worker, or use engine 'auto'/'hf')"
            )
        return "vllm"
    return "vllm" if vllm_usable() else "hf"


def build(generator: Generator, params: SamplingParams) -> Engine:
    name = pick(params.engine)
    if name == "vllm":
        from halos_core.generation.vllm_engine import VLLMEngine

        return VLLMEngine(generator, params)
    from halos_core.generation.hf import HFEngine

    return HFEngine(generator)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    end = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < end:
            end = i
    return text[:end]

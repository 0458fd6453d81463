"""LoRA (PEFT) rounds: adapters on the SFT model, whose adapters-disabled self is the reference.

- The policy is the SFT model at `reference_path` (frozen) with LoRA adapters (`LoraSettings`);
  only the adapters (and a head, if the loss has one) are trained and held by the optimizer.
- The reference is the SAME module with its adapters disabled (`peft`'s `disable_adapter()`):
  no second copy of the model is loaded. The frozen base never changes, so this is exactly the
  SFT model for the whole run.
- Checkpoints (intermediate and `final/`) hold the adapters in `adapter/` (`adapter_config.json`
  + `adapter_model.safetensors`, loadable with `PeftModel.from_pretrained(base, ckpt/"adapter")`)
  plus the optimizer/scheduler state; a later round (or a retry) rebuilds the policy from the SFT
  model and these adapters.
- With `merge_on_export`, `final/` also holds the merged weights (`W + scale * B @ A`) as a plain
  HF checkpoint (`config.json` + `model.safetensors`), loadable with
  `AutoModelForCausalLM.from_pretrained(final)`; the merge is computed on copies, the training
  model is not modified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from halos_core.config import LoraSettings, lora_structure
from halos_core.run_dir import CheckpointError

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"


def structure(settings: LoraSettings) -> dict[str, Any]:
    """The settings that decide the adapters' shapes and scale (what a restore must match)."""
    return lora_structure(settings)  # torch-free, so the server checks a round's parent at submit time


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze `model` and wrap it with fresh LoRA adapters (a `peft.PeftModel`)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. no module matches target_modules
        raise ValueError(f"LoRA settings do not fit the model: {exc}") from exc


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`model` as the reference: adapters off and eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's saved names (adapter name stripped), on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def write_adapter(model: nn.Module, directory: Path) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` into `directory` (PEFT's layout)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))
    save_file(adapter_state_dict(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(model: nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint's adapters into `model`; every adapter tensor must be present and used."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(checkpoint) / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} holds no LoRA adapters ({ADAPTER_DIR}/{ADAPTER_WEIGHTS})")
    saved = load_file(str(file))
    expected = set(adapter_state_dict(model))
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise CheckpointError(
            f"checkpoint {checkpoint}: adapters do not match this run's LoRA settings "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'…' if len(extra) > 3 else ''})"
        )
    result = set_peft_model_state_dict(model, saved)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"checkpoint {checkpoint}: adapter tensors not used: {result.unexpected_keys[:3]}")


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA delta added (`W + scale * B @ A`), under the
    base model's own names; the live model is left as it is (nothing merged in place)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in getattr(module, "lora_A", {}):
            deltas[f"{name}.weight"] = module.get_delta_weight(ADAPTER_NAME)
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or "lora_embedding" in key or "lora_magnitude" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        if plain in deltas:
            value = (value.float() + deltas.pop(plain).float()).to(value.dtype)
        out[plain] = value.detach().to("cpu").contiguous()
    if deltas:
        raise RuntimeError(f"LoRA deltas without a base weight: {sorted(deltas)[:3]}")
    return out


def base_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PEFT model (with the LoRA layers injected)."""
    return model.get_base_model()

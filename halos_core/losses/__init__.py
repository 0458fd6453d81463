"""The alignment losses, one small unit per loss; their declarations are in `halos_core.loss_registry`.

    from halos_core.losses import build_loss, LossOutput
    loss = build_loss(loss_config, hyperparams)   # a registry LossConfig (or its dict) + Hyperparams
    out = loss.compute(**loss.inputs(forward, microbatch, train=True))
    out.loss.backward(); out.values                # scalar; dict of detached diagnostics

Each loss class is found through its declaration's `implementation` ("module:Class"), so adding a
loss never touches this file. No trainer logic lives here. This package imports torch: the
torch-free server/worker must not import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter

from halos_core.config import Hyperparams
from halos_core.loss_registry import LOSSES, LossConfig, LossSpec, loss_spec

from .base import Forward, Loss, LossOutput, PairedLoss, TargetLoss

_LOSS_CONFIG: TypeAdapter[Any] = TypeAdapter(LossConfig)


def loss_class(spec: LossSpec) -> type[Loss[Any]]:
    """The implementation a declaration names (`halos_core.losses.<module>:<Class>`)."""
    module, _, attr = spec.implementation.partition(":")
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    if not (isinstance(cls, type) and issubclass(cls, Loss)) or cls.spec is not spec:
        raise TypeError(f"{spec.implementation} is not the implementation of loss {spec.name!r}")
    return cls


def build_loss(loss_config: Any, hyperparams: Hyperparams | Mapping[str, Any] | None = None) -> Loss[Any]:
    """Build the loss object for a LossConfig (a model, or a dict such as {"name": "dpo", "beta": 0.1}).

    Raises ValueError for an unknown loss name or invalid parameters.
    """
    if isinstance(loss_config, Mapping):
        loss_spec(str(loss_config.get("name")))  # unknown names: one clear error, not the union's
        loss_config = _LOSS_CONFIG.validate_python(dict(loss_config))
    cls = loss_class(loss_spec(getattr(loss_config, "name", None) or ""))
    if isinstance(hyperparams, Mapping):
        hyperparams = Hyperparams.model_validate(dict(hyperparams))
    return cls(loss_config, hyperparams)


def all_loss_classes() -> dict[str, type[Loss[Any]]]:
    """Every declared loss's implementation, by name (imports them all)."""
    return {name: loss_class(spec) for name, spec in LOSSES.items()}


__all__ = [
    "Forward",
    "Loss",
    "LossOutput",
    "PairedLoss",
    "TargetLoss",
    "all_loss_classes",
    "build_loss",
    "loss_class",
]

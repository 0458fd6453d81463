"""The alignment losses (HALOs' menu), one small unit per loss, registered by name.

    from halos_core.losses import build_loss, LossOutput
    loss = build_loss(loss_config, hyperparams)   # a halos_core.config LossConfig (or its dict) + Hyperparams
    out = loss.compute(**tensors)                  # keyword tensors, see each module's docstring
    out.loss.backward(); out.values                # scalar; dict of detached diagnostics

Each loss exposes `name`, `data_kind` (= halos_core.config.LOSS_DATA_KIND[name]) and
`needs_reference`. No trainer logic lives here. This package imports torch: the torch-free
server/worker must not import it.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import TypeAdapter

from halos_core.config import Hyperparams, LossConfig

from .base import Loss, LossOutput, PairedLoss
from .bradley_terry import BradleyTerry
from .cdpo import CDPO
from .csft import CSFT
from .dpo import DPO
from .grpo import GRPO, group_advantages
from .humanline import Humanline
from .ipo import IPO
from .kto import KTO
from .ppo import PPO
from .sft import SFT
from .simpo import SimPO
from .slic import SLiC

LOSS_REGISTRY: dict[str, type[Loss]] = {
    cls.name: cls for cls in (SFT, CSFT, DPO, CDPO, IPO, SimPO, SLiC, KTO, GRPO, BradleyTerry, PPO)
}

_LOSS_CONFIG = TypeAdapter(LossConfig)


def build_loss(loss_config: Any, hyperparams: Hyperparams | Mapping[str, Any] | None = None) -> Loss:
    """Build the loss object for a LossConfig (a model, or a dict such as {"name": "dpo", "beta": 0.1}).

    Raises ValueError for an unknown loss name or invalid parameters.
    """
    if isinstance(loss_config, Mapping):
        loss_config = _LOSS_CONFIG.validate_python(dict(loss_config))
    name = getattr(loss_config, "name", None)
    try:
        cls = LOSS_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSS_REGISTRY)}") from None
    if isinstance(hyperparams, Mapping):
        hyperparams = Hyperparams.model_validate(dict(hyperparams))
    return cls(loss_config, hyperparams)


__all__ = [
    "LOSS_REGISTRY",
    "BradleyTerry",
    "CDPO",
    "CSFT",
    "DPO",
    "GRPO",
    "Humanline",
    "IPO",
    "KTO",
    "Loss",
    "LossOutput",
    "PPO",
    "PairedLoss",
    "SFT",
    "SLiC",
    "SimPO",
    "build_loss",
    "group_advantages",
]

"""FSDP (accelerate's FSDP2 plugin): the accelerator, and complete checkpoints of a sharded run.

Under FSDP every rank holds a shard of each parameter and of its Adam moments. A checkpoint must
still hold the WHOLE state (not rank 0's shard), in the same layout as a DDP or single-process
checkpoint, so that any checkpoint resumes under any process count and either strategy:

- `gather_full_state(model, optimizer)` (a collective: every rank calls it) returns the full,
  unsharded model state dict and the full optimizer state, on rank 0 (CPU); other ranks get
  empty dicts. The optimizer state is converted from the FQN-keyed layout of
  `torch.distributed.checkpoint.state_dict` to `optimizer.state_dict()`'s index-keyed layout
  (`index_keyed`), which is what `optimizer.pt` holds in every checkpoint.
- `load_full_optimizer_state(model, optimizer, state, names)` (a collective) restores such an
  index-keyed state, read by every rank from `optimizer.pt`, into the sharded optimizer: every
  rank keeps its own slice of each moment (`set_optimizer_state_dict`, `full_state_dict=True`).

`build_accelerator` creates the `Accelerator`; on CPU it also honours an FSDP launch
(`ACCELERATE_USE_FSDP=true`, set by `accelerate launch` for `distributed_type: FSDP`): accelerate
1.15 only selects FSDP for accelerator devices and silently falls back to `MULTI_CPU` (i.e. DDP)
otherwise, while FSDP2's `fully_shard` itself runs on a CPU device mesh over gloo. So on CPU
(tests, CI) the same accelerate FSDP2 code path (`Accelerator.prepare` -> `fsdp2_prepare_model`,
`clip_grad_norm_`, `no_sync`) is used as on GPUs.

Supported: FSDP2 (`fsdp_version: 2`), full-weight training, with or without a reward/value head.
Refused at trainer start (`check_supported`): FSDP1 (the trainer calls the unwrapped module for
no-grad passes, which FSDP1's flat parameters do not allow), LoRA (the reference pass calls the
base model with adapters disabled outside the root module's forward, and the adapter export reads
unsharded parameters).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

log = logging.getLogger("halos_core.sharded")

FSDP_ENV = "ACCELERATE_USE_FSDP"


class UnsupportedSharding(ValueError):
    """The run asks for a sharding setup the trainer does not support (raised before any training)."""


def fsdp_requested() -> bool:
    """`accelerate launch` with `distributed_type: FSDP` exports ACCELERATE_USE_FSDP=true to every rank."""
    return os.environ.get(FSDP_ENV, "false").strip().lower() in ("1", "true", "yes")


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def build_accelerator(*, cpu: bool, gradient_accumulation_steps: int, mixed_precision: str) -> Any:
    """The trainer's `Accelerator`; an FSDP launch on CPU gets FSDP over gloo (see the module doc)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if fsdp_requested():
        # transformers' `from_pretrained` leaves the weights of ranks > 0 on the meta device when
        # this is on (rank 0 broadcasts them at `prepare`); the frozen reference is never prepared,
        # so it would stay empty there. Every rank loads the weights instead.
        _no_ram_efficient_loading()
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
        _fsdp_on_cpu(accelerator)
    if is_fsdp(accelerator):
        _no_ram_efficient_loading(accelerator.state.fsdp_plugin)
    return accelerator


def _no_ram_efficient_loading(plugin: Any = None) -> None:
    if plugin is not None and plugin.cpu_ram_efficient_loading:
        log.warning(
            "FSDP cpu_ram_efficient_loading is turned off: every rank loads the weights (see halos_core.sharded)"
        )
        plugin.cpu_ram_efficient_loading = False
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def _fsdp_on_cpu(accelerator: Any) -> None:
    """Turn a MULTI_CPU (gloo) accelerator into an FSDP one, with the plugin read from the launch env."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # FSDP_* variables exported by `accelerate launch`
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_supported(accelerator: Any, *, lora: bool) -> None:
    """Refuse, before any weights are read, a sharded setup the trainer cannot train or checkpoint."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise UnsupportedSharding("DeepSpeed is not supported; use DDP or FSDP (fsdp_version: 2)")
    if kind != DistributedType.FSDP:
        return
    version = accelerator.state.fsdp_plugin.fsdp_version
    if version != 2:
        raise UnsupportedSharding(
            f"FSDP version {version} is not supported; set fsdp_version: 2 in accelerate.yaml (FSDP2)"
        )
    if lora:
        raise UnsupportedSharding(
            "LoRA with FSDP is not supported: train LoRA with DDP (settings.fsdp off), or full weights with FSDP"
        )


def configure_wrapping(accelerator: Any, lm: torch.nn.Module) -> None:
    """Shard every decoder layer as its own FSDP unit: the model `prepare` sees is the trainer's
    `TokenLogprobModel` wrapper, which has no `_no_split_modules`; take the LM's."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:
        names = list(getattr(lm, "_no_split_modules", None) or [])
        if names:
            plugin.transformer_cls_names_to_wrap = names


# --------------------------------------------------------------------------- state layouts


def param_names_in_order(state: Mapping[str, Any]) -> list[str]:
    return [name for group in state["param_groups"] for name in group["params"]]


def index_keyed(state: Mapping[str, Any]) -> dict[str, Any]:
    """An FQN-keyed optimizer state (`torch.distributed.checkpoint.state_dict`) in the layout of
    `optimizer.state_dict()`: parameters numbered in param-group order."""
    if not state:
        return {}
    index = {name: i for i, name in enumerate(param_names_in_order(state))}
    unknown = set(state["state"]) - set(index)
    if unknown:
        raise ValueError(f"optimizer state for parameters outside its param groups: {sorted(unknown)[:5]}")
    return {
        "state": {
            index[name]: dict(entry) for name, entry in sorted(state["state"].items(), key=lambda kv: index[kv[0]])
        },
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]],
    }


def fqn_keyed(state: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The inverse of `index_keyed`: `names` are the parameters' FQNs in the optimizer's order."""
    names = list(names)
    ids = [i for group in state["param_groups"] for i in group["params"]]
    if sorted(int(i) for i in ids) != list(range(len(names))):
        raise ValueError(f"optimizer state numbers {len(ids)} parameters, this optimizer has {len(names)}")
    return {
        "state": {names[int(i)]: dict(entry) for i, entry in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[int(i)] for i in group["params"]]} for group in state["param_groups"]
        ],
    }


# --------------------------------------------------------------------------- collectives


def _raw(optimizer: Any) -> torch.optim.Optimizer:
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def gather_full_state(
    model: torch.nn.Module, optimizer: Any, *, with_optimizer: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full model state dict and full index-keyed optimizer state, on rank 0's CPU ({} elsewhere).

    A collective: every rank must call it (the shards are all-gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not with_optimizer:
        return get_model_state_dict(model, options=options), {}
    model_state, optim_state = get_state_dict(model, _raw(optimizer), options=options)
    return model_state, index_keyed(optim_state)


def gather_optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Full index-keyed optimizer state on rank 0 ({} elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return index_keyed(get_optimizer_state_dict(model, _raw(optimizer), options=options))


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: Any, state: Mapping[str, Any], names: Sequence[str]
) -> None:
    """Restore a full index-keyed optimizer state (every rank passes the same one) into the
    sharded optimizer; each rank keeps its slice. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, _raw(optimizer), fqn_keyed(state, names), options=StateDictOptions(full_state_dict=True)
    )


def describe(model: torch.nn.Module) -> dict[str, int]:
    """How the model is sharded on this rank: FSDP units, and parameter elements held locally vs in total."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    units = sum(1 for m in model.modules() if isinstance(m, FSDPModule))
    return {"units": units, "local_numel": local, "numel": total}


def to_plain(value: Any) -> Any:
    """A DTensor (e.g. FSDP2's grad norm) as a plain tensor; anything else unchanged."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return value
    return value.full_tensor() if isinstance(value, DTensor) else value

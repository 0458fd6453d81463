"""Writing a round's checkpoints: what goes into one, for each way the policy is trained.

- full weights, one process or DDP: the policy's state dict (every rank joins the gather) and
  `optimizer.state_dict()` (complete on every rank under DDP);
- LoRA: the adapters (+ their config); `final/` also gets the merged weights when
  `merge_on_export`, so it loads with a plain `from_pretrained`;
- FSDP2: every rank joins the all-gather of the full weights and the COMPLETE optimizer state
  (`halos_core.sharded.gather_full_state`), rank 0 writes them in the same layout as DDP, so any
  strategy resumes any other.

A head (reward/value) is saved as `head.safetensors` beside the model. `trainer_state.json` records
where the round stands and what it trains (`halos_core.compat` reads `lora`/`head`/`loss` back).
The file mechanics (temp dir, fsync, manifest last, rename) are `halos_core.checkpoint`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from halos_core.checkpoint import SaveRequest, save_checkpoint
from halos_core.config import lora_structure
from halos_core.heads import HEAD_FILE
from halos_core.lora import ADAPTER_DIR, ADAPTER_NAME, ADAPTER_WEIGHTS, adapter_state_dict, merged_state_dict
from halos_core.run_dir import Manifest
from halos_core.sharded import gather_full_state

if TYPE_CHECKING:
    from halos_core.training.loop import Trainer


def trainer_state(trainer: Trainer, kind: str) -> dict[str, Any]:
    loader, head = trainer.train_loader, trainer.head()
    return {
        "kind": kind,
        "job_id": trainer.config.job_id,
        "step": trainer.global_step(),
        "examples": trainer.global_examples(),
        "round_step": trainer.round_step,
        "data_position": trainer.round_examples(),
        "epoch": trainer.round_step / loader.steps_per_epoch,
        "total_steps": loader.total_steps,
        "batch_size": trainer.hp.batch_size,
        "seed": trainer.hp.seed,
        "loss": trainer.loss.name,
        "reference_sha256": trainer.reference_sha256,
        "init_from": trainer.config.init_from,
        "lr": trainer.scheduler.get_last_lr()[0],
        "restored": trainer.restored.model_dump(mode="json", by_alias=True) if trainer.restored else None,
        "reference_param_digest": trainer.reference_param_digest,
        "lora": lora_structure(trainer.lora) if trainer.lora is not None else None,
        "head": head.describe() if head is not None else None,
        "optimizer_params": trainer.optimizer_params,
    }


def _split_lm_and_head(full: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The wrapper's state dict (`lm.*`, `head.*`) as the LM's and the head's own."""
    lm = {k[len("lm.") :]: v for k, v in full.items() if k.startswith("lm.")}
    head = {k[len("head.") :]: v for k, v in full.items() if k.startswith("head.")}
    return lm, head


def save(trainer: Trainer, target: Path, kind: str) -> Manifest:
    """Write `target` (an intermediate `step-N` or `final`) atomically; a collective on every rank."""
    acc = trainer.accelerator
    inner = acc.unwrap_model(trainer.model)
    tensor_files: dict[str, dict[str, torch.Tensor]] = {}
    writers: list[Callable[[Path], Any]] = []
    model: Any = None
    state_dict: dict[str, torch.Tensor] | None = None
    head_state: dict[str, torch.Tensor] | None = None
    if trainer.sharded:
        full, optimizer_state = gather_full_state(trainer.model, trainer.optimizer)
        state_dict, head_state = _split_lm_and_head(full)
        model = inner.lm
    elif trainer.lora is not None:
        optimizer_state = trainer.optimizer.state_dict()
        lm = inner.lm
        if acc.is_main_process:
            tensor_files[f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"] = adapter_state_dict(lm)
            writers.append(lambda d: lm.peft_config[ADAPTER_NAME].save_pretrained(str(d / ADAPTER_DIR)))
            if kind == "final" and trainer.lora.merge_on_export:
                model, state_dict = lm.get_base_model(), merged_state_dict(lm)
    else:
        optimizer_state = trainer.optimizer.state_dict()
        state_dict, _ = _split_lm_and_head(acc.get_state_dict(trainer.model))  # every rank joins
        model = inner.lm
    if inner.head is not None:
        tensor_files[HEAD_FILE] = head_state if head_state is not None else dict(inner.head.state_dict())
    request = SaveRequest(
        model=model,
        tokenizer=trainer.tokenizer,
        optimizer_state=optimizer_state,
        scheduler_state=trainer.scheduler.state_dict(),
        trainer_state=trainer_state(trainer, kind),
        state_dict=state_dict,
        tensor_files=tensor_files,
        writers=writers,
    )
    extra = {
        "kind": kind,
        "job_id": trainer.config.job_id,
        "round_step": trainer.round_step,
        "total_steps": trainer.train_loader.total_steps,
        "reference_sha256": trainer.reference_sha256,
        "parent": trainer.config.init_from,
        "lora": trainer.lora is not None,
        "merged": model is not None and trainer.lora is not None,
        "head": inner.head.kind if inner.head is not None else None,
    }
    return save_checkpoint(
        target,
        request,
        process_index=acc.process_index,
        num_processes=acc.num_processes,
        barrier=acc.wait_for_everyone,
        manifest_extra=extra,
    )

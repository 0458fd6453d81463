"""Atomic, verified checkpoints (intermediate `checkpoints/step-XXXXXX/` and `final/`).

Layout of a checkpoint directory (see `halos_core.run_dir`):

    config.json, model.safetensors, generation_config.json   policy (HF save_pretrained, safetensors);
                      LoRA: only in final/ and only merged (`merge_on_export`)
    adapter/          LoRA runs: adapter_config.json + adapter_model.safetensors (`halos_core.lora`)
    head.safetensors  bradley_terry / ppo: the reward or value head (`halos_core.heads`)
    tokenizer files                                           (HF save_pretrained)
    optimizer.pt      optimizer.state_dict() (complete: DDP keeps the full state on every rank;
                      FSDP gathers it from the shards, same index-keyed layout: `halos_core.sharded`)
    scheduler.pt      LR scheduler state_dict()
    rng.pt            python / numpy / torch (/ cuda) RNG states of rank 0
    rng-rank<N>.pt    the same for every other rank (multi-process runs)
    trainer_state.json  step, examples, round_step, data_position, epoch, total_steps, ...
    meta.json         LAST: per-file sha256 (`run_dir.write_manifest`)

Saving writes everything into `<parent>/.tmp-<name>`, fsyncs every file, writes the manifest
last, then renames the directory into place (an existing directory of the same name, e.g. a
`final/` from a crashed attempt, is moved aside first and deleted after). Loading refuses a
directory whose manifest is missing or does not match (`CheckpointError`) before opening any
file, and opens every `.pt` with `torch.load(..., weights_only=True)`: a pickle that would run
code is refused, not executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from halos_core.run_dir import (
    CHECKPOINT_PREFIX,
    TMP_PREFIX,
    CheckpointError,
    Manifest,
    RunDir,
    fsync_dir,
    read_manifest,
    write_manifest,
)

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
DEFAULT_KEEP_LAST = 2


def rng_file(rank: int) -> str:
    return RNG_FILE if rank == 0 else f"rng-rank{rank}.pt"


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch RNG states in a form `torch.load(weights_only=True)` accepts."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in sorted({p.parent for p in directory.rglob("*")} | {directory}):
        fsync_dir(path)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class SaveRequest:
    """What goes into a checkpoint. `state_dict` is the full model state (gathered if sharded).

    `model` None writes no full weights (a LoRA intermediate checkpoint: adapters only).
    `tensor_files` maps a relative path to tensors written with safetensors (a head, adapters);
    `writers` are called with the temporary directory to add other files (adapter config). All
    of them are written before the manifest, so they are covered by it.
    """

    model: Any  # unwrapped HF PreTrainedModel, or None
    tokenizer: Any
    optimizer_state: dict | None
    scheduler_state: dict | None
    trainer_state: dict[str, Any]
    state_dict: dict[str, torch.Tensor] | None = None
    tensor_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    writers: list[Callable[[Path], None]] = field(default_factory=list)


def save_checkpoint(
    target: str | Path,
    request: SaveRequest,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    barrier: Callable[[], None] = lambda: None,
    manifest_extra: dict[str, Any] | None = None,
) -> Manifest | None:
    """Write a complete checkpoint at `target` atomically. Every process must call this.

    Returns the manifest on the main process, None elsewhere.
    """
    target = Path(target)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}"
    main = process_index == 0
    if main:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    try:
        manifest = _write_and_publish(target, tmp, request, main, process_index, num_processes, barrier, manifest_extra)
    except BaseException:
        # ENOSPC (or any failure) half-way: the temp directory goes, `target` and every other
        # checkpoint are as they were (the rename into place is the last step)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return manifest


def _write_and_publish(
    target: Path,
    tmp: Path,
    request: SaveRequest,
    main: bool,
    process_index: int,
    num_processes: int,
    barrier: Callable[[], None],
    manifest_extra: dict[str, Any] | None,
) -> Manifest | None:
    # every rank's RNG (rank 0's in rng.pt)
    _torch_save(capture_rng(), tmp / rng_file(process_index))
    barrier()
    manifest = None
    if main:
        state = request.trainer_state
        if request.model is not None:
            request.model.save_pretrained(tmp, state_dict=request.state_dict, safe_serialization=True)
        if request.tensor_files:
            from safetensors.torch import save_file

            for rel, tensors in request.tensor_files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
                save_file(cpu, str(tmp / rel), metadata={"format": "pt"})
        for write in request.writers:
            write(tmp)
        if request.tokenizer is not None:
            request.tokenizer.save_pretrained(tmp)
        if request.optimizer_state is not None:
            _torch_save(request.optimizer_state, tmp / OPTIMIZER_FILE)
        if request.scheduler_state is not None:
            _torch_save(request.scheduler_state, tmp / SCHEDULER_FILE)
        with open(tmp / STATE_FILE, "w") as fh:
            json.dump({**state, "num_processes": num_processes}, fh, indent=2, sort_keys=True)
        _fsync_tree(tmp)
        write_manifest(tmp, int(state["step"]), int(state["examples"]), **(manifest_extra or {}))
        aside = target.parent / f"{TMP_PREFIX}old-{target.name}"
        if target.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(target, aside)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        manifest = read_manifest(target, verify=False)
    return manifest


def prune_checkpoints(run_dir: RunDir, keep_last: int = DEFAULT_KEEP_LAST) -> list[Path]:
    """Delete complete intermediate checkpoints beyond the newest `keep_last` (at least one kept).

    Call only after a new checkpoint is complete, so the previous complete one is never deleted
    before its successor exists. Partial directories are left to `RunDir.clean_partial_checkpoints`.
    """
    keep_last = max(1, keep_last)
    complete = run_dir.complete_checkpoints(verify=False)
    removed = []
    for manifest in complete[:-keep_last]:
        shutil.rmtree(manifest.path, ignore_errors=True)
        removed.append(manifest.path)
    return removed


# --------------------------------------------------------------------------- load


@dataclass
class LoadedCheckpoint:
    path: Path
    manifest: Manifest
    trainer_state: dict[str, Any]
    optimizer_state: dict | None
    scheduler_state: dict | None
    rng_state: dict | None


def safe_torch_load(path: Path, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`; a refused or broken pickle becomes a CheckpointError.
    `mmap`: tensors map the file instead of being read into memory (optimizer.pt: every rank reads
    the full state and keeps only its shard; its pages are touched only where copied)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: refused to load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc


def load_checkpoint(path: str | Path, *, process_index: int = 0, need_optimizer: bool = True) -> LoadedCheckpoint:
    """Verify the manifest (sha256 of every file) first, then load the non-weight state.

    The policy weights are loaded by the caller with `from_pretrained(path)` (safetensors) after
    this returned, i.e. after verification.
    """
    path = Path(path)
    manifest = read_manifest(path, verify=True)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is missing")
    trainer_state = json.loads(state_path.read_text())
    for name in (OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE):
        if (path / name).is_file() and name not in manifest.files:
            raise CheckpointError(f"checkpoint {path}: {name} is not covered by the manifest")

    def load(name: str, required: bool) -> Any:
        file = path / name
        if not file.is_file():
            if required:
                raise CheckpointError(f"checkpoint {path}: {name} is missing")
            return None
        return safe_torch_load(file, mmap=name == OPTIMIZER_FILE)

    optimizer_state = load(OPTIMIZER_FILE, need_optimizer)
    scheduler_state = load(SCHEDULER_FILE, need_optimizer)
    rng_state = load(rng_file(process_index), False)
    if rng_state is None and process_index != 0:
        rng_state = None  # a different process count than the saving run: leave this rank's RNG as seeded
    return LoadedCheckpoint(path, manifest, trainer_state, optimizer_state, scheduler_state, rng_state)


# --------------------------------------------------------------------------- digests (proofs)


def _hash_value(digest: hashlib._Hash, value: Any) -> None:
    """Feed one state value canonically: a tensor as dtype, shape and raw bytes (from CPU,
    contiguous), anything else (a Python number, None) as its type and repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"tensor:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}:".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(f"{type(value).__name__}:{value!r}".encode())
    digest.update(b";")


def optimizer_state_digest(state_dict: Mapping[str, Any]) -> str:
    """sha256 of the per-parameter state of an optimizer `state_dict()` (Adam moments, step...).

    Only the `state` part is hashed (param_groups carry this round's lr/weight decay, which a
    round may override): for each parameter index in numeric order, each key in sorted order,
    the key, then the tensor's dtype, shape and bytes. The same values give the same digest
    whether the dict comes from `torch.load(optimizer.pt, weights_only=True)` or from a live
    optimizer's `state_dict()` (on any device).
    """
    digest = hashlib.sha256(b"optimizer-state-v1\n")
    state = state_dict.get("state", {})
    for idx in sorted(state, key=lambda k: (0, int(k)) if str(k).lstrip("-").isdigit() else (1, str(k))):
        digest.update(f"param:{idx}\n".encode())
        entry = state[idx]
        for key in sorted(entry):
            digest.update(f"{key}=".encode())
            _hash_value(digest, entry[key])
    return digest.hexdigest()


def optimizer_step_count(state_dict: Mapping[str, Any]) -> int:
    """The Adam step count held in an optimizer state (0 for a fresh optimizer).

    Every parameter of one optimizer has the same count; a disagreement is an error."""
    steps = {int(entry["step"]) for entry in state_dict.get("state", {}).values() if "step" in entry}
    if len(steps) > 1:
        raise ValueError(f"optimizer state has parameters at different step counts: {sorted(steps)}")
    return steps.pop() if steps else 0


def named_tensors(source: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor as a safetensors file of this model holds them.

    A module gives its `state_dict()` minus the entries that alias an earlier one (tied weights:
    `save_pretrained` keeps the first, e.g. `model.embed_tokens.weight`, and drops `lm_head.weight`).
    """
    if not isinstance(source, torch.nn.Module):
        return dict(source)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    for name, tensor in source.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def param_digest(source: Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """sha256 over sorted names, each with its tensor's dtype, shape and bytes.

    Accepts `safetensors.torch.load_file(...)`'s dict, a `state_dict()`, or a module (see
    `named_tensors`), so the weights in memory can be checked against a file on disk.
    """
    digest = hashlib.sha256(b"params-v1\n")
    tensors = named_tensors(source)
    for name in sorted(tensors):
        digest.update(f"{name}=".encode())
        _hash_value(digest, tensors[name])
    return digest.hexdigest()


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"

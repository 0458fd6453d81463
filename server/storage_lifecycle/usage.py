"""Disk accounting, admission of rounds, and the reference log-prob cache's LRU cap.

Usage is measured on disk (not taken from the rows), per project and kind: what an operator with
a full disk needs is where the bytes are, including bytes a row no longer explains (`halos fsck`
lists those). Content-addressed blobs shared by several rows are counted once per project.

Admission: a round's output is estimated from its model's weights (bytes and dtype in
config.json): a full-weight checkpoint holds the weights in fp32 plus AdamW's two fp32 moments
(12 bytes per parameter); a LoRA round's final holds the merged weights (or only adapters), its
intermediates only adapters. The final plus `INTERMEDIATE_KEPT` intermediates (when
`checkpoint_every` is set), plus the estimates of the rounds queued or waiting before it, must fit
in the free space minus `storage_reserve_bytes`: else the API refuses the round with 507. The
worker re-checks the round alone before launching it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from halos_client.models import UsageOut
from halos_core.job_spec import JobSpec
from halos_core.run_dir import RunDir
from server.errors import InsufficientStorage
from server.models import PENDING_STATUSES, Checkpoint, FeedbackFile, Job, PromptSet, Run
from server.settings import Settings
from server.storage_lifecycle import files

log = logging.getLogger("halos.storage")

INTERMEDIATE_KEPT = 2  # halos_core.checkpoint.DEFAULT_KEEP_LAST: intermediates kept while a round trains
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_LORA_FRACTION = 0.05  # adapters are a few percent of the weights at most for the ranks people use


# --------------------------------------------------------------------------- admission


def weights_bytes(model_path: Path) -> tuple[int, int]:
    """(bytes of the model's weight files, bytes per parameter from config.json's torch_dtype)."""
    total = 0
    if model_path.is_dir():
        for entry in model_path.iterdir():
            if entry.is_file() and entry.name.endswith(_WEIGHT_SUFFIXES):
                total += entry.stat().st_size
    dtype_bytes = 4
    try:
        config = json.loads((model_path / "config.json").read_text())
        dtype_bytes = _DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or ""), 4)
    except (OSError, ValueError, AttributeError):
        pass
    return total, dtype_bytes


def estimate_round_bytes(spec: JobSpec) -> int:
    """Bytes a round's checkpoints will take at their peak (final + intermediates kept)."""
    weights, dtype_bytes = weights_bytes(Path(spec.reference_path))
    params = weights // dtype_bytes
    full = params * 12  # fp32 weights + AdamW exp_avg + exp_avg_sq (fp32)
    intermediates = INTERMEDIATE_KEPT if spec.hyperparams.checkpoint_every else 0
    if spec.lora is None:
        return full * (1 + intermediates)
    adapters = int(params * 12 * _LORA_FRACTION)
    final = adapters + (weights if spec.lora.merge_on_export else 0)
    return final + adapters * intermediates


def admission_problem(spec: JobSpec, settings: Settings, pending_bytes: int = 0) -> dict[str, Any] | None:
    """None when the round fits (with `pending_bytes` promised to rounds not started yet), else the
    figures of why not."""
    if not settings.storage_admission:
        return None
    estimate = estimate_round_bytes(spec)
    free = files.free_bytes(settings.data_dir)
    if estimate + pending_bytes <= free - settings.storage_reserve_bytes:
        return None
    return {
        "estimated_bytes": estimate,
        "pending_bytes": pending_bytes,
        "free_bytes": free,
        "reserve_bytes": settings.storage_reserve_bytes,
        "data_dir": str(settings.data_dir),
    }


def pending_round_bytes(session: Session) -> int:
    """Estimated output of every round that has not started yet (waiting / queued, all projects:
    they share the disk). Running rounds are not counted: what they write is on disk already."""
    total = 0
    specs = session.exec(select(Job.spec).where(Job.kind == "round", col(Job.status).in_(list(PENDING_STATUSES)))).all()
    for spec in specs:
        try:
            total += estimate_round_bytes(JobSpec.model_validate(spec))
        except ValueError:  # a spec no version of this code writes: the worker fails that job
            continue
    return total


def check_admission(session: Session, spec: JobSpec, settings: Settings) -> None:
    """507 `insufficient_storage` at submit time."""
    if not settings.storage_admission:
        return
    problem = admission_problem(spec, settings, pending_round_bytes(session))
    if problem is not None:
        raise InsufficientStorage(
            f"the round's checkpoints need about {problem['estimated_bytes']} bytes (and rounds not started yet "
            f"{problem['pending_bytes']}) but the data dir has {problem['free_bytes']} free and keeps "
            f"{problem['reserve_bytes']} in reserve (HALOS_STORAGE_RESERVE_BYTES); free space: apply retention "
            "(POST /v1/runs/{id}/retention/apply), delete runs or feedback, or see GET /v1/usage",
            details=problem,
        )


def launch_problem(spec: JobSpec, settings: Settings) -> str | None:
    """The worker's re-check right before it starts a round (the disk may have filled since submit)."""
    problem = admission_problem(spec, settings)
    if problem is None:
        return None
    return (
        f"insufficient storage: the round's checkpoints need about {problem['estimated_bytes']} bytes, "
        f"{problem['free_bytes']} free with {problem['reserve_bytes']} kept in reserve on {problem['data_dir']}"
    )


# --------------------------------------------------------------------------- usage


def _blob_bytes(data_dir: Path, paths: set[str]) -> int:
    total = 0
    for stored in paths:
        try:
            total += files.resolve(data_dir, stored).stat().st_size
        except OSError:
            continue
    return total


def project_usage(session: Session, settings: Settings, project_id: str) -> dict[str, Any]:
    data_dir = settings.data_dir
    feedback = session.exec(
        select(FeedbackFile.storage_path, FeedbackFile.deleted_at).where(FeedbackFile.project_id == project_id)
    ).all()
    live_fb = {p for p, deleted in feedback if deleted is None}
    prompts = session.exec(
        select(PromptSet.storage_path).where(PromptSet.project_id == project_id, col(PromptSet.deleted_at).is_(None))
    ).all()
    ckpts = session.exec(
        select(Checkpoint.path, Checkpoint.state, Checkpoint.pinned).where(Checkpoint.project_id == project_id)
    ).all()
    run_dirs = session.exec(
        select(Job.run_dir).where(Job.project_id == project_id, col(Job.run_dir).is_not(None))
    ).all()
    session.commit()
    by_kind: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    by_kind["feedback"] = _blob_bytes(data_dir, live_fb)
    by_kind["prompt_sets"] = _blob_bytes(data_dir, set(prompts) - live_fb)
    counts["feedback"] = len(live_fb)
    counts["feedback_deleted"] = sum(1 for _, deleted in feedback if deleted is not None)
    ckpt_dirs: set[Path] = set()
    for path, state, pinned in ckpts:
        counts[f"checkpoints_{state}"] += 1
        counts["pinned"] += int(pinned)
        resolved = files.resolve(data_dir, path)
        ckpt_dirs.add(resolved)
        if state != "pruned":
            by_kind[f"checkpoints_{state}"] += files.tree_bytes(resolved)
    fb_paths = {files.resolve(data_dir, p) for p in live_fb}
    for run_dir in run_dirs:
        rd = RunDir(files.resolve(data_dir, run_dir or ""))
        total = files.tree_bytes(rd.path)
        if not total:
            continue
        intermediate = files.tree_bytes(rd.checkpoints)
        inside = sum(files.tree_bytes(d) for d in ckpt_dirs if d.parent == rd.path)
        generated = sum(files.tree_bytes(p) for p in fb_paths if p.parent == rd.path)
        by_kind["intermediate_checkpoints"] += intermediate
        by_kind["run_logs"] += max(0, total - intermediate - inside - generated)
    for key in ("feedback", "prompt_sets", "checkpoints_whole", "checkpoints_optimizer_pruned"):
        by_kind.setdefault(key, 0)
    for key in ("checkpoints_whole", "checkpoints_optimizer_pruned", "checkpoints_pruned", "pinned"):
        counts.setdefault(key, 0)
    return {"bytes": dict(by_kind), "counts": dict(counts)}


def usage_out(session: Session, settings: Settings, project_id: str) -> UsageOut:
    measured = project_usage(session, settings, project_id)
    total = sum(measured["bytes"].values())
    measured["bytes"]["reference_cache"] = files.tree_bytes(settings.reference_cache_dir)
    return UsageOut(
        project_id=project_id,
        bytes=measured["bytes"],
        counts=measured["counts"],
        total_bytes=total,
        data_dir_free_bytes=files.free_bytes(settings.data_dir),
        reserve_bytes=settings.storage_reserve_bytes,
    )


_CACHE_LOCK = threading.Lock()
_CACHE: dict[str, Any] = {"at": float("-inf"), "value": None}
GAUGE_TTL_S = 60.0  # a scrape every 15 s must not walk the data dir every time


def all_usage(session: Session, settings: Settings) -> dict[str, dict[str, int]]:
    """project id → bytes by kind, for the Prometheus gauges (cached for GAUGE_TTL_S)."""
    with _CACHE_LOCK:
        if time.monotonic() - _CACHE["at"] < GAUGE_TTL_S and _CACHE["value"] is not None:
            return _CACHE["value"]
    projects = {p for p in session.exec(select(Run.project_id)).all()}
    projects |= set(session.exec(select(FeedbackFile.project_id)).all())
    projects |= set(session.exec(select(PromptSet.project_id)).all())
    session.commit()
    value = {p: project_usage(session, settings, p)["bytes"] for p in sorted(projects)}
    with _CACHE_LOCK:
        _CACHE.update(at=time.monotonic(), value=value)
    return value


# --------------------------------------------------------------------------- reference cache


def evict_reference_cache(settings: Settings) -> int:
    """Least-recently-used shards of the reference log-prob cache go until it is under
    `reference_cache_max_bytes` (a shard's mtime is its last use: the trainer touches the shards it
    loads). A shard removed under a reader is a cache miss there, recomputed. Returns bytes freed."""
    cap = settings.reference_cache_max_bytes
    root = settings.reference_cache_dir
    if cap <= 0 or not root.is_dir():
        return 0
    shards = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name.startswith(".tmp-"):  # a shard being written (renamed into place when complete)
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            shards.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in shards)
    freed = 0
    for _mtime, size, path in sorted(shards):
        if total - freed <= cap:
            break
        path.unlink(missing_ok=True)
        freed += size
    if freed:
        log.info("reference cache: evicted %d bytes (cap %d)", freed, cap)
    return freed

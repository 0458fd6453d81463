"""The file contract between the worker and the trainer (torch-free).

    runs/<job_id>/
      run.json          RunConfig written by the worker
      accelerate.yaml   accelerate launch config written by the worker
      stdout.log        the training subprocess's output
      metrics.jsonl     rank 0: one JSON object per optimizer step
      checkpoints.jsonl rank 0: one line per intermediate checkpoint, appended once it is complete
                        (the worker reports each from here, even one pruned again before it looked)
      checkpoints/step-000512/   intermediate checkpoints; meta.json written LAST marks one complete
      final/            the round's exported checkpoint (same layout, meta.json last)
      result.json       rank 0 on clean exit
      accelerate-node<r>.yaml, stdout-node<r>.log   node r > 0 of a multi-node attempt (its worker)

A checkpoint directory is complete only when its `meta.json` exists and every file it lists has
the recorded sha256. Directories are written under a temporary name and renamed into place, so a
reader never sees a half-written `step-…` directory; `meta.json` is still verified because a
rename is not a promise about the files' contents after a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halos_core.job_spec import RunConfig
from halos_core.round_result import RoundResult

META_FILE = "meta.json"
CHECKPOINT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class CheckpointError(Exception):
    """A checkpoint directory is missing, incomplete, or does not match its manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temp file, fsync, rename over `path` (readers see old or new, never half)."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class Manifest:
    path: Path
    step: int
    examples: int
    files: dict[str, str]  # relative path -> sha256
    extra: dict[str, Any]

    @property
    def sha256(self) -> str:
        """One hash for the whole checkpoint: the hash of its sorted file hashes."""
        blob = "\n".join(f"{k} {v}" for k, v in sorted(self.files.items()))
        return hashlib.sha256(blob.encode()).hexdigest()


def write_manifest(directory: str | Path, step: int, examples: int, **extra: Any) -> Manifest:
    """Hash every file in `directory` and write meta.json LAST (call after all files are written)."""
    directory = Path(directory)
    files: dict[str, str] = {}
    for file in sorted(directory.rglob("*")):
        if file.is_file() and file.name != META_FILE:
            files[file.relative_to(directory).as_posix()] = sha256_file(file)
    meta = {"complete": True, "step": step, "examples": examples, "files": files, **extra}
    write_json_atomic(directory / META_FILE, meta)
    return Manifest(directory, step, examples, files, extra)


def read_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """The manifest of a complete checkpoint; raises CheckpointError if it is not one."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        files = dict(meta["files"])
        step, examples = int(meta["step"]), int(meta["examples"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {directory}: unreadable {META_FILE}: {exc}") from exc
    if verify:
        for rel, expected in files.items():
            file = directory / rel
            if not file.is_file():
                raise CheckpointError(f"checkpoint {directory}: {rel} listed in the manifest is missing")
            actual = sha256_file(file)
            if actual != expected:
                raise CheckpointError(
                    f"checkpoint {directory}: {rel} has sha256 {actual[:12]}…, manifest says {expected[:12]}…"
                )
    extra = {k: v for k, v in meta.items() if k not in {"complete", "step", "examples", "files"}}
    return Manifest(directory, step, examples, files, extra)


# what a checkpoint needs only to continue training (dropped first by the storage lifecycle's
# retention: the weights stay loadable and evaluable; halos_core.checkpoint writes these names)
OPTIMIZER_STATE_FILES = ("optimizer.pt", "scheduler.pt")


def drop_from_manifest(directory: str | Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Rewrite `directory`'s meta.json without `names` (recorded under "dropped"), atomically, then
    delete those files. Idempotent: a second call (after a kill between the two steps) finds them
    unlisted and only deletes what is left. Returns the names removed from the manifest."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    meta = json.loads(meta_path.read_text())
    files = dict(meta.get("files") or {})
    dropped = [n for n in names if n in files]
    if dropped:
        for name in dropped:
            del files[name]
        meta["files"] = files
        meta["dropped"] = sorted(set(meta.get("dropped") or []) | set(dropped))
        write_json_atomic(meta_path, meta)
    for name in names:
        (directory / name).unlink(missing_ok=True)
    return dropped


def tree_sha256(directory: str | Path) -> str:
    """Content hash of a model directory (sorted relative paths + file hashes)."""
    directory = Path(directory)
    lines = []
    for file in sorted(directory.rglob("*")):
        if file.is_file() and file.name != META_FILE and not file.name.startswith(TMP_PREFIX):
            lines.append(f"{file.relative_to(directory).as_posix()} {sha256_file(file)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with open(path, "a+b") as fh:
        # a killed attempt may have left half a line: end it, so that only it is lost, not this one
        if fh.seek(0, os.SEEK_END) > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = b"\n" + line
        fh.write(line)
        fh.flush()


def _read_jsonl(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end


# --------------------------------------------------------------------------- the run directory


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    run_json = property(lambda self: self.path / "run.json")
    accelerate_yaml = property(lambda self: self.path / "accelerate.yaml")
    stdout_log = property(lambda self: self.path / "stdout.log")
    metrics_jsonl = property(lambda self: self.path / "metrics.jsonl")
    checkpoints_jsonl = property(lambda self: self.path / "checkpoints.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    final = property(lambda self: self.path / "final")
    result_json = property(lambda self: self.path / "result.json")

    # a multi-node attempt: every node launches from this directory (a shared filesystem); node 0
    # uses the files above, node r > 0 its own launcher config and output
    def node_accelerate_yaml(self, rank: int) -> Path:
        return self.accelerate_yaml if rank == 0 else self.path / f"accelerate-node{rank}.yaml"

    def node_log(self, rank: int) -> Path:
        return self.stdout_log if rank == 0 else self.path / f"stdout-node{rank}.log"

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        return self

    # ---- config
    def write_config(self, config: RunConfig) -> None:
        write_json_atomic(self.run_json, config.model_dump(mode="json"))

    def read_config(self) -> RunConfig:
        return RunConfig.model_validate_json(self.run_json.read_text())

    # ---- checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:06d}"

    def complete_checkpoints(self, verify: bool = True) -> list[Manifest]:
        """Complete checkpoints, oldest first. Partial or corrupt ones are skipped."""
        found = []
        if not self.checkpoints.is_dir():
            return found
        for d in sorted(self.checkpoints.iterdir()):
            if d.is_dir() and d.name.startswith(CHECKPOINT_PREFIX):
                try:
                    found.append(read_manifest(d, verify=verify))
                except CheckpointError:
                    continue
        return sorted(found, key=lambda m: m.step)

    def latest_checkpoint(self) -> Manifest | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def _recover_interrupted_replace(self) -> None:
        """Re-saving an existing step moves the old copy to `.tmp-old-<name>`, then renames
        `.tmp-<name>` into place. A kill between the two renames leaves no `<name>` but two complete
        copies under temp names: put the new one (else the old one) back instead of deleting both."""
        for aside in sorted(self.checkpoints.glob(f"{TMP_PREFIX}old-{CHECKPOINT_PREFIX}*")):
            name = aside.name[len(f"{TMP_PREFIX}old-") :]
            target = self.checkpoints / name
            if target.exists():
                continue
            for candidate in (self.checkpoints / f"{TMP_PREFIX}{name}", aside):
                try:
                    read_manifest(candidate)
                except CheckpointError:
                    continue
                os.replace(candidate, target)
                fsync_dir(self.checkpoints)
                break

    def clean_partial_checkpoints(self) -> list[Path]:
        """Delete temp and incomplete checkpoint directories (never a complete one)."""
        removed = []
        if not self.checkpoints.is_dir():
            return removed
        self._recover_interrupted_replace()
        for d in self.checkpoints.iterdir():
            if not d.is_dir():
                continue
            partial = d.name.startswith(TMP_PREFIX) or not (d / META_FILE).is_file()
            if not partial:
                try:
                    read_manifest(d)
                except CheckpointError:
                    partial = True
            if partial:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed

    # ---- metrics and result
    def append_metrics(self, record: dict[str, Any]) -> None:
        _append_jsonl(self.metrics_jsonl, record)

    def read_metrics(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Complete metric lines from byte `offset`; returns (records, new offset).

        A line still being written is left for the next read. A malformed line (a killed
        attempt's half-written tail followed by the retry's first line) is skipped, not fatal."""
        return _read_jsonl(self.metrics_jsonl, offset)

    def log_checkpoint(self, step: int, name: str) -> None:
        """Rank 0, after an intermediate checkpoint is complete (before pruning can remove it)."""
        _append_jsonl(self.checkpoints_jsonl, {"step": int(step), "name": name})

    def read_checkpoint_log(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Complete lines of checkpoints.jsonl from byte `offset` (as `read_metrics`)."""
        return _read_jsonl(self.checkpoints_jsonl, offset)

    def write_result(self, result: RoundResult) -> None:
        write_json_atomic(self.result_json, result.to_json())

    def read_result(self) -> RoundResult | None:
        """result.json, validated (None when absent; pydantic's ValidationError, a ValueError, when
        it is not a RoundResult)."""
        if not self.result_json.is_file():
            return None
        return RoundResult.model_validate_json(self.result_json.read_bytes())

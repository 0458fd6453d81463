"""`halos fsck`: do the database and the data dir agree?

Problems reported (each a line an operator can act on):
- a checkpoint the database calls whole or optimizer_pruned does not verify against its manifest
  (missing directory, missing file, wrong sha256), or one whose optimizer state was dropped still
  lists it / a whole one lacks it;
- a pruned checkpoint's directory still exists (bytes no row accounts for);
- a live feedback file / prompt set whose bytes are missing or do not hash to its sha256;
- files no row accounts for: a blob under feedback/ no live row stores, a run directory under
  runs/ with no job, intermediate checkpoints of a succeeded round, leftovers of a deleted run;
- a deletion intent still open (a removal a kill interrupted: the sweeper finishes it).
Temp files of uploads in flight (tmp/) and the reference cache (bounded by its own cap) are not
problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import Session, col, select

from halos_core.run_dir import META_FILE, OPTIMIZER_STATE_FILES, CheckpointError, RunDir, read_manifest, sha256_file
from server.models import Checkpoint, DeletionIntent, FeedbackFile, Job, JobStatus, PromptSet
from server.settings import Settings
from server.storage_lifecycle import files


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def fsck(session: Session, settings: Settings, *, verify_blobs: bool = True) -> FsckReport:
    """The rows are read first, in one short transaction; the disk is checked after it ended (hashing
    every checkpoint takes minutes; on SQLite an open write transaction would hold the API's writers)."""
    ckpts = [(c.id, c.path, c.state) for c in session.exec(select(Checkpoint)).all()]
    blobs = [
        ("feedback", r.id, r.storage_path, r.sha256)
        for r in session.exec(select(FeedbackFile)).all()
        if not r.deleted_at
    ]
    blobs += [
        ("prompt set", r.id, r.storage_path, r.sha256)
        for r in session.exec(select(PromptSet)).all()
        if not r.deleted_at
    ]
    jobs = {j.id: (j.kind, j.status) for j in session.exec(select(Job)).all()}
    open_intents = list(session.exec(select(DeletionIntent.id).where(col(DeletionIntent.finished_at).is_(None))).all())
    session.commit()

    report = FsckReport()
    data_dir = settings.data_dir
    accounted: set[Path] = set()  # directories / files rows account for
    for ckpt_id, stored, state in ckpts:
        path = files.resolve(data_dir, stored)
        if state == "pruned":
            if path.exists():
                report.problems.append(f"checkpoint {ckpt_id} is pruned but {path} still exists")
            continue
        accounted.add(path.resolve())
        try:
            manifest = read_manifest(path, verify=True)
        except CheckpointError as exc:
            report.problems.append(f"checkpoint {ckpt_id} ({state}) does not verify: {exc}")
            continue
        listed = set(manifest.files)
        if state == "optimizer_pruned" and (
            any(n in listed for n in OPTIMIZER_STATE_FILES) or any((path / n).exists() for n in OPTIMIZER_STATE_FILES)
        ):
            report.problems.append(f"checkpoint {ckpt_id} is optimizer_pruned but still holds its optimizer state")
        if state == "whole" and manifest.extra.get("dropped"):
            report.problems.append(f"checkpoint {ckpt_id} is whole but its optimizer state was dropped")
        on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != META_FILE}
        for extra in sorted(on_disk - listed):
            report.problems.append(f"checkpoint {ckpt_id}: {extra} is not in its manifest")
    report.checked["checkpoints"] = len(ckpts)

    for kind, row_id, stored, sha256 in blobs:
        path = files.resolve(data_dir, stored)
        accounted.add(path.resolve())
        if not path.is_file():
            report.problems.append(f"{kind} {row_id}: its bytes {path} are missing")
        elif verify_blobs and sha256_file(path) != sha256:
            report.problems.append(f"{kind} {row_id}: {path} does not hash to its sha256")
    report.checked["blobs"] = len(blobs)

    feedback_dir = settings.feedback_dir
    if feedback_dir.is_dir():
        for blob in sorted(feedback_dir.iterdir()):
            if blob.resolve() not in accounted:
                report.problems.append(f"{blob} is stored but no live feedback file or prompt set uses it")

    runs_dir = settings.runs_dir
    if runs_dir.is_dir():
        for entry in sorted(runs_dir.iterdir()):
            if entry.name not in jobs:
                report.problems.append(f"{entry} belongs to no job")
                continue
            kind, status = jobs[entry.name]
            rd = RunDir(entry)
            succeeded = status == JobStatus.succeeded
            if kind == "round" and succeeded and rd.checkpoints.is_dir() and any(rd.checkpoints.iterdir()):
                report.problems.append(f"{rd.checkpoints}: intermediate checkpoints of a succeeded round")
            if succeeded and rd.final.exists() and rd.final.resolve() not in accounted:
                report.problems.append(f"{rd.final}: a final checkpoint no live checkpoint row accounts for")
    report.checked["run_dirs"] = len(jobs)

    for intent_id in open_intents:
        report.problems.append(f"deletion intent {intent_id} is unfinished (the sweeper finishes it)")
    return report

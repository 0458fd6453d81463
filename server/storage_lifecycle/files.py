"""Removal primitives and deletion intents (see the package docstring for the crash-safety order).

An action is `{"op": ..., "path": ...}`:
- `rmtree`: a directory and everything under it (a run directory, a checkpoint);
- `unlink`: one file (a feedback / prompt-set blob); with `"blob": <storage path>` it is a shared,
  content-addressed blob, unlinked only under `lock_blob` and only if no live row uses it then;
- `drop_optimizer`: a checkpoint directory loses its optimizer/scheduler state; its manifest is
  rewritten first so the weights that stay still verify (`halos_core.run_dir.drop_from_manifest`).
Every action is idempotent, and none touches a path outside the data dir (a registered model's
directory belongs to the operator: it is never in an action).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from halos_core.run_dir import META_FILE, OPTIMIZER_STATE_FILES, drop_from_manifest
from server.db import READ_OPTION
from server.models import DeletionIntent, FeedbackFile, PromptSet, utcnow
from server.settings import Settings

log = logging.getLogger("halos.storage")


def resolve(data_dir: Path, stored: str) -> Path:
    """A stored path (relative to the data dir, or absolute) as an absolute path."""
    path = Path(stored)
    return path if path.is_absolute() else data_dir / path


def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (or of `path` itself); 0 when it does not exist.
    Symlinks are not followed (a link into a model directory does not count as ours)."""
    try:
        if path.is_symlink() or path.is_file():
            return 0 if path.is_symlink() else path.stat().st_size
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def optimizer_bytes(checkpoint_dir: Path) -> int:
    return sum(tree_bytes(checkpoint_dir / name) for name in OPTIMIZER_STATE_FILES)


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (or its nearest
    existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _gone_already(function: Any, path: str, exc_info: Any) -> None:
    """shutil.rmtree's error handler: a file another remover (the sweeper finishing the same intent)
    deleted first is not an error; anything else is."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, onerror=_gone_already)


def execute(actions: Iterable[dict[str, Any]], data_dir: Path) -> None:
    """Carry out the actions (idempotent: a repeat finds less to do). A path outside the data dir
    is refused (logged, skipped): the lifecycle owns only what the server wrote."""
    for action in actions:
        path = Path(action["path"])
        if not inside(path, data_dir):
            log.error("storage: refusing to remove %s: not under the data dir %s", path, data_dir)
            continue
        op = action["op"]
        if op == "rmtree":
            rmtree(path)
        elif op == "unlink":
            path.unlink(missing_ok=True)
        elif op == "drop_optimizer":
            if (path / META_FILE).is_file():
                drop_from_manifest(path, OPTIMIZER_STATE_FILES)
        else:
            raise ValueError(f"unknown storage action {op!r}")


def add_intent(
    session: Session, kind: str, subject_id: str, actions: list[dict[str, Any]], project_id: str | None
) -> DeletionIntent:
    """Record bytes to remove, in the caller's transaction (the one that changes the rows)."""
    intent = DeletionIntent(project_id=project_id, kind=kind, subject_id=subject_id, actions=actions)
    session.add(intent)
    return intent


def lock_blob(session: Session, storage_path: str) -> None:
    """Serialise everything that decides a blob's fate, until the caller's transaction ends: an upload
    adopting it (publish, then commit its row) and a removal unlinking it (check that no live row
    uses it, then unlink).

    Why: feedback files and prompt sets are content-addressed, so identical uploads share one blob.
    Without one lock held by both sides across processes, an upload of the same bytes could find
    the blob still there (and drop its own copy) or commit its row after a removal had found no live
    user but before it unlinked: a live row pointing at bytes that are gone. With it, either the
    upload commits first and the removal's check sees its row (the blob stays), or the removal
    unlinks first and the upload publishes its own copy again.

    - Postgres: a transaction-scoped advisory lock on a hash of the storage path (one blob's
      removal never waits for another blob's upload; a hash collision only serialises two blobs).
    - SQLite: a writer's transaction is `BEGIN IMMEDIATE` (server/db.py), so once it has begun it
      holds the database's write lock, which every other writer (any process) waits for.
    Both are released by the commit or rollback, also when the process dies."""
    conn = session.connection()  # begins the transaction (SQLite: takes the write lock)
    if conn.get_execution_options().get(READ_OPTION):
        raise RuntimeError("lock_blob needs a writer's session")
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(b"halos blob " + storage_path.encode()).digest()[:8], "big", signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def blob_still_used(session: Session, storage_path: str) -> bool:
    """A live (not deleted) feedback file or prompt set stores its bytes at `storage_path`
    (content-addressed: identical uploads share one blob). Decides a removal only under
    `lock_blob`."""
    for table in (FeedbackFile, PromptSet):
        used = session.exec(
            select(table.id).where(table.storage_path == storage_path, col(table.deleted_at).is_(None)).limit(1)
        ).first()
        if used is not None:
            return True
    return False


def blob_action(data_dir: Path, storage_path: str) -> dict[str, Any]:
    """The removal of a deleted row's blob. Always recorded: whether another live row still uses it
    is decided when it is carried out (`finish`, under `lock_blob`), after this row's tombstone is
    committed; deciding it here instead could leave the bytes of two rows deleted at the same time
    behind (each would still see the other live)."""
    return {"op": "unlink", "path": str(resolve(data_dir, storage_path)), "blob": storage_path}


def _remove_unused_blobs(session: Session, actions: list[dict[str, Any]], data_dir: Path) -> None:
    """Each shared blob is checked and unlinked under its lock, in the caller's transaction (an
    unlink is quick; on SQLite the write lock is held for it)."""
    for action in actions:
        lock_blob(session, action["blob"])
        if not blob_still_used(session, action["blob"]):
            execute([action], data_dir)


def remove_blob_if_unused(session: Session, data_dir: Path, storage_path: str) -> None:
    """An upload that published a blob and then failed to commit its row: the blob goes unless a
    live row uses it (best effort: an unused blob is only disk, which fsck reports)."""
    try:
        session.rollback()
        _remove_unused_blobs(session, [blob_action(data_dir, storage_path)], data_dir)
        session.commit()
    except Exception:
        session.rollback()
        log.exception("storage: could not clean up blob %s", storage_path)


def finish(session: Session, intent_ids: list[int], settings: Settings) -> None:
    """Remove the bytes of committed intents, then mark them finished (one commit per intent, so a
    kill half-way leaves only the unfinished ones open). A shared blob is unlinked only if no live
    row uses it, decided under its lock (`lock_blob`: an identical upload may adopt it meanwhile)."""
    data_dir = settings.data_dir
    for intent_id in intent_ids:
        intent = session.get(DeletionIntent, intent_id)
        if intent is None or intent.finished_at is not None:
            session.commit()
            continue
        blobs = [a for a in intent.actions or [] if a.get("blob")]
        trees = [a for a in intent.actions or [] if not a.get("blob")]
        try:
            _remove_unused_blobs(session, blobs, data_dir)
            session.commit()  # no transaction (on SQLite: no write lock) is held while GBs are removed
            execute(trees, data_dir)
        except Exception:
            # the rows already say what is gone; the bytes stay until a later sweeper pass removes
            # them (the intent stays open: fsck lists it). One stuck removal must not block the rest.
            log.exception("storage: removal %s failed; it stays open for the sweeper", intent_id)
            session.rollback()
            continue
        intent = session.get(DeletionIntent, intent_id)
        if intent is not None:
            intent.finished_at = utcnow()
            session.add(intent)
        session.commit()


def finish_open_intents(session: Session, settings: Settings, min_age_s: float = 0.0) -> list[int]:
    """The sweeper's part: intents a killed process committed but did not finish. `min_age_s`: leave
    younger ones to the request that is carrying them out right now."""
    cutoff = utcnow() - timedelta(seconds=min_age_s)
    ids = [
        i
        for i in session.exec(
            select(DeletionIntent.id)
            .where(col(DeletionIntent.finished_at).is_(None), col(DeletionIntent.created_at) <= cutoff)
            .order_by(col(DeletionIntent.id))
        ).all()
        if i is not None
    ]
    session.commit()
    if ids:
        log.warning("storage: finishing %d interrupted removal(s)", len(ids))
        finish(session, ids, settings)
    return ids

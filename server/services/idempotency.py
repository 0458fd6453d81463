"""`Idempotency-Key` support for the creating POSTs (feedback upload, run, round).

Semantics (I5):
- A key is scoped to (project, endpoint). The first request that *succeeds* with a key stores an
  `IdempotencyRecord` (key, request hash, resource id, status) in the same transaction as the
  resource it created, so a record never points at nothing and a failed request stores nothing
  (it can be retried with the same key).
- A later request with the same key and the same request hash gets the same resource back with
  the original status code (201) and the header `Idempotent-Replayed: true`; the body is the
  resource's current representation (a round's job status may have moved on).
- Same key, different request ⇒ 422 `idempotency_key_reused`.
- Concurrent duplicates: the unique constraint (project_id, endpoint, key) lets exactly one
  insert win; the others roll back and re-read the winner's record. (On SQLite every write
  transaction is BEGIN IMMEDIATE, so they are serialised before they even try.)
- Records are honoured for `idempotency_ttl_hours`; an older record is treated as absent and
  replaced. `purge_expired` deletes old ones in bulk (for a periodic job).
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import delete
from sqlmodel import Session, col, select

from server.errors import Unprocessable
from server.models import IdempotencyRecord, utcnow

REPLAY_HEADER = "Idempotent-Replayed"


def request_hash(*parts: Any) -> str:
    """A canonical hash of what makes two requests "the same" (JSON with sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _expired(record: IdempotencyRecord, ttl_hours: int) -> bool:
    return record.created_at < utcnow() - timedelta(hours=ttl_hours)


def lookup(
    session: Session, project_id: str, endpoint: str, key: str, req_hash: str, ttl_hours: int
) -> IdempotencyRecord | None:
    """The stored record for this key if it is a replay; None if the key is new (or expired).

    Raises 422 `idempotency_key_reused` when the key was used for a different request.
    """
    record = session.exec(
        select(IdempotencyRecord).where(
            IdempotencyRecord.project_id == project_id,
            IdempotencyRecord.endpoint == endpoint,
            IdempotencyRecord.key == key,
        )
    ).first()
    if record is None:
        return None
    if _expired(record, ttl_hours):
        session.delete(record)
        session.flush()
        return None
    if record.request_hash != req_hash:
        raise Unprocessable(
            "this Idempotency-Key was already used with a different request; use a new key",
            code="idempotency_key_reused",
            details={"idempotency_key": key[:255]},
        )
    return record


def remember(
    session: Session, project_id: str, endpoint: str, key: str, req_hash: str, resource_id: str, status_code: int
) -> IdempotencyRecord:
    """Add the record to the caller's transaction (the caller commits it with the resource)."""
    record = IdempotencyRecord(
        project_id=project_id,
        endpoint=endpoint,
        key=key,
        request_hash=req_hash,
        resource_id=resource_id,
        status_code=status_code,
    )
    session.add(record)
    return record


def purge_expired(session: Session, ttl_hours: int) -> int:
    cutoff = utcnow() - timedelta(hours=ttl_hours)
    result = session.exec(delete(IdempotencyRecord).where(col(IdempotencyRecord.created_at) < cutoff))
    session.commit()
    return int(result.rowcount or 0)

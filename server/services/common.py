"""Helpers shared by the services: project-scoped lookups, cursors, id sanity."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import and_, or_
from sqlmodel import Session, select

from server.errors import Conflict, Unprocessable, not_found

T = TypeVar("T")

_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
MAX_PAGE = 200


def plausible_id(value: str) -> bool:
    """Ids are short ASCII tokens; anything else cannot exist (and must not reach the database:
    Postgres rejects NUL characters with an error, which would be a 500)."""
    return isinstance(value, str) and bool(_ID_RE.match(value))


# Tables whose deleted rows are gone for the API (a deleted run or model is a 404); deleted feedback
# files and prompt sets stay readable as tombstones (server/storage_lifecycle/deletion.py).
_GONE_WHEN_DELETED = frozenset({"run", "model"})


def get_owned(
    session: Session,
    model: type[T],
    object_id: str,
    project_id: str,
    kind: str,
    field: str | None = None,
    *,
    include_deleted: bool = False,
) -> T:
    """The row of `model` with this id in this project, else 404 (another project's ids look
    exactly like ids that do not exist)."""
    if not plausible_id(object_id):
        raise not_found(kind, object_id, field)
    row = session.get(model, object_id)
    if row is None or getattr(row, "project_id", None) != project_id:
        raise not_found(kind, object_id, field)
    if (
        not include_deleted
        and getattr(model, "__tablename__", None) in _GONE_WHEN_DELETED
        and getattr(row, "deleted_at", None) is not None
    ):
        raise not_found(kind, object_id, field)
    return row


def refuse_deleted(row: Any, kind: str, field: str | None = None) -> None:
    """409 `<kind>_deleted` for a tombstone (a feedback file or prompt set whose bytes are gone)."""
    if getattr(row, "deleted_at", None) is not None:
        details: dict[str, Any] = {"id": row.id}
        if field is not None:
            details["field"] = field
        raise Conflict(f"{kind} {row.id} was deleted", code=f"{kind}_deleted", details=details)


# --------------------------------------------------------------------------- cursor pagination
# Newest first, keyed on (created_at, id): stable under concurrent inserts, no offsets.


def encode_cursor(created_at: datetime, object_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), object_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, object_id = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or not plausible_id(object_id):
            raise ValueError("bad cursor")
        return when, object_id
    except Exception as exc:  # any garbage is the client's mistake, never a 500
        raise Unprocessable("invalid cursor", code="invalid_cursor", details={"field": "cursor"}) from exc


def newest_first(query: Any, model: Any, cursor: str | None, limit: int) -> Any:
    """`query` restricted to the page after `cursor`, newest first, one row more than the page (so
    that `split_page` knows whether another page follows)."""
    if cursor:
        when, last_id = decode_cursor(cursor)
        query = query.where(or_(model.created_at < when, and_(model.created_at == when, model.id < last_id)))
    return query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)


def split_page(rows: list[T], limit: int, key: Callable[[T], Any] = lambda row: row) -> tuple[list[T], str | None]:
    """The page and the next page's cursor (None on the last page); `key(row)` has the row's
    `created_at` and `id`."""
    if len(rows) <= limit:
        return rows, None
    last = key(rows[limit - 1])
    return rows[:limit], encode_cursor(last.created_at, last.id)


def paginate(
    session: Session, model: Any, project_id: str, limit: int, cursor: str | None, *filters: Any
) -> tuple[list[Any], str | None]:
    limit = max(1, min(limit, MAX_PAGE))
    query = newest_first(select(model).where(model.project_id == project_id, *filters), model, cursor, limit)
    return split_page(list(session.exec(query)), limit)

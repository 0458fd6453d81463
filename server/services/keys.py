"""API keys: created for a project, shown once, stored only as a sha256 hash (S3).

A key looks like `hk_<43 url-safe chars>` (256 random bits). Its first 11 characters (`prefix`)
are stored in clear so humans can tell keys apart (`halos keys list`) and revoke one by prefix;
the rest is never stored. 256 random bits make a plain (unsalted) sha256 safe: there is nothing
to brute-force or look up in a table.

Authentication without a key lookup per request: each API process keeps a `KeyCache` (key hash ->
principal). Every request reads `authstate.key_generation` (one integer) in its own transaction,
the one its handler then uses; revoking a key bumps that integer in the revocation's transaction.
A process that sees a new generation empties its cache before trusting it, so a revoked key is
refused on the very next request in every API process, whoever revoked it (API, CLI, another host).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.errors import Conflict, NotFound
from server.models import ApiKey, AuthState, Project, utcnow

KEY_PREFIX = "hk_"
KEY_SCOPE = "api_keys"  # the AuthState row whose generation covers API keys
_GENERATION_SQL = f"SELECT generation FROM authstate WHERE scope = '{KEY_SCOPE}'"
PREFIX_CHARS = 11  # "hk_" + 8 characters


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's project (every query is scoped to it) and the key itself."""

    project_id: str
    key_id: str | None  # None when auth is disabled


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", errors="surrogateescape")).hexdigest()


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.exec(select(Project).where(Project.name == name)).first()
    if project is not None:
        return project
    project = Project(name=name)
    session.add(project)
    try:
        session.commit()
    except IntegrityError:  # created concurrently: use theirs
        session.rollback()
        project = session.exec(select(Project).where(Project.name == name)).one()
    return project


def create_api_key(session: Session, project_name: str) -> tuple[ApiKey, str]:
    """Create a key for `project_name` (the project is created if missing). Returns the row and
    the secret; the secret is not stored anywhere and cannot be shown again. Commits.
    Use a session with `expire_on_commit=False` (`server.db.session_scope`) to read the row after."""
    name = project_name.strip()
    if not name or len(name) > 200 or "\x00" in name:
        raise ValueError("project name must be 1-200 characters without NUL")
    project = get_or_create_project(session, name)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(project_id=project.id, prefix=secret[:PREFIX_CHARS], key_hash=hash_key(secret))
    session.add(key)
    session.commit()  # no refresh: on SQLite it would reopen a BEGIN IMMEDIATE transaction and hold it
    return key, secret


def revoke_api_key(session: Session, key_id_or_prefix: str) -> ApiKey:
    """Revoke a key by its id (`key_…`) or its displayed prefix (`hk_…`, must be unambiguous).
    Takes effect at once: the next request with it gets 401. Revoking twice is a no-op. Commits.
    Raises NotFound / Conflict (both `server.errors.ApiError`, with a `.message`)."""
    ref = key_id_or_prefix.strip()
    key = session.get(ApiKey, ref) if ref else None
    if key is None and ref:
        matches = list(session.exec(select(ApiKey).where(ApiKey.prefix == ref[:PREFIX_CHARS])).all())
        if ref.startswith(KEY_PREFIX) and len(ref) > PREFIX_CHARS:  # the whole secret was given
            matches = [k for k in matches if k.key_hash == hash_key(ref)]
        if len(matches) > 1:
            raise Conflict(f"prefix {ref!r} matches {len(matches)} keys; use the key id", code="ambiguous_key")
        key = matches[0] if matches else None
    if key is None:
        raise NotFound(f"no API key {ref!r}", code="key_not_found")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        _bump_generation(session)  # same transaction: every API process drops its cached keys
        session.commit()
    return key


def _bump_generation(session: Session) -> None:
    bumped = session.connection().execute(
        text(f"UPDATE authstate SET generation = generation + 1 WHERE scope = '{KEY_SCOPE}'")
    )
    if bumped.rowcount == 0:  # a database made without the row: create it past every generation seen (0)
        session.add(AuthState(scope=KEY_SCOPE, generation=1))


def key_generation(conn: Connection) -> int:
    """Runs on every authenticated request. On SQLite, on the driver's own cursor: an in-process
    call with an integer result needs none of SQLAlchemy's statement pipeline, which cost several
    times the call. Elsewhere through SQLAlchemy, whose error handling notices a dropped connection
    and invalidates the pool (server/db.py)."""
    if conn.dialect.name != "sqlite":
        return int(conn.exec_driver_sql(_GENERATION_SQL).scalar() or 0)
    cursor = conn.connection.cursor()
    try:
        cursor.execute(_GENERATION_SQL)
        row = cursor.fetchone()
    finally:
        cursor.close()
    return int(row[0] if row and row[0] else 0)


def list_api_keys(session: Session, project_name: str | None = None) -> list[tuple[ApiKey, Project]]:
    query = select(ApiKey, Project).where(ApiKey.project_id == Project.id)
    if project_name is not None:
        query = query.where(Project.name == project_name)
    return [(k, p) for k, p in session.exec(query.order_by(col(ApiKey.created_at))).all()]


def _lookup(conn: Connection, key_hash: str) -> Principal | None:
    row = conn.execute(
        select(ApiKey.project_id, ApiKey.id, ApiKey.revoked_at).where(ApiKey.key_hash == key_hash)
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(project_id=row.project_id, key_id=row.id)


class KeyCache:
    """Valid keys seen by this process, for the current key generation (see the module docstring).

    Concurrency: a request whose transaction saw an older generation than the cache's neither reads
    nor fills it (its snapshot may predate a revocation the cache already reflects, or the reverse);
    one that saw a newer generation empties it first. Unknown keys are never cached."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._generation = -1
        self._entries: dict[str, Principal] = {}
        self._lock = threading.Lock()

    def authenticate(self, conn: Connection, secret: str) -> Principal | None:
        """The principal for `secret`, checked against `conn`'s transaction (which the caller
        keeps for the rest of the request): one small read, plus a key lookup on a miss."""
        if not secret or len(secret) > 512:
            return None
        generation = key_generation(conn)
        digest = hash_key(secret)
        with self._lock:
            if generation > self._generation:
                self._entries.clear()
                self._generation = generation
            if generation == self._generation and (hit := self._entries.get(digest)) is not None:
                return hit
        principal = _lookup(conn, digest)
        if principal is not None:
            with self._lock:
                if generation == self._generation:
                    if len(self._entries) >= self.max_entries:
                        self._entries.clear()
                    self._entries[digest] = principal
        return principal

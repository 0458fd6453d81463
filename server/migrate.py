"""Schema migrations (Alembic), run programmatically: `upgrade(settings)` = `alembic upgrade head`.

The scripts live in `<repo>/migrations` (next to `alembic.ini`); `HALOS_MIGRATIONS_DIR` overrides
the location for installs that keep them elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config

from server.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent


def migrations_dir() -> Path:
    candidates = [os.environ.get("HALOS_MIGRATIONS_DIR"), ROOT / "migrations", Path.cwd() / "migrations"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "env.py").is_file():
            return Path(candidate)
    raise FileNotFoundError("migrations/ not found (set HALOS_MIGRATIONS_DIR)")


def alembic_config(settings: Settings | None = None, connection=None) -> Config:
    ini = ROOT / "alembic.ini"
    cfg = Config(str(ini)) if ini.is_file() else Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["settings"] = settings or get_settings()
    cfg.attributes["skip_logging_config"] = True  # leave the application's logging alone
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(settings: Settings | None = None, revision: str = "head") -> None:
    settings = settings or get_settings()
    if settings.db_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        command.upgrade(alembic_config(settings), revision)
        return
    from server.db import make_engine

    # Postgres: DDL may wait on locks or rewrite big tables: no statement_timeout here
    engine = make_engine(settings.db_url, statement_timeout_s=None)
    try:
        with engine.connect() as conn:
            command.upgrade(alembic_config(settings, connection=conn), revision)
            conn.commit()
    finally:
        engine.dispose()


def current(settings: Settings | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from server.db import make_engine

    engine = make_engine((settings or get_settings()).db_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()

"""Alembic environment: the URL comes from server.settings, the target metadata from server.models.

`server.migrate.upgrade(settings)` passes its Settings (and optionally an open connection) through
`config.attributes`; the `alembic` command line uses HALOS_* environment variables.
"""

from __future__ import annotations

import logging
from logging.config import fileConfig

from alembic import context
from sqlmodel import SQLModel

import server.models  # noqa: F401 - registers every table on SQLModel.metadata
from server.db import make_engine
from server.settings import Settings

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

log = logging.getLogger("alembic.env")
target_metadata = SQLModel.metadata


def _settings() -> Settings:
    settings = config.attributes.get("settings")
    return settings if settings is not None else Settings()


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE on SQLite = copy-and-move
    )


def run_migrations_offline() -> None:
    context.configure(
        url=_settings().db_url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    settings = _settings()
    if settings.db_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url, statement_timeout_s=None)  # DDL may wait on locks: no timeout
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

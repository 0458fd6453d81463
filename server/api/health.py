"""GET /healthz (the process answers) and GET /readyz (database and broker reachable)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from sqlalchemy import text

from halos_client.models import HealthOut, ReadyOut
from server.api.deps import SettingsDep, error_responses
from server.db import get_read_engine
from server.errors import ServiceUnavailable
from server.settings import Settings
from server.storage_lifecycle.files import free_bytes

log = logging.getLogger("halos.api")
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    return HealthOut()


def check_database(settings: Settings) -> str:
    try:
        with get_read_engine(settings).connect() as conn:  # never the write lock
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:
        log.warning("readyz: database check failed: %s", exc)
        return f"error: {type(exc).__name__}"


def check_broker(settings: Settings) -> str:
    from kombu import Connection

    try:
        with Connection(settings.broker, connect_timeout=2, transport_options={"max_retries": 0}) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2, timeout=3)
        return "ok"
    except Exception as exc:
        log.warning("readyz: broker check failed: %s", exc)
        return f"error: {type(exc).__name__}"


@router.get("/readyz", response_model=ReadyOut, responses=error_responses(503))
def readyz(settings: SettingsDep) -> ReadyOut:
    """200 when a database query and a broker connection succeed; else 503 `not_ready` with the
    failing checks in `details.checks`. `data_dir_free_bytes`: free space of the data dir's
    filesystem (a full disk does not make the API unready: it is how space is freed)."""
    checks = {"database": check_database(settings), "broker": check_broker(settings)}
    free = data_dir_free(settings)
    if any(v != "ok" for v in checks.values()):
        raise ServiceUnavailable("not ready", details={"checks": checks, "data_dir_free_bytes": free})
    return ReadyOut(status="ready", checks=checks, data_dir_free_bytes=free)


def data_dir_free(settings: Settings) -> int | None:
    try:
        return free_bytes(settings.data_dir)
    except OSError as exc:
        log.warning("readyz: free space of %s unknown: %s", settings.data_dir, exc)
        return None

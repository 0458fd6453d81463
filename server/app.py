"""The FastAPI application: `create_app(settings)`; `uvicorn --factory server.app:create_app`."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from server.api import checkpoints, feedback, health, jobs, models, runs
from server.errors import install_exception_handlers
from server.services.ratelimit import SlidingWindowLimiter
from server.settings import Settings, get_settings
from server.storage import cleanup_stale_uploads

log = logging.getLogger("halos.api")

DESCRIPTION = """\
Online preference-alignment rounds (DPO, KTO, GRPO, …) on a self-hosted server.

Upload feedback files, register an SFT model, create a run, queue rounds; poll jobs, read
metrics, logs and the checkpoint lineage. Everything under `/v1` needs
`Authorization: Bearer <key>` and is scoped to the key's project (other projects' ids answer 404).
Every error is `{"error": {"code", "message", "details"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    try:
        cleanup_stale_uploads(settings.uploads_tmp_dir)
    except OSError:  # never stop the API from starting over a temp-file sweep
        log.warning("could not sweep %s", settings.uploads_tmp_dir, exc_info=True)

    app = FastAPI(title="halos-server", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.rate_limiter = SlidingWindowLimiter(settings.rate_limit_per_minute)
    install_exception_handlers(app)
    app.include_router(health.router)
    for module in (feedback, models, runs, jobs, checkpoints):
        app.include_router(module.router)
    return app

"""The FastAPI application: `create_app(settings)`; as `halos serve` runs it, `serve_app`
(`uvicorn --factory server.app:serve_app`)."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from server import prometheus, ui
from server.api import (
    artefact_jobs,
    checkpoints,
    events,
    feedback,
    health,
    integrations,
    jobs,
    losses,
    models,
    prompts,
    runs,
    storage,
    webhooks,
)
from server.db import POOL_CAPACITY
from server.errors import install_exception_handlers
from server.services.keys import KeyCache
from server.services.ratelimit import SlidingWindowLimiter
from server.services.validation_pool import ValidationPool
from server.settings import Settings, get_settings
from server.storage import cleanup_stale_uploads

log = logging.getLogger("halos.api")

DESCRIPTION = """\
Online preference-alignment rounds (DPO, KTO, GRPO, …) on a self-hosted server.

Upload feedback files, register an SFT model, create a run, queue rounds; poll jobs, read
metrics, logs, events (also as a Server-Sent Events stream) and the checkpoint lineage; register
webhooks. A dashboard is served at `/ui`, Prometheus metrics at `/metrics`. Everything under `/v1` needs
`Authorization: Bearer <key>` and is scoped to the key's project (other projects' ids answer 404).
Every error is `{"error": {"code", "message", "details"}}`.
"""


def _refine_openapi(app: FastAPI) -> None:
    """Make the generated spec say exactly what the server accepts and answers (schemathesis-clean):

    - members of a discriminated union (losses by `name`, conversions by `type`) *require* the
      tag: pydantic needs it to pick the member, although each member gives it a default;
    - error responses are JSON even on routes whose success is text/plain (the log tail).
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate()
        components = spec.get("components", {}).get("schemas", {})

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                disc = node.get("discriminator")
                if isinstance(disc, dict):
                    for ref in (disc.get("mapping") or {}).values():
                        target = components.get(str(ref).rsplit("/", 1)[-1])
                        if target is not None and disc["propertyName"] not in target.setdefault("required", []):
                            target["required"].append(disc["propertyName"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(spec)
        for operations in spec.get("paths", {}).values():
            for operation in operations.values():
                for status, response in (operation.get("responses") or {}).items():
                    content = response.get("content") or {}
                    if status[:1] in ("4", "5") and "text/plain" in content and "application/json" not in content:
                        content["application/json"] = content.pop("text/plain")
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def serve_app(settings: Settings | None = None) -> FastAPI:
    """The app as `halos serve` runs it: `create_app`, plus a process-wide GC freeze at startup
    (not for the apps tests make by the hundred in one process)."""
    app = create_app(settings)
    app.state.freeze_gc = True
    return app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    try:
        cleanup_stale_uploads(settings.uploads_tmp_dir)
    except OSError:  # never stop the API from starting over a temp-file sweep
        log.warning("could not sweep %s", settings.uploads_tmp_dir, exc_info=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # feedback validation runs in these worker processes (started now, not during an upload)
        pool = ValidationPool(settings.validation_workers)
        app.state.validation_pool = pool
        try:
            await run_in_threadpool(pool.warm_up)
            if getattr(app.state, "freeze_gc", False):
                # everything made so far (modules, the app, pools) lives as long as the process: out
                # of the collector's sight, a full collection no longer walks it. Such a pause cost a
                # 10k-step metrics page ~150 of ~300 ms (bench/README, "Metric series").
                gc.collect()
                gc.freeze()
            yield
        finally:
            app.state.validation_pool = None
            await run_in_threadpool(pool.shutdown)

    app = FastAPI(
        lifespan=lifespan,
        title="halos-server",
        version="0.1.0",
        description=DESCRIPTION,
        generate_unique_id_function=lambda route: route.name,  # operationIds = endpoint names (links use them)
    )
    app.state.settings = settings
    app.state.rate_limiter = SlidingWindowLimiter(settings.rate_limit_per_minute)
    app.state.key_cache = KeyCache()
    app.state.database_slots = anyio.Semaphore(POOL_CAPACITY)  # see server.api.deps.get_read_session
    app.state.validation_pool = None  # set while the app runs (lifespan); None: validate in the request's thread
    app.state.model_hash_slots = threading.BoundedSemaphore(settings.max_concurrent_model_hashes)
    if settings.auth_enabled and any(Path(os.path.realpath(r)) == Path("/") for r in settings.allowed_model_roots):
        log.warning(
            "HALOS_MODEL_ROOTS includes /: any API key may register (make this server read and hash) any"
            " directory it can read; list only the directories that hold your SFT models"
        )
    install_exception_handlers(app)
    app.include_router(health.router)
    # FastAPI tries the routers in this order, each by matching every one of its routes' patterns:
    # what clients poll (job status, events) goes first. No two routers' paths overlap, so the
    # order changes only the cost. Measured in process: `GET /v1/jobs/{id}` 0.93 -> 0.85 ms of CPU
    # (bench/README, "Job reads: the polled routers first").
    for module in (
        jobs,
        events,
        feedback,
        prompts,
        models,
        losses,
        runs,
        checkpoints,
        artefact_jobs,
        integrations,
        webhooks,
        storage,
    ):
        app.include_router(module.router)
    if settings.metrics_enabled:
        app.include_router(prometheus.router(settings))
        app.add_middleware(prometheus.RequestMetrics)
    ui.mount(app)
    _refine_openapi(app)
    return app

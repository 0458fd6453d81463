"""A run's tracking links (one `TrackingLink` row per backend), written with the run."""

from __future__ import annotations

import importlib.util

from sqlmodel import Session

from halos_client.event_models import TrackingOptions
from server.errors import Unprocessable
from server.models import Run, TrackingLink

# backend -> (module that must be importable, the extra that installs it)
BACKENDS = {"mlflow": ("mlflow", "halos-server[mlflow]"), "wandb": ("wandb", "halos-server[wandb]")}


def add_tracking_links(session: Session, run: Run, tracking: TrackingOptions | None) -> None:
    if tracking is None:
        return
    for backend, (module, extra) in BACKENDS.items():
        options = getattr(tracking, backend)
        if options is None:
            continue
        if importlib.util.find_spec(module) is None:
            raise Unprocessable(
                f"{backend} tracking is not installed on this server (pip install '{extra}')",
                code="tracking_unavailable",
                details={"field": f"tracking.{backend}"},
            )
        session.add(TrackingLink(run_id=run.id, backend=backend, config=options.model_dump(mode="json"), exported={}))

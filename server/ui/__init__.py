"""The dashboard: plain HTML/JS/CSS served at `/ui` (no build step). The page asks for an API key,
keeps it in sessionStorage and calls the same public `/v1` endpoints as any client (the runs,
a run's rounds, the metric series, the job event stream). uPlot is vendored under
static/vendor/uplot with its licence."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


def mount(app: FastAPI) -> None:
    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=STATIC, html=True), name="ui")

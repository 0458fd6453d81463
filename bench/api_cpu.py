"""CPU time per request of the project's API and of the bare FastAPI baseline, in process.

    .venv/bin/python bench/api_cpu.py                         # SQLite, ~1 minute
    .venv/bin/python bench/api_cpu.py --backend postgres      # a fresh database next to --postgres-url's
    .venv/bin/python bench/api_cpu.py --requests 200          # smoke size

`api_bench.py` measures requests per second under `wrk`, which on a shared 2-core box swings 2-5x
with the neighbours' load. This script measures what those figures are made of and what does not
depend on the load: the CPU seconds (`time.process_time()`, every thread of the process) that one
request costs the server. Both apps run in this process behind httpx's ASGI transport, one request
at a time, on the same seeded database as `api_bench.py` (its `seed` and `baseline_app`); each row
is the best of three passes, minus the cost of the same client calling a bare route that does
nothing (so the figure is the server's own). At one request in flight there is no queueing, so
"CPU ratio" (baseline ÷ project) is the ratio of requests per second the project could reach when
the CPU, not the database, is the limit, which is where the `wrk` rows stand on this box.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import api_bench

ROWS: list[tuple[str, str, str]] = [
    # (row, project path, baseline path); JOB / PROJECT are filled in from the seed
    ("job", "/v1/jobs/JOB", "/one/JOB"),
    ("list jobs", "/v1/jobs?limit=50", "/list?project_id=PROJECT&limit=50"),
    ("list runs", "/v1/runs?limit=50", "/list?project_id=PROJECT&limit=50"),
    ("list feedback", "/v1/feedback?limit=50", "/list?project_id=PROJECT&limit=50"),
    ("list models", "/v1/models?limit=50", "/list?project_id=PROJECT&limit=50"),
]


async def cpu_per_request(app: Any, path: str, headers: dict[str, str], n: int) -> float:
    """Best of three passes of `n` sequential requests: CPU milliseconds per request."""
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        for _ in range(min(50, n)):  # first-use costs: statement caches, pools, imports
            (await client.get(path, headers=headers)).raise_for_status()
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for _ in range(n):
                await client.get(path, headers=headers)
            best = min(best, (time.process_time() - start) / n)
    return best * 1000


def empty_app() -> Any:
    from fastapi import FastAPI, Response

    app = FastAPI()

    @app.get("/nothing")
    async def nothing() -> Response:
        return Response(b"{}", media_type="application/json")

    return app


async def measure(project: Any, baseline: Any, seeded: api_bench.Seeded, n: int) -> list[dict[str, Any]]:
    def fill(path: str) -> str:
        return path.replace("JOB", seeded.job_id).replace("PROJECT", seeded.project_id)

    auth = {"Authorization": f"Bearer {seeded.key}"}
    client_ms = await cpu_per_request(empty_app(), "/nothing", {}, n)
    out = []
    async with project.router.lifespan_context(project):
        for row, ppath, bpath in ROWS:
            p = await cpu_per_request(project, fill(ppath), auth, n if row == "job" else max(n // 5, 20))
            b = await cpu_per_request(baseline, fill(bpath), {}, n if row == "job" else max(n // 5, 20))
            p, b = max(p - client_ms, 1e-6), max(b - client_ms, 1e-6)
            out.append({"row": row, "project_ms": p, "baseline_ms": b, "cpu_ratio": b / p})
            print(f"{row:14s} project {p:7.3f} ms  baseline {b:7.3f} ms  CPU ratio {b / p:5.2f}x", flush=True)
    return out


def run(db_url: str, work: Path, n: int) -> list[dict[str, Any]]:
    seeded = api_bench.seed(db_url, work / "data", n_runs=20, jobs_per_run=10, metric_steps=100)
    from server.app import create_app
    from server.settings import Settings

    # the rate limit out of reach, its code path kept (as api_bench.py does)
    project = create_app(Settings(data_dir=work / "data", database_url=db_url, rate_limit_per_minute=10**9))
    baseline = api_bench.baseline_app(db_url)
    return asyncio.run(measure(project, baseline, seeded, n))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--postgres-url", default=api_bench.DEFAULT_PG)
    ap.add_argument("--requests", type=int, default=1500, help="requests per pass of the job row (lists: a fifth)")
    args = ap.parse_args(argv)
    print(f"CPU per request, in process, one at a time; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="halos-apicpu-") as tmp:
        if args.backend == "sqlite":
            return run(f"sqlite:///{tmp}/bench.db", Path(tmp), args.requests)
        with api_bench.postgres_database(args.postgres_url) as url:
            return run(url, Path(tmp), args.requests)


if __name__ == "__main__":  # the app's validation pool starts processes that import this file
    main()

"""API benchmark: the project's HTTP API against a bare FastAPI service, in the same run.

    .venv/bin/python bench/api_bench.py                       # SQLite and Postgres, ~8 minutes
    .venv/bin/python bench/api_bench.py --quick               # smoke size (CI): SQLite, ~30 s
    .venv/bin/python bench/api_bench.py --backends sqlite --workers 2 --out api.json

For each backend (SQLite file / a fresh Postgres database) it seeds the database directly with real
rows (a project and its API key, a model, runs, rounds with their jobs, checkpoints, feedback files,
and one job with a 10k-step metric series), then starts two servers, one at a time, with the same
uvicorn settings (`halos serve`'s: one process, log level info, access log on):

- the project: `halos serve --no-worker --no-sweeper` (optionally `--workers N`);
- the baseline: a bare FastAPI app (`--serve-baseline`, below) whose sync routes read the same
  tables with one plain sqlite3 / psycopg query on a per-thread connection and return
  orjson-encoded bytes; its upload route streams the body to a temp file while hashing it
  (sha256), as the least any upload endpoint must do.

Measured, for the project and the baseline:

| row | project | baseline |
|---|---|---|
| job c=1/32/128 | `GET /v1/jobs/{id}` with a key | `GET /one/{id}`: one `job` row |
| list jobs/runs/feedback/models c=32 | `GET /v1/<kind>` (first page of 50) | `GET /list`: 50 `job` rows |
| metric series c=4 | `GET /v1/jobs/{id}/metrics?limit=10000` (10k steps) | `GET /series/{id}`: the same 10k rows |
| upload | `POST /v1/feedback` of a valid 200 MiB pairwise JSONL (~196k records) | `POST /upload` of the same bytes |
| during upload | p50/p99 of sequential job reads while the upload runs, against the same reads idle | same |
| RSS growth | peak RSS of the API process tree during the upload minus before | same |

Load: `wrk` (C, epoll; one thread, keep-alive connections, a Lua script adds the Authorization
header) when it is on PATH: it costs the 2-core box far less CPU than any Python client, so the
servers, not the load generator, set the pace. Without wrk (`--load python`), an asyncio + httpx
generator runs instead; its figures are bounded by the client's own CPU, so compare ratios only.
Uploads are sent by `curl` (streams the file from disk) when present, else by httpx.

Figures are noisy on a shared machine: read the ratios (project / baseline, same run).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response  # module level: the baseline's routes are annotated with them

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PG = os.environ.get("HALOS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MiB = 1024 * 1024


# --------------------------------------------------------------------------- the baseline server


def baseline_app(db_url: str) -> Any:
    """The least a service could do: FastAPI, sync routes (FastAPI's thread pool, as for any blocking
    driver), one query on a per-thread connection, orjson bytes out."""
    import orjson

    local = threading.local()
    is_pg = db_url.startswith("postgresql")
    if is_pg:
        import psycopg

        url = db_url.replace("postgresql+psycopg://", "postgresql://")

        def conn() -> Any:
            c = getattr(local, "conn", None)
            if c is None:
                c = local.conn = psycopg.connect(url, autocommit=True)
            return c

        param = "%s"
    else:
        import sqlite3

        path = db_url.removeprefix("sqlite:///")

        def conn() -> Any:
            c = getattr(local, "conn", None)
            if c is None:
                c = local.conn = sqlite3.connect(path, check_same_thread=False)
                c.execute("PRAGMA journal_mode=WAL")
            return c

        param = "?"

    def rows(sql: str, *args: Any) -> list[dict[str, Any]]:
        cur = conn().execute(sql.replace("?", param), args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    app = FastAPI()

    @app.get("/one/{job_id}")
    def one(job_id: str) -> Response:
        found = rows("SELECT * FROM job WHERE id = ?", job_id)
        if not found:
            return Response(status_code=404)
        return Response(orjson.dumps(found[0], default=str), media_type="application/json")

    @app.get("/list")
    def many(project_id: str, limit: int = 50) -> Response:
        found = rows(
            "SELECT * FROM job WHERE project_id = ? ORDER BY created_at DESC, id DESC LIMIT ?", project_id, limit
        )
        return Response(orjson.dumps({"items": found}, default=str), media_type="application/json")

    @app.get("/series/{job_id}")
    def series(job_id: str, limit: int = 10000) -> Response:
        found = rows(
            "SELECT step, split, attempt, data, created_at FROM metricpoint WHERE job_id = ? ORDER BY step LIMIT ?",
            job_id,
            limit,
        )
        for r in found:
            if isinstance(r["data"], (str, bytes)):
                r["data"] = orjson.loads(r["data"])
        return Response(orjson.dumps({"items": found}, default=str), media_type="application/json")

    @app.post("/upload")
    async def upload(request: Request) -> Response:
        digest = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=os.environ.get("BENCH_UPLOAD_DIR"))
        try:
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
        return Response(orjson.dumps({"sha256": digest.hexdigest(), "size": size}), media_type="application/json")

    return app


def serve_baseline(db_url: str, host: str, port: int) -> None:
    import uvicorn

    from server.cli import EVENT_LOOP

    # the same uvicorn settings as `halos serve` (server/cli.py): one process, log level info, its event loop
    config = uvicorn.Config(
        baseline_app(db_url), host=host, port=port, log_level="info", lifespan="on", loop=EVENT_LOOP
    )
    uvicorn.Server(config).run()


# --------------------------------------------------------------------------- seeding


@dataclass
class Seeded:
    key: str
    project_id: str
    job_id: str  # a succeeded round with a checkpoint
    series_job_id: str  # the job with the long metric series
    metric_steps: int


def seed(db_url: str, data_dir: Path, *, n_runs: int, jobs_per_run: int, metric_steps: int) -> Seeded:
    """Real rows through the project's models (schema from the migrations), no training run."""
    from sqlalchemy import insert
    from sqlmodel import Session

    from server import migrate
    from server.db import make_engine
    from server.models import Checkpoint, FeedbackFile, Job, JobStatus, MetricPoint, Model, Round, Run
    from server.services.keys import create_api_key
    from server.settings import Settings

    settings = Settings(data_dir=data_dir, database_url=db_url)
    settings.ensure_dirs()
    migrate.upgrade(settings)
    engine = make_engine(db_url)
    rng = random.Random(0)
    t0 = datetime.now(UTC) - timedelta(days=1)
    try:
        with Session(engine, expire_on_commit=False) as s:
            key, secret = create_api_key(s, "bench")
            pid = key.project_id
            other_key, _ = create_api_key(s, "other")  # a second project: lists must filter
            model = Model(project_id=pid, name="sft", path=str(data_dir / "sft"), sha256="0" * 64)
            s.add(model)
            fbs = [
                FeedbackFile(
                    project_id=pid,
                    kind="pairwise",
                    format="halos_jsonl",
                    sha256=f"{i:064x}",
                    size_bytes=1000 + i,
                    n_records=10,
                    n_prompts=10,
                    n_train=9,
                    n_test=1,
                    storage_path=f"feedback/{i:064x}.jsonl",
                    original_filename=f"f{i}.jsonl",
                    created_at=t0 + timedelta(seconds=i),
                )
                for i in range(60)
            ]
            s.add_all(fbs)
            s.flush()
            first_done = None
            series_job = None
            for r in range(n_runs):
                run = Run(
                    project_id=pid,
                    name=f"run-{r}",
                    model_id=model.id,
                    loss={"name": "dpo", "beta": 0.1},
                    hyperparams={"batch_size": 8},
                    created_at=t0 + timedelta(minutes=r),
                )
                s.add(run)
                s.flush()
                parent_round = parent_job = parent_ckpt = None
                for k in range(jobs_per_run):
                    done = k < jobs_per_run - 1
                    when = t0 + timedelta(minutes=r, seconds=k)
                    job = Job(
                        project_id=pid,
                        status=JobStatus.succeeded if done else JobStatus.queued,
                        attempt=1 if done else 0,
                        spec={"feedback": [fbs[k % len(fbs)].id]},
                        run_dir=str(data_dir / "runs" / f"r{r}-{k}"),
                        step=(k + 1) * 16,
                        round_step=16,
                        total_steps=16,
                        examples=(k + 1) * 128,
                        latest_metrics={"loss": round(rng.random(), 4), "lr": 1e-6, "grad_norm": 1.5},
                        parent_job_id=parent_job.id if parent_job else None,
                        created_at=when,
                        queued_at=when,
                        started_at=when if done else None,
                        finished_at=when + timedelta(seconds=30) if done else None,
                        updated_at=when,
                    )
                    s.add(job)
                    s.flush()
                    rnd = Round(
                        project_id=pid,
                        run_id=run.id,
                        index=k + 1,
                        job_id=job.id,
                        parent_round_id=parent_round.id if parent_round else None,
                        parent_checkpoint_id=parent_ckpt.id if parent_ckpt else None,
                        feedback_ids=[fbs[k % len(fbs)].id],
                        loss={"name": "dpo", "beta": 0.1},
                        hyperparams={"batch_size": 8},
                        created_at=when,
                    )
                    s.add(rnd)
                    s.flush()
                    ckpt = None
                    if done:
                        ckpt = Checkpoint(
                            project_id=pid,
                            run_id=run.id,
                            round_id=rnd.id,
                            job_id=job.id,
                            model_id=model.id,
                            parent_id=parent_ckpt.id if parent_ckpt else None,
                            path=str(data_dir / "runs" / f"r{r}-{k}" / "final"),
                            manifest_sha256="1" * 64,
                            step=job.step,
                            examples=job.examples,
                            created_at=when + timedelta(seconds=30),
                        )
                        s.add(ckpt)
                        s.flush()
                        rnd.checkpoint_id = ckpt.id
                        first_done = first_done or job
                    parent_round, parent_job, parent_ckpt = rnd, job, ckpt
                if series_job is None and first_done is not None:
                    series_job = first_done
            s.commit()
            # the long series: one train point per step, an eval point every 100 steps
            points = []
            for step in range(1, metric_steps + 1):
                points.append(
                    {
                        "job_id": series_job.id,
                        "attempt": 1,
                        "step": step,
                        "split": "train",
                        "data": {
                            "step": step,
                            "loss": round(0.7 - step * 1e-5, 6),
                            "lr": 1e-6,
                            "grad_norm": 1.0,
                            "tokens_per_s": 1234.5,
                            "rewards/chosen": 0.1,
                            "rewards/rejected": -0.1,
                            "rewards/accuracy": 0.75,
                            "rewards/margin": 0.2,
                        },
                        "created_at": t0 + timedelta(seconds=step),
                    }
                )
                if step % 100 == 0:
                    points.append(
                        {
                            "job_id": series_job.id,
                            "attempt": 1,
                            "step": step,
                            "split": "eval",
                            "data": {"step": step, "loss": 0.6},
                            "created_at": t0 + timedelta(seconds=step),
                        }
                    )
            for i in range(0, len(points), 2000):
                s.execute(insert(MetricPoint), points[i : i + 2000])
            s.commit()
            del other_key
            return Seeded(
                key=secret, project_id=pid, job_id=first_done.id, series_job_id=series_job.id, metric_steps=metric_steps
            )
    finally:
        engine.dispose()


def write_pairwise_jsonl(path: Path, size_bytes: int, seed_: int = 0) -> int:
    """A valid HALOs pairwise JSONL of about `size_bytes` (~1.07 kB a record: 200 MiB ≈ 196k records)."""
    rng = random.Random(seed_)
    words = (
        "alpha beta gamma delta river stone cloud tiger piano garden rocket candle forest mirror bridge "
        "pepper island violin desert marble harbor meadow copper falcon"
    ).split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    n = 0
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size_bytes:
            rec = {
                "type": "pairwise_feedback",
                "prompt_id": f"p{n}",
                "prompt": [{"role": "user", "content": text(22)}],
                "output_A": [{"role": "assistant", "content": text(42)}],
                "output_B": [{"role": "assistant", "content": text(42)}],
                "label": n % 2,
                "reward_A": 1.0,
                "reward_B": 0.0,
                "split": "test" if n % 10 == 0 else "train",
            }
            line = json.dumps(rec) + "\n"
            fh.write(line)
            written += len(line)
            n += 1
    return n


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not start")


@contextmanager
def running(cmd: list[str], env: dict[str, str], ready_url: str, log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        wait_ready(ready_url)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def tree_pids(pid: int) -> list[int]:
    """`pid` and its descendants (children of every thread: a pool may be started from any)."""
    pids = [pid]
    for p in pids:
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                pids.extend(int(k) for k in (task / "children").read_text().split())
            except OSError:
                pass
    return pids


def rss_bytes(pid: int) -> tuple[int, int]:
    """(RSS of `pid`, RSS of `pid` and all its descendants)."""
    total = own = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    value = int(line.split()[1]) * 1024
                    total += value
                    own = value if p == pid else own
        except OSError:
            pass
    return own, total


# --------------------------------------------------------------------------- load generation


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


_WRK_LUA = """
local paths = {%(paths)s}
local i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i], {["Authorization"] = "%(auth)s"})
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk_load(base: str, paths: list[str], auth: str, conns: int, seconds: float, workdir: Path) -> Load:
    script = workdir / f"wrk-{secrets.token_hex(4)}.lua"
    script.write_text(_WRK_LUA % {"paths": ", ".join(json.dumps(p) for p in paths), "auth": auth})
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "--timeout",
            "30s",
            "-s",
            str(script),
            base + paths[0],
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return Load(rps, _ms(pct["50"]), _ms(pct["99"]), requests, errors)


def python_load(base: str, paths: list[str], auth: str, conns: int, seconds: float, workdir: Path) -> Load:
    import httpx

    async def main() -> tuple[list[float], int]:
        lat: list[float] = []
        errors = 0
        stop = time.perf_counter() + seconds
        limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": auth}, limits=limits, timeout=30
        ) as client:

            async def worker(i: int) -> None:
                nonlocal errors
                k = i
                while time.perf_counter() < stop:
                    t = time.perf_counter()
                    resp = await client.get(paths[k % len(paths)])
                    lat.append(time.perf_counter() - t)
                    errors += resp.status_code >= 400
                    k += 1

            await asyncio.gather(*(worker(i) for i in range(conns)))
        return lat, errors

    t0 = time.perf_counter()
    lat, errors = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    lat.sort()
    return Load(
        len(lat) / elapsed,
        1000 * lat[len(lat) // 2],
        1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        len(lat),
        errors,
    )


def probe(
    base: str, path: str, auth: str, stop: threading.Event, out: list[float], errors: list[int], pause_s: float = 0.01
) -> None:
    """Sequential reads, one every `pause_s`, on one keep-alive connection: the latency another
    client sees while something else (an upload) runs."""
    import httpx

    with httpx.Client(base_url=base, headers={"Authorization": auth}, timeout=60) as client:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status = client.get(path).status_code
            except httpx.HTTPError:
                status = 0
            out.append(time.perf_counter() - t)
            if status != 200:
                errors.append(status)
            stop.wait(pause_s)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


@dataclass
class UploadResult:
    seconds: float
    mib_per_s: float
    status: int
    rss_own_growth_mib: float
    rss_tree_growth_mib: float
    probe_idle_p50_ms: float
    probe_idle_p99_ms: float
    probe_busy_p50_ms: float
    probe_busy_p99_ms: float
    probe_requests: int
    probe_errors: int


def upload(
    base: str, path: str, file: Path, auth: str, server_pid: int, probe_path: str, idle_s: float
) -> UploadResult:
    # the same reads, first with nothing else running, then during the upload
    idle: list[float] = []
    errs: list[int] = []
    stop = threading.Event()
    t = threading.Thread(target=probe, args=(base, probe_path, auth, stop, idle, errs))
    t.start()
    time.sleep(idle_s)
    stop.set()
    t.join()
    busy: list[float] = []
    stop = threading.Event()
    rss_before = rss_bytes(server_pid)
    peak = list(rss_before)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            own, tree = rss_bytes(server_pid)
            peak[0], peak[1] = max(peak[0], own), max(peak[1], tree)
            sampling.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    prober = threading.Thread(target=probe, args=(base, probe_path, auth, stop, busy, errs))
    prober.start()
    t0 = time.perf_counter()
    size = file.stat().st_size
    if shutil.which("curl"):
        res = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-T",
                str(file),
                "-H",
                "Content-Type: application/x-ndjson",
                "-H",
                f"Authorization: {auth}",
                "-H",
                "Expect:",
                base + path,
            ],
            capture_output=True,
            text=True,
        )
        status = int(res.stdout.strip() or 0)
    else:
        import httpx

        def body() -> Iterator[bytes]:
            with open(file, "rb") as fh:
                while chunk := fh.read(MiB):
                    yield chunk

        status = httpx.post(
            base + path,
            content=body(),
            timeout=600,
            headers={"Content-Type": "application/x-ndjson", "Authorization": auth, "Content-Length": str(size)},
        ).status_code
    seconds = time.perf_counter() - t0
    stop.set()
    prober.join()
    sampling.set()
    sampler.join()
    return UploadResult(
        seconds=seconds,
        mib_per_s=size / MiB / seconds,
        status=status,
        rss_own_growth_mib=(peak[0] - rss_before[0]) / MiB,
        rss_tree_growth_mib=(peak[1] - rss_before[1]) / MiB,
        probe_idle_p50_ms=1000 * percentile(idle, 0.5),
        probe_idle_p99_ms=1000 * percentile(idle, 0.99),
        probe_busy_p50_ms=1000 * percentile(busy, 0.5),
        probe_busy_p99_ms=1000 * percentile(busy, 0.99),
        probe_requests=len(idle) + len(busy),
        probe_errors=len(errs),
    )


# --------------------------------------------------------------------------- the run


@dataclass
class Row:
    backend: str
    what: str
    project: dict[str, Any]
    baseline: dict[str, Any]
    ratio: dict[str, float] = field(default_factory=dict)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def bench_backend(
    backend: str, db_url: str, args: argparse.Namespace, work: Path, upload_file: Path, load_fn: Any
) -> list[Row]:
    data_dir = work / f"data-{backend}"
    seeded = seed(db_url, data_dir, n_runs=args.runs, jobs_per_run=args.jobs_per_run, metric_steps=args.metric_steps)
    auth = f"Bearer {seeded.key}"
    env = {
        **os.environ,
        "HALOS_DATA_DIR": str(data_dir),
        "HALOS_DATABASE_URL": db_url,
        "HALOS_RATE_LIMIT_PER_MINUTE": str(10**9),
        "HALOS_MAX_UPLOAD_BYTES": str(upload_file.stat().st_size + MiB),
        "BENCH_UPLOAD_DIR": str(data_dir / "tmp"),
        "PYTHONUNBUFFERED": "1",
    }
    py = sys.executable
    results: dict[str, dict[str, Any]] = {"project": {}, "baseline": {}}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [
        py,
        "-m",
        "server.cli",
        "serve",
        "--no-worker",
        "--no-sweeper",
        "--no-migrate",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if args.workers > 1:
        serve += ["--workers", str(args.workers)]
    servers = {
        "project": (
            serve,
            f"{base}/healthz",
            {
                "job": [f"/v1/jobs/{seeded.job_id}"],
                "list jobs": ["/v1/jobs?limit=50"],
                "list runs": ["/v1/runs?limit=50"],
                "list feedback": ["/v1/feedback?limit=50"],
                "list models": ["/v1/models?limit=50"],
                "series": [f"/v1/jobs/{seeded.series_job_id}/metrics?limit={seeded.metric_steps}"],
                "upload": "/v1/feedback",
            },
        ),
        "baseline": (
            [py, str(Path(__file__).resolve()), "--serve-baseline", db_url, "--port", str(port)],
            f"{base}/one/none",
            {
                "job": [f"/one/{seeded.job_id}"],
                **{
                    k: [f"/list?project_id={seeded.project_id}&limit=50"]
                    for k in ("list jobs", "list runs", "list feedback", "list models")
                },
                "series": [f"/series/{seeded.series_job_id}?limit={seeded.metric_steps}"],
                "upload": "/upload",
            },
        ),
    }
    for name, (cmd, ready, paths) in servers.items():
        print(f"[{backend}] {name}: starting", file=sys.stderr, flush=True)
        with running(cmd, env, ready, work / f"{backend}-{name}.log") as proc:
            res = results[name]

            def measure(label: str, conns: int, seconds: float) -> None:
                if args.warmup > 0:
                    load_fn(base, paths[label], auth, conns, min(args.warmup, seconds), work)  # warm caches/pools
                res[f"{label} c={conns}"] = asdict(load_fn(base, paths[label], auth, conns, seconds, work))
                print(f"[{backend}] {name} {label} c={conns}: {res[f'{label} c={conns}']}", file=sys.stderr, flush=True)

            if "reads" in args.only:
                for conns in args.conns:
                    measure("job", conns, args.duration)
                for label in ("list jobs", "list runs", "list feedback", "list models"):
                    measure(label, 32, args.duration / 2)
                measure("series", 4, args.duration * 2)  # a 10k-point page is slow: give it time for a few
            if "upload" not in args.only:
                continue
            # a small upload first (first-use costs: pools, imports), then the measured one
            small = work / "small.jsonl"
            if not small.exists():
                write_pairwise_jsonl(small, 64 * 1024, seed_=1)
            upload(base, paths["upload"], small, auth, proc.pid, paths["job"][0], 0.2)
            up = upload(base, paths["upload"], upload_file, auth, proc.pid, paths["job"][0], args.idle)
            res["upload"] = asdict(up)
            print(f"[{backend}] {name} upload: {res['upload']}", file=sys.stderr, flush=True)
    rows: list[Row] = []
    for key in results["project"]:
        p, b = results["project"][key], results["baseline"][key]
        if key == "upload":
            rows.append(Row(backend, "upload", p, b, {"mib_per_s": _ratio(p["mib_per_s"], b["mib_per_s"])}))
        else:
            rows.append(
                Row(backend, key, p, b, {"rps": _ratio(p["rps"], b["rps"]), "p99": _ratio(p["p99_ms"], b["p99_ms"])})
            )
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        f"{'backend':8} {'what':22} | {'project req/s':>13} {'p50 ms':>8} {'p99 ms':>8} | "
        f"{'baseline req/s':>14} {'p50 ms':>8} {'p99 ms':>8} | {'req/s x':>7} {'p99 x':>6} | errors"
    ]
    lines.append("-" * len(lines[0]))
    uploads = []
    for r in rows:
        if r.what == "upload":
            uploads.append(r)
            continue
        p, b = r.project, r.baseline
        lines.append(
            f"{r.backend:8} {r.what:22} | {p['rps']:13.1f} {p['p50_ms']:8.1f} {p['p99_ms']:8.1f} | "
            f"{b['rps']:14.1f} {b['p50_ms']:8.1f} {b['p99_ms']:8.1f} | {r.ratio['rps']:7.2f} "
            f"{r.ratio['p99']:6.2f} | {p['errors']}/{b['errors']}"
        )
    lines.append("")
    lines.append(
        f"{'backend':8} {'upload':22} | {'MiB/s':>8} {'s':>6} {'HTTP':>4} {'RSS own/tree +MiB':>17} | "
        f"{'reads idle p50/p99 ms':>21} {'during upload p50/p99':>21} {'p99 x':>6}"
    )
    for r in uploads:
        for who, u in (("project", r.project), ("baseline", r.baseline)):
            lines.append(
                f"{r.backend:8} {who:22} | {u['mib_per_s']:8.1f} {u['seconds']:6.2f} {u['status']:4d} "
                f"{u['rss_own_growth_mib']:8.1f}/{u['rss_tree_growth_mib']:8.1f} | "
                f"{u['probe_idle_p50_ms']:10.1f}/{u['probe_idle_p99_ms']:10.1f} "
                f"{u['probe_busy_p50_ms']:10.1f}/{u['probe_busy_p99_ms']:10.1f} "
                f"{_ratio(u['probe_busy_p99_ms'], u['probe_idle_p99_ms']):6.2f}"
            )
        lines.append(f"{r.backend:8} {'upload ratio':22} | {r.ratio['mib_per_s']:8.2f}x project/baseline")
    return "\n".join(lines)


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    import psycopg

    name = f"halos_apibench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke size: SQLite, 1 s runs, 8 MiB upload, 1k steps")
    ap.add_argument("--backends", default=None, help="comma list of sqlite,postgres (default both; --quick: sqlite)")
    ap.add_argument("--postgres-url", default=DEFAULT_PG, help="an existing database to CREATE/DROP the bench's in")
    ap.add_argument("--duration", type=float, default=None, help="seconds per load run (default 8; quick 1)")
    ap.add_argument(
        "--warmup", type=float, default=None, help="seconds of unmeasured load first (default 2; quick 0.5)"
    )
    ap.add_argument("--conns", default="1,32,128", help="connections for the job-read rows")
    ap.add_argument("--upload-mib", type=float, default=None, help="upload size (default 200; quick 8)")
    ap.add_argument("--metric-steps", type=int, default=None, help="points of the long series (default 10000)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--jobs-per-run", type=int, default=10)
    ap.add_argument("--idle", type=float, default=None, help="seconds of idle probing before the upload")
    ap.add_argument(
        "--only",
        default="reads,upload",
        help="comma list of the parts to run: reads (job/list/series rows), upload (default both), "
        "validator (the upload file's validation + data-quality pass alone, in this process)",
    )
    ap.add_argument("--workers", type=int, default=1, help="API processes of the project (halos serve --workers)")
    ap.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--workdir", type=Path, default=None, help="keep databases, logs and the upload file here")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    ap.add_argument("--serve-baseline", metavar="DB_URL", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.backends = (args.backends or ("sqlite" if q else "sqlite,postgres")).split(",")
    args.duration = args.duration if args.duration is not None else (1.0 if q else 8.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 2.0)
    args.upload_mib = args.upload_mib if args.upload_mib is not None else (8.0 if q else 200.0)
    args.metric_steps = args.metric_steps if args.metric_steps is not None else (1000 if q else 10000)
    args.idle = args.idle if args.idle is not None else (0.5 if q else 3.0)
    if q:
        args.runs, args.jobs_per_run = min(args.runs, 6), min(args.jobs_per_run, 10)
    args.conns = [int(c) for c in str(args.conns).split(",")]
    args.only = set(args.only.split(","))
    if not args.only or not args.only <= {"reads", "upload", "validator"}:
        raise SystemExit(f"--only: a comma list of reads, upload, validator; got {','.join(sorted(args.only))!r}")
    return args


def validator_alone(path: Path) -> None:
    """What the validation workers do for one upload, in one process: `quality.check` (validation
    + data-quality findings) on the whole file; MiB per second of this process's CPU time."""
    from halos_core.feedback import FeedbackLimits
    from halos_core.feedback.quality import check

    size = path.stat().st_size / MiB
    for _ in range(2):
        cpu, wall = time.process_time(), time.perf_counter()
        summary, found = check(path, FeedbackLimits())
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"validator alone (quality.check, one process): {size / cpu:.1f} MiB/s of CPU ({cpu:.2f} s CPU, "
            f"{wall:.2f} s wall), {summary.n_records} records, findings {found.counts or 'none'}; "
            f"load average {os.getloadavg()[0]:.1f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, "127.0.0.1", args.port)
        return {}
    use_wrk = args.load == "wrk" or (args.load == "auto" and shutil.which("wrk"))
    load_fn = wrk_load if use_wrk else python_load
    load_name = "wrk" if use_wrk else "python (asyncio+httpx; client-bound)"
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="halos-apibench-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    try:
        upload_file = work / f"pairwise-{args.upload_mib:g}MiB.jsonl"
        if not upload_file.exists():
            n = write_pairwise_jsonl(upload_file, int(args.upload_mib * MiB))
            print(f"wrote {upload_file} ({n} records)", file=sys.stderr)
        if "validator" in args.only:
            validator_alone(upload_file)
        rows: list[Row] = []
        for backend in args.backends if args.only & {"reads", "upload"} else []:
            if backend == "sqlite":
                rows += bench_backend("sqlite", f"sqlite:///{work / 'bench.db'}", args, work, upload_file, load_fn)
            elif backend == "postgres":
                with postgres_database(args.postgres_url) as url:
                    rows += bench_backend("postgres", url, args, work, upload_file, load_fn)
            else:
                raise SystemExit(f"unknown backend {backend!r}")
        header = (
            f"load: {load_name}; project: halos serve, {args.workers} API process(es); "
            f"{args.duration:g} s per run; upload {args.upload_mib:g} MiB; series {args.metric_steps} steps; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        table = format_table(rows)
        if rows:
            print(header)
            print(table)
        report = {"header": header, "rows": [asdict(r) for r in rows], "table": table}
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()

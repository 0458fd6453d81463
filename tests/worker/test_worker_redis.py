"""Q2 and Q3 on Postgres + Redis (a private redis-server on a free port, never the shared one)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from sqlmodel import Session

from server import migrate, queue
from server.db import make_engine
from server.models import JobStatus
from tests.worker.support import (
    TERMINAL,
    WorkerProc,
    add_round,
    attempts,
    fresh_pg_database,
    make_settings,
    overlapping_attempts,
    pg_available,
    seed_run,
    wait_for,
    wait_status,
)

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throw-away redis-server without persistence (a restart loses every queued message)."""

    def __init__(self, root: Path):
        self.port = _free_port()
        self.root = root
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(up, 10, interval=0.05, what="redis-server up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def pg_redis(tmp_path: Path):
    if not pg_available() or shutil.which("redis-server") is None:
        pytest.skip("PostgreSQL or redis-server not available")
    redis = RedisServer(tmp_path)
    with fresh_pg_database() as url:
        yield url, redis
    redis.stop()
    queue.reset()


def _env(tmp_path: Path, url: str, redis: RedisServer, **overrides):
    settings = make_settings(tmp_path / "data", database_url=url, broker_url=redis.url, **overrides)
    settings.ensure_dirs()
    migrate.upgrade(settings)
    engine = make_engine(url)
    session = Session(engine, expire_on_commit=False)
    run = seed_run(session, tmp_path)
    return settings, engine, session, run


def test_q2_job_longer_than_visibility_timeout_runs_once(tmp_path, pg_redis):
    url, redis = pg_redis
    settings, engine, s, run = _env(tmp_path, url, redis, redis_visibility_timeout_s=10)
    workers = [WorkerProc(settings, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        job = add_round(s, run, tmp_path, {"steps": 40, "sleep": 0.5, "checkpoint_every": 10})  # ~20 s
        t0 = time.monotonic()
        queue.publish(job.id, settings)
        j = wait_status(s, job.id, TERMINAL, 120)
        elapsed = time.monotonic() - t0
    finally:
        for w in workers:
            w.stop()
    rows = attempts(s, job.id)
    redeliveries = sum(w.log_path.read_text().count(f"job {job.id} not claimable") for w in workers)
    assert j.status == JobStatus.succeeded, j.error
    assert len(rows) == 1 and rows[0].outcome == "succeeded"
    print(
        f"\n[Q2] trials=1, job_s={elapsed:.1f}, visibility_timeout_s=10, redeliveries_absorbed={redeliveries}, "
        f"attempts={len(rows)}, jobs_lost=0, duplicate_attempts={len(rows) - 1}"
    )
    s.close()
    engine.dispose()


def test_q3_redis_restart_with_jobs_queued_and_running(tmp_path, pg_redis):
    url, redis = pg_redis
    settings, engine, s, run = _env(tmp_path, url, redis)
    worker = WorkerProc(settings, tmp_path / "w.log").wait_ready()
    try:
        ids = [add_round(s, run, tmp_path, {"steps": 8, "sleep": 0.3}).id for _ in range(3)]
        for job_id in ids:
            queue.publish(job_id, settings)
        wait_for(lambda: attempts(s, ids[0]), 60, what="first job running")
        t_restart = time.monotonic()
        redis.stop()  # SIGKILL: queued messages are gone (no persistence)
        time.sleep(1.0)
        redis.start()
        final = [wait_status(s, job_id, TERMINAL, 120) for job_id in ids]
        recovered = time.monotonic() - t_restart
    finally:
        worker.stop()
    rows = {job_id: attempts(s, job_id) for job_id in ids}
    assert [j.status for j in final] == [JobStatus.succeeded] * 3, [j.error for j in final]
    assert all(len(r) == 1 for r in rows.values()), {k: [a.outcome for a in v] for k, v in rows.items()}
    dups = sum(len(r) - 1 + overlapping_attempts(r) for r in rows.values())
    print(
        f"\n[Q3] trials=1, jobs=3 (1 running, 2 queued at the restart), all_done_after_restart_s={recovered:.1f}, "
        f"jobs_lost=0, duplicate_attempts={dups}"
    )
    s.close()
    engine.dispose()

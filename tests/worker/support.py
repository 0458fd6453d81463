"""Helpers for the queue/worker tests: short settings, seeded rows, worker processes, Postgres DBs."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server import jobs
from server.db import make_engine
from server.models import Attempt, Job, JobStatus, Model, Project, Round, Run, utcnow
from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("HALOS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")

# short timings for the fault tests (the defaults are 60/5/10/30 s)
FAST = {
    "lease_ttl_s": 3.0,
    "heartbeat_interval_s": 0.5,
    "sweep_interval_s": 1.0,
    "kill_grace_s": 2.0,
    "republish_after_s": 3.0,
    "retry_backoff_s": 0.5,
    "max_attempts": 3,
    "use_cpu": True,
    "trainer_module": "tests.worker.fake_trainer",
}


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values = {**FAST, **overrides}
    return Settings(data_dir=data_dir, **values)


def settings_env(settings: Settings) -> dict[str, str]:
    """HALOS_* environment that reproduces `settings` in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HALOS_")}
    env["HALOS_DATA_DIR"] = str(settings.data_dir)
    env["HALOS_DATABASE_URL"] = settings.db_url
    env["HALOS_BROKER_URL"] = settings.broker
    for key in (
        "lease_ttl_s",
        "heartbeat_interval_s",
        "sweep_interval_s",
        "kill_grace_s",
        "republish_after_s",
        "retry_backoff_s",
        "max_attempts",
        "trainer_module",
        "redis_visibility_timeout_s",
    ):
        env[f"HALOS_{key.upper()}"] = str(getattr(settings, key))
    env["HALOS_USE_CPU"] = "true" if settings.use_cpu else "false"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def engine_for(settings: Settings) -> Engine:
    return make_engine(settings.db_url)


# --------------------------------------------------------------------------- rows


def seed_run(session: Session, root: Path) -> Run:
    project = Project(name=f"p-{secrets.token_hex(4)}")
    session.add(project)
    session.flush()
    model_dir = root / "sft"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text("{}")
    model = Model(project_id=project.id, name="sft", path=str(model_dir), sha256="0" * 64)
    session.add(model)
    session.flush()
    run = Run(project_id=project.id, model_id=model.id, loss={"name": "dpo"}, hyperparams={})
    session.add(run)
    session.commit()
    return run


def make_spec(feedback_path: Path, reference: str, **hp: Any) -> dict[str, Any]:
    return {
        "reference_path": reference,
        "reference_sha256": "0" * 64,
        "init_from": None,
        "init_from_checkpoint_id": None,
        "counters": {"step": 0, "examples": 0},
        "feedback": [{"path": str(feedback_path), "kind": "pairwise", "file_id": "fb_test"}],
        "loss": {"name": "dpo", "beta": 0.1},
        "conversion": None,
        "hyperparams": {"batch_size": 1, "microbatch_size": 1, **hp},
        "lora": None,
    }


def add_round(
    session: Session, run: Run, root: Path, fake: dict | None = None, *, parent: Job | None = None, submit: bool = True
) -> Job:
    """A Round + its Job as the API creates them (`jobs.submit`, no publish)."""
    idx = len(session.exec(select(Round).where(Round.run_id == run.id)).all()) + 1
    fb = root / "feedback" / f"{run.id}-{idx}.json"
    fb.parent.mkdir(parents=True, exist_ok=True)
    fb.write_text(json.dumps({"fake": fake or {}}))
    model = session.get(Model, run.model_id)
    job = Job(project_id=run.project_id, spec=make_spec(fb, model.path), parent_job_id=parent.id if parent else None)
    parent_round = session.exec(select(Round).where(Round.job_id == parent.id)).one() if parent else None
    rnd = Round(
        project_id=run.project_id,
        run_id=run.id,
        index=idx,
        job_id=job.id,
        parent_round_id=parent_round.id if parent_round else None,
        feedback_ids=["fb_test"],
        loss={"name": "dpo"},
        hyperparams={},
    )
    session.add(rnd)
    if submit:
        jobs.submit(session, job, max_attempts=3)
    else:
        session.add(job)
        session.commit()
    return job


def reload(session: Session, job_id: str) -> Job:
    """Fresh row; the read transaction is ended at once (on SQLite it holds the write lock)."""
    job = session.get(Job, job_id, populate_existing=True)  # (expire_all would make other objects lazy-load
    session.commit()  #  later, opening a transaction that holds the lock)
    return job


def attempts(session: Session, job_id: str) -> list[Attempt]:
    rows = list(
        session.exec(
            select(Attempt)
            .where(Attempt.job_id == job_id)
            .order_by(Attempt.attempt)
            .execution_options(populate_existing=True)
        ).all()
    )
    session.commit()
    return rows


def overlapping_attempts(rows: list[Attempt]) -> int:
    """Pairs of attempts of one job whose [started_at, ended_at] intervals overlap (I2)."""
    bad = 0
    rows = sorted(rows, key=lambda a: a.started_at)
    for a, b in zip(rows, rows[1:]):
        if a.ended_at is None or a.ended_at > b.started_at:
            bad += 1
    return bad


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_status(session: Session, job_id: str, statuses: set[JobStatus], timeout: float) -> Job:
    return wait_for(
        lambda: (j := reload(session, job_id)).status in statuses and j,
        timeout,
        what=f"job {job_id} to reach {sorted(s.value for s in statuses)}",
    )


TERMINAL = {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def trainer_starts(run_dir: Path) -> list[dict]:
    path = run_dir / "starts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- processes


class WorkerProc:
    """`halos worker` as a real subprocess (its own process group, so the test can kill it)."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        *,
        sweeper: bool = True,
        concurrency: int = 1,
        extra_env: dict[str, str] | None = None,
    ):
        cmd = [sys.executable, "-m", "server.cli", "worker", "--loglevel", "INFO", "--concurrency", str(concurrency)]
        if not sweeper:
            cmd.append("--no-sweeper")
        env = {**settings_env(settings), **(extra_env or {})}
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 60) -> WorkerProc:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            return b"ready." in self.log_path.read_bytes()

        wait_for(ready, timeout, what="worker ready")
        return self

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# --------------------------------------------------------------------------- Postgres


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A uniquely named, empty database (dropped afterwards); yields its URL."""
    import psycopg

    name = f"halos_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        from server.db import _engine_for

        _engine_for.cache_clear()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def now() -> Any:
    return utcnow()

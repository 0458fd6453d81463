"""Real processes for end-to-end tests: `halos serve` / `halos worker` subprocesses, real HTTP."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest

BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sft_root(tmp_path_factory) -> Path:
    """The directory the e2e tests' SFT models are built in, shared by every test of the session."""
    return tmp_path_factory.mktemp("sft")


@pytest.fixture(scope="session", autouse=True)
def _sft_root_allowed(sft_root: Path) -> None:
    """Every deployment lists sft_root in HALOS_MODEL_ROOTS, as an operator lists the directory of
    their SFT models (without it only <data_dir>/models is allowed). Session-scoped, so module-scoped
    deployments see it too."""
    Deployment.model_roots = str(sft_root)


@pytest.fixture(scope="session")
def tiny_model_dir(sft_root: Path) -> Path:
    path = sft_root / "tiny"
    subprocess.run([sys.executable, "-m", "halos_core.tiny", str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


class Deployment:
    """One halos deployment: a data dir, env, an API key, server (+ worker) processes."""

    model_roots = ""  # HALOS_MODEL_ROOTS of every deployment: set by the session fixture above

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None):
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {
            **os.environ,
            "HALOS_DATA_DIR": str(data_dir),
            "HALOS_PORT": str(self.port),
            "HALOS_HEARTBEAT_INTERVAL_S": "0.5",
            "HALOS_SWEEP_INTERVAL_S": "1",
            "HALOS_LEASE_TTL_S": "10",
            "HALOS_KILL_GRACE_S": "5",
            "PYTHONUNBUFFERED": "1",
            "HALOS_MODEL_ROOTS": self.model_roots,
            **(extra_env or {}),
        }
        self.procs: list[subprocess.Popen] = []
        self.key: str | None = None

    def halos(self, *args: str) -> str:
        out = subprocess.run([str(BIN / "halos"), *args], env=self.env, capture_output=True, text=True)
        assert out.returncode == 0, f"halos {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def spawn(self, *args: str, log_name: str) -> subprocess.Popen:
        log = open(self.data_dir / log_name, "w")
        proc = subprocess.Popen(
            [str(BIN / "halos"), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", timeout=60, headers={"Authorization": f"Bearer {self.key}"}
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5) as c:
            while time.monotonic() < deadline:
                try:
                    if c.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        raise AssertionError(f"server not ready; log:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.data_dir.glob("*.log"))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@contextmanager
def embedded_deployment(data_dir: Path, extra_env: dict[str, str] | None = None) -> Iterator[Deployment]:
    """`halos serve` with no configuration: SQLite + embedded broker, API + worker + sweeper."""
    dep = Deployment(data_dir, extra_env)
    dep.env.pop("HALOS_DATABASE_URL", None)
    dep.env.pop("HALOS_BROKER_URL", None)
    dep.halos("migrate")
    dep.key = dep.halos("keys", "create", "--project", "e2e").strip()
    dep.spawn("serve", "--port", str(dep.port), log_name="serve.log")
    try:
        dep.wait_ready()
        yield dep
    finally:
        dep.stop()


@contextmanager
def scaled_out_deployment(data_dir: Path) -> Iterator[Deployment]:
    """Postgres + Redis; the API and a worker as separate processes."""
    db_name = f"halos_e2e_{secrets.token_hex(4)}"
    redis_db = 11
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    subprocess.run(["redis-cli", "-n", str(redis_db), "FLUSHDB"], check=True, capture_output=True)
    dep = Deployment(
        data_dir,
        {
            "HALOS_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{db_name}",
            "HALOS_BROKER_URL": f"{REDIS_URL}/{redis_db}",
        },
    )
    try:
        dep.halos("migrate")
        dep.key = dep.halos("keys", "create", "--project", "e2e").strip()
        dep.spawn("serve", "--no-worker", "--port", str(dep.port), log_name="api.log")
        dep.spawn("worker", log_name="worker.log")
        dep.wait_ready()
        yield dep
    finally:
        dep.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

"""`halos` console script: keys, migrate, and `halos serve` (API + sweeper + worker child) end to end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.worker.conftest import Env
from tests.worker.support import REPO, TERMINAL, add_round, attempts, pid_alive, settings_env, wait_for, wait_status

HALOS = [sys.executable, "-m", "server.cli"]


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keys_create_prints_the_key_alone_and_revoke(tmp_path: Path):
    env = {**os.environ, "HALOS_DATA_DIR": str(tmp_path / "data")}
    env.pop("HALOS_DATABASE_URL", None)
    env.pop("HALOS_BROKER_URL", None)
    out = subprocess.run(
        HALOS + ["keys", "create", "--project", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip() == lines[0] and len(lines[0]) >= 20
    key = lines[0]
    subprocess.run(HALOS + ["migrate"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    missing = subprocess.run(
        HALOS + ["keys", "revoke", "key_doesnotexist"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    revoked = subprocess.run(
        HALOS + ["keys", "revoke", key], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout == ""


@pytest.mark.e2e
def test_serve_runs_api_sweeper_and_worker_and_stops_them(make_env):
    env: Env = make_env("serve")
    port = _free_port()
    log = open(env.root / "serve.log", "wb")
    proc = subprocess.Popen(
        HALOS + ["serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=settings_env(env.settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (env.root / "serve.log").read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, what="halos serve healthy")
        worker = wait_for(lambda: _children(proc.pid), 30, what="worker child")[0]
        # a job committed but never published: the serve process's sweeper publishes it and
        # the worker child runs it
        job = add_round(env.session, env.run, env.root, {"steps": 3, "sleep": 0.05})
        j = wait_status(env.session, job.id, TERMINAL, 90)
        assert j.status.value == "succeeded", j.error
        assert attempts(env.session, job.id)[0].pid == worker
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        stopped = time.monotonic() - t0
        wait_for(lambda: not pid_alive(worker), 10, what="worker child gone")
        print(f"\n[serve] SIGTERM -> API, sweeper and worker child stopped in {stopped:.1f}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_compose_and_dockerfile_agree_with_settings_and_cli():
    """No Docker engine here: at least every HALOS_* variable is a setting and every command exists."""
    import yaml
    from typer.testing import CliRunner

    from server.cli import app
    from server.settings import Settings

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    fields = set(Settings.model_fields)
    services = compose["services"]
    for name, svc in services.items():
        for key in svc.get("environment") or {}:
            if key.startswith("HALOS_"):
                assert key[len("HALOS_") :].lower() in fields, f"{name}: {key} is not a setting"
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd[0] == "halos":
            parsed = CliRunner().invoke(app, [*cmd[1:], "--help"])  # options are parsed before --help acts
            assert parsed.exit_code == 0, (name, cmd, parsed.output)
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert set(services["api"]["depends_on"]) >= {"migrate", "redis"}
    dockerfile = (REPO / "Dockerfile").read_text()
    for path in ("alembic.ini", "migrations", "halos_core", "halos_client", "server", "worker"):
        assert f"COPY {path}" in dockerfile

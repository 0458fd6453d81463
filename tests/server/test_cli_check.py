"""`halos check`: the health check of processes without an HTTP port (the compose file's workers).
Exit 0 when the database and the broker answer, else 1, with the checks as JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _check(env: dict[str, str], cwd: Path) -> tuple[int, dict]:
    out = subprocess.run([str(BIN / "halos"), "check"], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout)


def test_check_passes_when_database_and_broker_answer_and_names_what_fails(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HALOS_")}
    env["HALOS_DATA_DIR"] = str(data)  # SQLite + the embedded broker under the data dir
    assert _check(env, tmp_path) == (0, {"database": "ok", "broker": "ok"})

    rc, checks = _check({**env, "HALOS_BROKER_URL": "redis://127.0.0.1:1/0"}, tmp_path)  # nothing listens there
    assert rc == 1 and checks["database"] == "ok" and checks["broker"].startswith("error")

    rc, checks = _check({**env, "HALOS_DATA_DIR": str(tmp_path / "no" / "such")}, tmp_path)
    assert rc == 1 and checks["database"].startswith("error")

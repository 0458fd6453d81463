"""Smoke run of bench/api_cpu.py at a small size, so the CPU-per-request benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "api_cpu.py"


def test_api_cpu_small() -> None:
    spec = importlib.util.spec_from_file_location("bench_api_cpu", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rows = module.main(["--requests", "40"])
    assert [r["row"] for r in rows] == ["job", "list jobs", "list runs", "list feedback", "list models"]
    for r in rows:  # every request answered 200 (raise_for_status) and each side cost some CPU
        assert r["project_ms"] > 0 and r["baseline_ms"] > 0

"""Smoke run of bench/api_bench.py at its smallest size, so the API benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "api_bench.py"


def test_api_bench_quick(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_api_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    report = module.main(
        [
            "--quick",
            "--backends",
            "sqlite",
            "--conns",
            "1,8",
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--upload-mib",
            "2",
            "--metric-steps",
            "200",
            "--idle",
            "0.2",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "api.json"),
        ]
    )
    rows = {r["what"]: r for r in report["rows"]}
    assert {"job c=1", "job c=8", "list jobs c=32", "list feedback c=32", "series c=4", "upload"} <= set(rows)
    for what, row in rows.items():
        if what == "upload":
            for side in ("project", "baseline"):
                assert row[side]["status"] in (200, 201), (side, row)
                assert row[side]["mib_per_s"] > 0 and row[side]["probe_errors"] == 0
        else:  # every row ran without an error; on a loaded box a 1 s run of a slow row may answer none
            for side in ("project", "baseline"):
                assert row[side]["errors"] == 0, (what, side, row[side])
                assert row[side]["requests"] > 0 or not what.startswith("job"), (what, side, row[side])
    out = capsys.readouterr().out
    assert "upload ratio" in out and "job c=8" in out
    assert (tmp_path / "api.json").exists()

"""Smoke runs of the benchmark scripts (bench/) with their smallest settings, so they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")


def test_train_throughput_smoke(tmp_path, cpu_only, capsys):
    tp = load("train_throughput")
    out = tmp_path / "tp.json"
    report = tp.main(
        [
            "--preset",
            "tiny",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--vocab",
            "300",
            "--seq-min",
            "12",
            "--seq-max",
            "24",
            "--batch-size",
            "4",
            "--microbatch-size",
            "2",
            "--steps",
            "2",
            "--losses",
            "dpo,kto,grpo",
            "--device",
            "cpu",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {r["loss"]: r for r in report["results"]}
    assert set(rows) == {"dpo", "kto", "grpo"}
    for loss, r in rows.items():
        assert r["steps_measured"] == 1, loss  # 2 steps, the first one is warmup
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["peak_mem_bytes"] > 0
        assert "mfu" not in r  # CPU
        assert loss in printed
    # the round was stopped before its last step: no final checkpoint was written
    assert not (tmp_path / "work" / "run-dpo" / "final").exists()
    # every loss the trainer supports is the default; unknown ones are refused
    assert "dpo" in tp.supported_losses()
    with pytest.raises(SystemExit):
        tp.main(["--losses", "nope", "--device", "cpu"])


def test_learning_signal_smoke(tmp_path, cpu_only, capsys):
    ls = load("learning_signal")
    out = tmp_path / "ls.json"
    report = ls.main(
        [
            "--losses",
            "dpo,kto",
            "--rounds",
            "2",
            "--records",
            "24",
            "--heldout",
            "8",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--lr",
            "1e-3",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    rows = report["rows"]
    assert [(r["loss"], r["round"]) for r in rows] == [
        ("dpo", 0),
        ("dpo", 1),
        ("dpo", 2),
        ("kto", 0),
        ("kto", 1),
        ("kto", 2),
    ]
    for r in rows:
        if r["round"] == 0:  # the SFT model: policy == reference, every pair a tie
            assert r["fixed"]["accuracy"] == 0.5 and r["fixed"]["ties"] == 1.0 and r["step"] == 0
            assert r["eval_loss"] is not None  # the trainer's eval of the untrained model
        else:
            assert r["step"] > 0 and r["eval_loss"] is not None
    dpo = [r for r in rows if r["loss"] == "dpo"]
    assert dpo[2]["step"] == dpo[1]["step"] + dpo[2]["round_step"]  # counters carried across rounds
    assert dpo[1]["eval_accuracy"] is not None
    assert "PASS" in printed or "FAIL" in printed


def test_cpu_round_smoke(tmp_path, cpu_only, capsys):
    """bench/cpu_round.py at a tiny size: a real round through the worker's launch command."""
    cr = load("cpu_round")
    out = tmp_path / "round.json"
    work = tmp_path / "work"
    args = ["--steps", "2", "--hidden", "32", "--layers", "1", "--heads", "2", "--max-length", "64"]
    report = cr.main([*args, "--workdir", str(work), "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["pairs"] == 16 and report["steps"] == 2 and report["model"]["layers"] == 1
    assert 0 < report["first_step_s"] <= report["wall_s"] and report["step_s"] > 0
    assert report["peak_tree_rss_gib"] > 0 and report["peak_hwm_gib_max"] > 0
    assert "halos_core.train" in report["command"] and "first optimizer step after" in printed
    # the round really finished: result.json and the final checkpoint, the reference cache persisted
    run_dir = Path(report["run_dir"])
    assert (run_dir / "result.json").is_file() and (run_dir / "final").is_dir()
    assert list((work / "data" / "reference-cache").glob("*/*.safetensors"))
    with pytest.raises(SystemExit):  # a used workdir would start with a warm reference cache
        cr.main([*args, "--workdir", str(work)])


def test_gpu_round_smoke(tmp_path, cpu_only, capsys):
    """bench/gpu_round.py's tiny workload: one whole round per switch setting, each to its final/."""
    gr = load("gpu_round")
    out = tmp_path / "rounds.json"
    work = tmp_path / "work"
    args = ["--workloads", "tiny", "--device", "cpu", "--threads", "1"]  # CPU figures even where CUDA exists
    report = gr.main([*args, "--workdir", str(work), "--keep-runs", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (tiny,) = report["workloads"]
    rows = tiny["rows"]
    settings = list(gr.WORKLOADS["tiny"].settings)
    assert [r["setting"] for r in rows] == settings and "off" in settings
    assert {s for setting in settings for s in setting.split("+")} - {"off"} == set(gr.SWITCHES)  # every switch
    table = [line for line in printed.splitlines() if line.strip().startswith("tiny |")]
    assert len(table) == len(rows)  # one printed row per setting
    for r, line in zip(rows, table):
        assert "error" not in r and "skipped" not in r, r
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["setting"] in line and f"tok/s {r['tokens_per_s']:.0f}" in line
        assert (r["steps"], r["steps_measured"]) == (4, 3)  # 32 pairs / batch 8, the first step is warmup
        # the same data under every setting: the figures are comparable
        assert r["tokens_per_step"] == rows[0]["tokens_per_step"]
        # the whole round ran: final/ is the complete checkpoint of its last step, result.json is written
        run_dir = work / "tiny" / "runs" / r["setting"]
        assert r["final_written"] and r["final_step"] == 4 and r["final_bytes"] > 0
        assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "result.json").is_file()
        parts = r["before_first_step_s"] + r["steps_s"] + r["after_last_step_s"]
        assert 0 < r["steps_s"] and abs(parts - r["round_s"]) < 0.05
        assert r["peak_mem_bytes"] > 0 and "mfu" not in r  # CPU: peak RSS, no MFU
        # a phase's peak is within the round's (up to the kernel's lazily synced RSS counters: VmHWM can
        # trail a /proc/self/statm read by a few pages)
        assert 0 < r["steps_peak_sampled_bytes"] <= r["peak_mem_bytes"] + 2**20
        # the switches reached the trainer: the flags, and prefix sharing's own reference cache
        for switch in gr.SWITCHES:
            assert r["hyperparams"][switch] == (switch in r["setting"].split("+"))
        caches = [p.name for p in (work / "tiny" / "reference-cache" / r["setting"]).iterdir()]
        assert len(caches) == 1 and caches[0].endswith("-prefix-shared") == r["hyperparams"]["prefix_sharing"]
    for name in gr.NOT_IN_TRAINER:  # the optimisations the trainer lacks are named, not measured
        assert name in printed
    with pytest.raises(SystemExit):
        gr.main(["--workloads", "tiny", "--settings", "packing+nope"])
    with pytest.raises(SystemExit, match="not empty"):  # old run dirs would skew the rounds
        gr.main([*args, "--workdir", str(work)])
    import torch

    if not torch.cuda.is_available():  # CI: the GPU workloads are refused, not run for an hour on the CPU
        with pytest.raises(SystemExit, match="meant for a GPU"):
            gr.main(["--workloads", "1b"])


def test_sampling_throughput_smoke(tmp_path, tiny_model_dir, capsys):
    bench = load("sampling_throughput")
    out = tmp_path / "sampling.json"
    rows = bench.main(
        ["--model", str(tiny_model_dir), "--engine", "hf", "--prompts", "3", "--n", "2", "--max-new-tokens", "4",
         "--out", str(out)]
    )  # fmt: skip
    assert [(r["engine"], r["samples"]) for r in rows] == [("hf", 6)] and rows[0]["samples_per_s"] > 0
    assert json.loads(out.read_text()) == rows
    assert '"samples_per_s"' in capsys.readouterr().out

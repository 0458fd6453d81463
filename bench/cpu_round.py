"""One real DPO round on the CPU, launched exactly as the worker launches it (issue 11).

    .venv/bin/python bench/cpu_round.py                          # the issue's workload (~2-3 min on 2 cores)
    .venv/bin/python bench/cpu_round.py --pairs 16 --hidden 32 --layers 1 --heads 2   # smoke (tests)
    .venv/bin/python bench/cpu_round.py --out round.json --workdir /tmp/cpu-round
    .venv/bin/python bench/cpu_round.py --prefix-sharing         # hyperparams.prefix_sharing

The workload: a random-weight Llama built locally by the project's tiny-model builder
(`halos_core.tiny.build_tiny_model`; default shape "small": hidden 512, 9 layers, 8 heads (no
GQA), intermediate 1024, the builder's BPE vocabulary of 512 tokens, untied embeddings: the script
prints the exact parameter count), 128 synthetic preference pairs (`halos_core.synthetic`),
DPO, max_length 256, batch 8 (microbatch 8), fp32, a cold reference cache.

How it runs the round: the worker's own pieces (`worker.launch`) write `run.json` (a RunConfig
built the way `worker.runner.build_config` builds it) and `accelerate.yaml` from a worker
`Settings` (use_cpu, 1 process, mixed precision "no"), and the command is `worker.launch.command`
— whatever the worker would start — run in its own session with the worker's launch environment.

What it prints (and writes with --out):
- wall_s: launch → exit of the command;
- first_step_s: launch → the end of the first optimizer step (the `time` of its metrics.jsonl
  line; the trainer writes it right after the step);
- step_s: mean optimizer-step wall time over the round (the trainer's own per-step figure,
  `tokens / tokens_per_s`), and step_s_after_first (the same without the first step);
- peak_tree_rss_gib: the largest sum of VmRSS over every process of the launched process group,
  sampled every 20 ms (a peak shorter than that can be missed), and peak_hwm_gib_max: the
  largest per-process VmHWM seen (exact, per process);
- the load average before and after (the box is shared: read timings with it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMALL = dict(hidden=512, layers=9, heads=8, vocab=512)


def build_model(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from safetensors import safe_open

    from halos_core.tiny import build_tiny_model

    build_tiny_model(
        path, seed=args.seed, vocab_size=args.vocab, hidden_size=args.hidden, layers=args.layers, heads=args.heads
    )
    params = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            n = 1
            for d in fh.get_slice(key).get_shape():
                n *= d
            params += n
    config = json.loads((path / "config.json").read_text())
    return {
        "params": params,
        "hidden": config["hidden_size"],
        "layers": config["num_hidden_layers"],
        "heads": config["num_attention_heads"],
        "kv_heads": config["num_key_value_heads"],
        "intermediate": config["intermediate_size"],
        "vocab": config["vocab_size"],
        "tied": bool(config.get("tie_word_embeddings")),
    }


def group_pids(pgid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.getpgid(int(name)) == pgid:
                out.append(int(name))
        except OSError:
            continue
    return out


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_round(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from halos_core.job_spec import JobSpec, RunConfig
    from halos_core.run_dir import RunDir, tree_sha256
    from halos_core.synthetic import pairwise_records, write_jsonl
    from server.settings import Settings
    from worker import launch

    model_dir = work / "model"
    shape = build_model(model_dir, args)
    sha = tree_sha256(model_dir)
    pairs = args.pairs if args.steps is None else args.steps * args.batch_size
    feedback = write_jsonl(pairwise_records(pairs, seed=args.seed + 1), work / "pairs.jsonl")
    spec = JobSpec.model_validate(
        {
            "reference_path": str(model_dir),
            "reference_sha256": sha,
            "feedback": [{"path": str(feedback), "kind": "pairwise", "file_id": "f0"}],
            "loss": {"name": "dpo"},
            "hyperparams": {
                "lr": 1e-5,
                "batch_size": args.batch_size,
                "microbatch_size": args.batch_size,
                "max_length": args.max_length,
                "max_prompt_length": args.max_length // 2,
                "seed": args.seed,
                **({"prefix_sharing": True} if args.prefix_sharing else {}),
            },
        }
    )
    settings = Settings(data_dir=work / "data", use_cpu=True, num_processes=1, mixed_precision="no", fsdp=False)
    job_id = "cpu-round"
    run_dir = RunDir(settings.runs_dir / job_id).create()
    # what worker.runner.build_config + _prepare do for a round
    config = RunConfig.for_attempt(
        spec,
        job_id=job_id,
        run_dir=str(run_dir.path.resolve()),
        mixed_precision=settings.mixed_precision,
        reference_cache_dir=str(settings.reference_cache_dir.resolve()),
    )
    run_dir.write_config(config)
    launch.write_accelerate_config(run_dir, settings)
    cmd = launch.command(settings, run_dir)
    env = {**os.environ, **launch.launch_env(settings), "PYTHONUNBUFFERED": "1"}

    load_before = os.getloadavg()
    peak_tree_kb = 0
    peak_hwm_kb = 0
    with open(run_dir.stdout_log, "ab") as out:
        t0 = time.time()
        proc = subprocess.Popen(
            cmd,
            cwd=run_dir.path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            while proc.poll() is None:
                pids = group_pids(proc.pid)
                peak_tree_kb = max(peak_tree_kb, sum(status_kb(p, "VmRSS") for p in pids))
                peak_hwm_kb = max([peak_hwm_kb, *(status_kb(p, "VmHWM") for p in pids)])
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
        t_end = time.time()
    load_after = os.getloadavg()
    if proc.returncode != 0:
        tail = run_dir.stdout_log.read_text()[-3000:]
        raise RuntimeError(f"the round exited {proc.returncode}:\n{tail}")

    records = [json.loads(line) for line in run_dir.metrics_jsonl.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("split") != "eval"]
    times = [r["tokens"] / r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
    gib = 1024**3
    return {
        "command": " ".join(cmd),
        "model": shape,
        "pairs": pairs,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "dtype": "float32",
        "prefix_sharing": bool(args.prefix_sharing),
        "steps": len(steps),
        "wall_s": round(t_end - t0, 2),
        "first_step_s": round(steps[0]["time"] - t0, 2) if steps else None,
        "step_s": round(sum(times) / len(times), 3) if times else None,
        "step_s_after_first": round(sum(times[1:]) / len(times[1:]), 3) if len(times) > 1 else None,
        "tokens_per_step": round(sum(r["tokens"] for r in steps) / max(len(steps), 1), 1),
        "peak_tree_rss_gib": round(peak_tree_kb * 1024 / gib, 3),
        "peak_hwm_gib_max": round(peak_hwm_kb * 1024 / gib, 3),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "run_dir": str(run_dir.path),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=SMALL["hidden"])
    p.add_argument("--layers", type=int, default=SMALL["layers"])
    p.add_argument("--heads", type=int, default=SMALL["heads"])
    p.add_argument("--vocab", type=int, default=SMALL["vocab"], help="the builder's BPE vocabulary size")
    p.add_argument("--pairs", type=int, default=128)
    p.add_argument("--steps", type=int, help="optimizer steps (sets --pairs to steps x batch size)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix-sharing", action="store_true", help="hyperparams.prefix_sharing (opt-in)")
    p.add_argument("--workdir", help="keep the model, data and run dir here (default: a temporary dir)")
    p.add_argument("--out", help="write the report as JSON")
    args = p.parse_args(argv)
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            p.error(f"--workdir {work} is not empty (a warm reference cache would skew the round)")
        report = run_round(args, work)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="cpu-round-") as tmp:
            report = run_round(args, Path(tmp))
    m = report["model"]
    print(
        f"model: Llama hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads / {m['kv_heads']} KV, "
        f"intermediate {m['intermediate']}, vocab {m['vocab']}, tied {m['tied']}: {m['params'] / 1e6:.2f} M params"
    )
    print(
        f"round: {report['pairs']} pairs, max_length {report['max_length']}, batch {report['batch_size']}, "
        f"fp32, {report['steps']} steps, {report['tokens_per_step']} tokens/step, "
        f"prefix sharing {report['prefix_sharing']}"
    )
    print(f"command: {report['command']}")
    print(
        f"wall {report['wall_s']} s | first optimizer step after {report['first_step_s']} s | "
        f"{report['step_s']} s/step ({report['step_s_after_first']} without the first) | "
        f"peak RSS of the process tree {report['peak_tree_rss_gib']} GiB (largest process VmHWM "
        f"{report['peak_hwm_gib_max']} GiB) | load average before {report['loadavg_before']} "
        f"after {report['loadavg_after']}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

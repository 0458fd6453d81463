"""Whole DPO rounds through the real trainer, one row per switch setting (issue 11, "Training, GPU").

    .venv/bin/python bench/gpu_round.py                          # 1b then 8b-lora, their default settings (GPU)
    .venv/bin/python bench/gpu_round.py --workloads tiny         # the CPU size the smoke test runs (~10-30 s)
    .venv/bin/python bench/gpu_round.py --workloads 1b --settings off,prefix_sharing --out 1b.json
    .venv/bin/python bench/gpu_round.py --workloads 8b-lora --pairs 64 --no-time-limit

Per workload, a random-weight Llama is built locally (`bench/workload.py`: created directly in
bf16 on the GPU, saved once with the project's small BPE tokenizer; nothing is downloaded), one
synthetic pairwise feedback file is written, and then for each switch setting one whole round
runs in this process through the worker's entry point, `halos_core.train.run(RunConfig)` (what
`python -m halos_core.train --config run.json` calls): `Trainer.from_config(...)` then `train()`
to the end, `final/` and result.json written. Every setting starts cold: its own run dir and its
own empty reference log-prob cache. Printed per setting (`bench/measure.py` says how each is
measured), each next to the issue's goal for the workload:

- tok/s: steady tokens/s, the steps after the first `warmup` (non-pad chosen + rejected tokens
  over optimizer-step wall time, the trainer's own per-step figures);
- MFU: 6·N FLOPs per token for full weights, 4·N for LoRA (frozen base), over `--peak-tflops`
  (H100 SXM bf16 dense, 989). With prefix sharing the prompt runs once per pair but its tokens
  are counted for both rows (the tokens a user trains on), so MFU there is an effective figure;
- round s: `run()` called → returned, i.e. the trainer's start (reference hash, model loads,
  data, the reference pass) to `final/` and result.json written; split into before the first
  step / the steps / after the last step (the final checkpoint: weights + optimizer state). It
  leaves out what a worker's fresh process adds before that: the interpreter, importing torch +
  transformers and creating the CUDA context (all done once here, before the first round);
- peak: CUDA `max_memory_allocated` over the round (peak RSS on the CPU), and in brackets the
  training steps' own peak, sampled every 20 ms (a lower bound: the round's peak may come from
  the reference pass or the final checkpoint's export instead).

Workloads (every round is DPO, beta 0.1, lr 1e-5, no warmup, one epoch, no eval split):
- `1b`: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192,
  vocab 128256, tied: 1.236 B parameters), full weights (the trainer's fp32 master weights +
  AdamW, bf16 autocast), 256 pairs of 353-671 tokens, batch 32, microbatch 4: 8 steps.
  Goals: >= 60k tokens/s, whole round <= 15 s, peak <= 17 GiB.
- `8b-lora`: Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 / 8 heads, intermediate 14336,
  vocab 128256, untied: 8.03 B), LoRA with the default settings (r 8, alpha 16, q/k/v/o; the base
  in bf16), 128 pairs of 353-671 tokens (fewer than 1b's, so the round fits the script's time;
  the shape, sequence lengths and batch are the full ones), batch 32, microbatch 4: 4 steps.
  Goals: >= 12.7k tokens/s, peak <= 25 GiB. Its model is 16 GB on disk, written once; every
  round still hashes and loads it, and writes `final/` with the merged 16 GB weights.
- `tiny`: hidden 64, 2 layers, vocab 512, fp32 on the CPU, 32 pairs of 24-96 tokens, batch 8:
  the smoke test's size (tests/halos_core/test_bench_smoke.py); no goals.

Switches: the optimisations the trainer has, as `Hyperparams` flags: `packing`,
`prefix_sharing`, `gradient_checkpointing`. A setting is `off` or flags joined with `+`. For DPO
with `prefix_sharing`, `packing` changes nothing (the paired forward is the shared-prefix one).
The issue also names optimisations the trainer does NOT have; they are listed as such
(`NOT_IN_TRAINER`), not measured.

Time: the GPU workloads have a time share each (`Workload.budget_s`, together about 7.5 minutes
of an H100, plus start-up); a setting whose round would end past its workload's share (judged by
the slowest round so far) is printed as skipped rather than run. `--no-time-limit` runs them all.
A round that fails (e.g. CUDA out of memory) is a row with its error; the others still run.
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.cli import device_name, set_up_torch, work_dir, write_report  # noqa: E402 - after sys.path names the checkout
from bench.measure import H100_BF16_DENSE_TFLOPS, MemorySampler, PeakMemory, mfu, read_metrics, steady  # noqa: E402 - same
from bench.workload import LlamaShape, TextPool, build_model, make_records  # noqa: E402 - same

SWITCHES = ("packing", "prefix_sharing", "gradient_checkpointing")

# optimisations the issue lists that halos_core.training does not implement (nothing to switch)
NOT_IN_TRAINER = {
    "torch.compile": "the policy and reference run eagerly; nothing calls torch.compile",
    "fused AdamW": "build.py makes torch.optim.AdamW without fused=True (torch's default, foreach on CUDA)",
    "Liger-Kernel fused LM head": "log-probs come from halos_core.logprobs' chunked LM head + log-softmax, "
    "not a fused kernel; Liger is not a dependency",
    "token-budget batching": "batches and microbatches are a fixed number of examples (batch_size, "
    "microbatch_size); TrainLoader's bucket_by_length exists but the trainer never sets it",
}

GIB = 1024**3


@dataclass(frozen=True)
class Goals:
    tokens_per_s: float | None = None  # at least
    round_s: float | None = None  # at most
    peak_gib: float | None = None  # at most


@dataclass(frozen=True)
class Workload:
    name: str
    shape: LlamaShape
    pairs: int
    seq_min: int
    seq_max: int
    batch_size: int
    microbatch_size: int
    warmup: int  # first steps left out of the steady tokens/s
    bf16: bool
    lora: bool
    gpu: bool  # meant for a GPU: refused on the CPU unless --device cpu is given
    settings: tuple[str, ...]
    goals: Goals
    budget_s: float | None  # this workload's share of the script's time (None: no limit)


LLAMA_1B = LlamaShape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tie=True)
LLAMA_8B = LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tie=False)
TINY = LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, tie=False)

# the baseline first, then one switch at a time, then the combination (packing adds nothing to
# prefix sharing for DPO, see the docstring)
EVERY_SWITCH = ("off", "prefix_sharing", "packing", "gradient_checkpointing", "prefix_sharing+gradient_checkpointing")

WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "1b", LLAMA_1B, pairs=256, seq_min=353, seq_max=671, batch_size=32, microbatch_size=4, warmup=2,
            bf16=True, lora=False, gpu=True, settings=EVERY_SWITCH,
            goals=Goals(tokens_per_s=60_000, round_s=15, peak_gib=17), budget_s=190,
        ),
        Workload(
            # gradient checkpointing first: without it the activations of an 8B forward are the
            # likeliest to break the 25 GiB goal, so the settings most likely to meet it run
            # before the time share can run out
            "8b-lora", LLAMA_8B, pairs=128, seq_min=353, seq_max=671, batch_size=32, microbatch_size=4, warmup=1,
            bf16=True, lora=True, gpu=True,
            settings=("gradient_checkpointing", "prefix_sharing+gradient_checkpointing", "off"),
            goals=Goals(tokens_per_s=12_700, peak_gib=25), budget_s=260,
        ),
        Workload(
            "tiny", TINY, pairs=32, seq_min=24, seq_max=96, batch_size=8, microbatch_size=4, warmup=1,
            bf16=False, lora=False, gpu=False, settings=EVERY_SWITCH, goals=Goals(), budget_s=None,
        ),
    )
}  # fmt: skip


def parse_setting(setting: str) -> dict[str, bool]:
    """`off` or switch names joined with `+` -> the Hyperparams flags."""
    names = [] if setting == "off" else setting.split("+")
    unknown = [n for n in names if n not in SWITCHES]
    if unknown or not names and setting != "off" or len(set(names)) != len(names):
        raise ValueError(f"setting {setting!r}: give 'off' or switches joined with '+' from {', '.join(SWITCHES)}")
    return {name: name in names for name in SWITCHES}


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- one round


def run_setting(
    w: Workload, setting: str, model_dir: Path, counts: dict, feedback: Path, work: Path, args: Any
) -> dict[str, Any]:
    """One whole round with `setting`'s switches; its row."""
    import torch

    from halos_core.job_spec import RunConfig, hyperparams_problem
    from halos_core.run_dir import CheckpointError, read_manifest
    from halos_core.train import run

    cuda = args.device == "cuda"
    run_dir = work / "runs" / setting
    cache_dir = work / "reference-cache" / setting  # cold: a round on new feedback computes its reference
    hp = {
        "lr": 1e-5,
        "batch_size": w.batch_size,
        "microbatch_size": w.microbatch_size,
        "max_length": w.seq_max + 8,
        "max_prompt_length": w.seq_max // 2 + 8,
        "warmup_steps": 0,
        "seed": args.seed,
        **parse_setting(setting),
    }
    cfg = RunConfig.model_validate(
        {
            "job_id": f"{w.name}-{setting}",
            "run_dir": str(run_dir),
            "reference_path": str(model_dir),
            # not pinned: the trainer hashes the reference tree at every start anyway and only
            # compares the result with a pin, so the round does the same work; the bench saves a
            # second hash of the model (16 GB for 8b) outside the rounds
            "reference_sha256": "",
            "reference_cache_dir": str(cache_dir),
            "feedback": [{"path": str(feedback), "kind": "pairwise", "file_id": "f0"}],
            "loss": {"name": "dpo"},
            "hyperparams": hp,
            "lora": {} if w.lora else None,
            "mixed_precision": "bf16" if w.bf16 else "no",
        }
    )
    row: dict[str, Any] = {"workload": w.name, "setting": setting, "hyperparams": hp}
    problem = hyperparams_problem("dpo", cfg.hyperparams, 1)
    if problem:
        return row | {"error": problem}

    peak_memory = PeakMemory(cuda)
    peak_memory.start()
    t0 = time.time()
    with MemorySampler(cuda) as sampler:
        try:
            result = run(cfg)
            t1 = time.time()
            final = result.final_dir
        except Exception as exc:  # a failed setting (e.g. out of memory) is a row; the others still run
            t1, final = time.time(), None
            text = str(exc).strip()
            row["error"] = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
    gc.collect()
    row["peak_mem_bytes"], row["peak_mem_kind"] = peak_memory.stop()
    if cuda:
        row["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        torch.cuda.empty_cache()

    steps = read_metrics(run_dir)
    measured = steady(steps, w.warmup)
    row |= {
        "steps": len(steps),
        "steps_measured": measured.steps,
        "tokens_per_step": measured.tokens / max(measured.steps, 1),
        "tokens_per_s": measured.tokens_per_s,
        "round_s": t1 - t0,
        "final_dir": str(final) if final is not None else None,
        "final_written": False,
        "final_loss": steps[-1]["loss"] if steps else None,
    }
    if final is not None:
        try:  # complete: its manifest (written last) is there and names the round's last step
            manifest = read_manifest(final, verify=False)
            row |= {"final_written": True, "final_step": manifest.step, "final_bytes": tree_bytes(final)}
        except CheckpointError as exc:
            row["error"] = str(exc)
    if steps:
        first_start = steps[0]["time"] - steps[0]["tokens"] / steps[0]["tokens_per_s"]
        row |= {
            "before_first_step_s": first_start - t0,  # hash, loads, data, the up-front reference pass
            "steps_s": steps[-1]["time"] - first_start,
            "after_last_step_s": t1 - steps[-1]["time"],  # the final checkpoint (and result.json)
            # the training steps' own peak, apart from the reference pass's and the export's
            "steps_peak_sampled_bytes": sampler.peak_between(first_start, steps[-1]["time"]),
        }
    if cuda:
        row["mfu"] = mfu(counts["matmul_params"], measured.tokens_per_s, args.peak_tflops, frozen_base=w.lora)
    if not args.keep_runs:  # a 1b final/ is ~15 GB (fp32 weights + AdamW), an 8b-lora one ~16 GB
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
    return row


# --------------------------------------------------------------------------- one workload


def run_workload(w: Workload, settings: list[str], work: Path, args: Any) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from halos_core.synthetic import write_jsonl

    t_start = time.perf_counter()
    model_dir = work / "model"
    counts = build_model(
        model_dir, w.shape, bf16=w.bf16, device=args.device, seed=args.seed, max_positions=max(2048, w.seq_max + 64)
    )
    build_s = time.perf_counter() - t_start
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pool = TextPool(tokenizer, seed=args.seed, n_tokens=max(20000, 4 * w.seq_max))
    records = make_records("pairwise", w.pairs, pool, w.seq_min, w.seq_max, w.seq_max // 2 + 8, seed=args.seed + 1)
    feedback = write_jsonl(records, work / "pairs.jsonl")
    print(header(w, counts, build_s, time.perf_counter() - t_start, args), flush=True)

    rows: list[dict[str, Any]] = []
    slowest = 0.0
    for setting in settings:
        spent = time.perf_counter() - t_start
        if w.budget_s is not None and not args.no_time_limit and rows and spent + slowest > w.budget_s:
            row = {
                "workload": w.name,
                "setting": setting,
                "skipped": f"time share: {spent:.0f} of {w.budget_s:.0f} s used, "
                f"the slowest round took {slowest:.0f} s",
            }
        else:
            row = run_setting(w, setting, model_dir, counts, feedback, work, args)
            slowest = max(slowest, row.get("round_s", 0.0))
        rows.append(row)
        print(format_row(row, w.goals), flush=True)
    if not args.keep_runs:
        shutil.rmtree(model_dir, ignore_errors=True)
    return {
        "workload": w.name,
        "spec": {k: v for k, v in asdict(w).items() if k != "settings"},
        "model": counts,
        "build_s": build_s,
        "rows": rows,
    }


# --------------------------------------------------------------------------- printing


def header(w: Workload, counts: dict, build_s: float, setup_s: float, args: Any) -> str:
    steps = w.pairs // w.batch_size
    goals = [
        f"tokens/s >= {w.goals.tokens_per_s:.0f}" if w.goals.tokens_per_s else "",
        f"round <= {w.goals.round_s:.0f} s" if w.goals.round_s else "",
        f"peak <= {w.goals.peak_gib:.0f} GiB" if w.goals.peak_gib else "",
    ]
    trained = "LoRA r 8 (base bf16)" if w.lora else ("full weights, fp32 master" if w.bf16 else "full weights")
    return "\n".join(
        [
            f"== {w.name}: Llama {w.shape.describe()}: {counts['params'] / 1e6:.1f}M params "
            f"({counts['matmul_params'] / 1e6:.1f}M matmul); built + saved in {build_s:.1f} s "
            f"({setup_s:.1f} s with its hash and data)",
            f"   DPO, {trained}, {'bf16 autocast' if w.bf16 else 'fp32'}, {w.pairs} pairs of {w.seq_min}-{w.seq_max} "
            f"tokens, batch {w.batch_size} (microbatch {w.microbatch_size}), {steps} steps, tok/s over the steps "
            f"after the first {w.warmup}; {args.device_name}",
            "   goals: " + (", ".join(g for g in goals if g) or "none"),
        ]
    )


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _judged(text: str, value: float | None, goal: float | None, at_least: bool) -> str:
    if goal is None or value is None or not math.isfinite(value):
        return text
    met = value >= goal if at_least else value <= goal
    return f"{text} [{'ok' if met else 'MISS'} {'>=' if at_least else '<='}{goal:g}]"


def format_row(r: dict[str, Any], goals: Goals) -> str:
    name = f"{r['workload']:>8} | {r['setting']:<38}"
    if "skipped" in r:
        return f"{name} | skipped: {r['skipped']}"
    if "steps" not in r:  # refused before it ran
        return f"{name} | error: {r['error']}"
    tok_s = r["tokens_per_s"]
    peak = r["peak_mem_bytes"] / GIB if r.get("peak_mem_bytes") else None
    cells = [
        f"steps {r['steps_measured']}/{r['steps']}",
        _judged(f"tok/s {tok_s:.0f}" if math.isfinite(tok_s) else "tok/s -", tok_s, goals.tokens_per_s, True),
        f"MFU {100 * r['mfu']:.1f}%" if math.isfinite(r.get("mfu", math.nan)) else "MFU -",
        _judged(f"round {r['round_s']:.1f} s", r["round_s"], goals.round_s, False)
        + (
            f" (before {r['before_first_step_s']:.1f} / steps {r['steps_s']:.1f} / after {r['after_last_step_s']:.1f})"
            if "steps_s" in r
            else ""
        ),
        _judged(f"peak {peak:.2f} GiB" if peak is not None else "peak -", peak, goals.peak_gib, False)
        + (f" (steps ~{r['steps_peak_sampled_bytes'] / GIB:.2f})" if r.get("steps_peak_sampled_bytes") else ""),
        f"final/ {size(r['final_bytes'])}" if r["final_written"] else "final/ NOT written",
    ]
    line = f"{name} | " + " | ".join(cells)
    return line + (f" | error: {r['error']}" if "error" in r else "")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="1b,8b-lora", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument(
        "--settings",
        help="comma-separated settings for every workload: 'off' or switches joined with '+' "
        f"({', '.join(SWITCHES)}); default: each workload's own list",
    )
    p.add_argument("--pairs", type=int, help="pairs per round (a multiple of the batch size); default: the workload's")
    p.add_argument("--microbatch-size", type=int, help="default: the workload's (4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="accelerator peak for MFU")
    p.add_argument("--no-time-limit", action="store_true", help="run every setting whatever the time share")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where models, feedback and run dirs go (default: a temp dir, removed)")
    p.add_argument("--keep-runs", action="store_true", help="keep each round's run dir and the models")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        p.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    args.workload_names = names
    if args.settings is not None:
        args.setting_list = [s.strip() for s in args.settings.split(",") if s.strip()]
        for s in args.setting_list:
            try:
                parse_setting(s)
            except ValueError as exc:
                p.error(str(exc))
    else:
        args.setting_list = None
    return args


def resolve(w: Workload, args: argparse.Namespace) -> Workload:
    """The workload with the command line's overrides applied."""
    from dataclasses import replace

    w = replace(
        w,
        pairs=args.pairs or w.pairs,
        microbatch_size=args.microbatch_size or w.microbatch_size,
        settings=tuple(args.setting_list or w.settings),
    )
    if w.pairs % w.batch_size or w.pairs < w.batch_size:
        raise SystemExit(f"{w.name}: --pairs {w.pairs} must be a positive multiple of the batch size {w.batch_size}")
    if w.batch_size % w.microbatch_size:
        raise SystemExit(f"{w.name}: batch size {w.batch_size} is not a multiple of microbatch {w.microbatch_size}")
    return w


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    explicit_cpu = args.device == "cpu"
    args.device = set_up_torch(args.device, args.threads)
    workloads = [resolve(WORKLOADS[n], args) for n in args.workload_names]
    on_cpu = [w.name for w in workloads if w.gpu and args.device == "cpu"]
    if on_cpu and not explicit_cpu:
        raise SystemExit(
            f"workload(s) {', '.join(on_cpu)} are meant for a GPU and this machine has no CUDA device; "
            "run --workloads tiny here (or force --device cpu)"
        )
    args.device_name = device_name(args.device)
    print("not in the trainer (not measured): " + "; ".join(f"{k}: {v}" for k, v in NOT_IN_TRAINER.items()), flush=True)

    t0 = time.perf_counter()
    with work_dir(args.workdir, "halos-gpu-round-") as base:
        results = []
        for w in workloads:
            work = base / w.name
            if work.exists() and any(work.iterdir()):
                raise SystemExit(f"{work} is not empty (old run dirs or a warm reference cache would skew the rounds)")
            results.append(run_workload(w, list(w.settings), work, args))
    total_s = time.perf_counter() - t0
    print(f"total {total_s:.0f} s")
    report = {
        "device": args.device,
        "device_name": args.device_name,
        "torch": torch.__version__,
        "peak_tflops": args.peak_tflops,
        "not_in_trainer": NOT_IN_TRAINER,
        "total_s": total_s,
        "workloads": results,
    }
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()

"""Training throughput of one round, per loss, through the real trainer.

    .venv/bin/python bench/train_throughput.py                        # tiny preset, every loss, CPU ok
    .venv/bin/python bench/train_throughput.py --preset 1b --device cuda --out 1b.json
    .venv/bin/python bench/train_throughput.py --losses dpo,kto --hidden 256 --layers 4 --steps 5

What runs: a random-weight Llama with the requested shape is built locally (nothing is
downloaded) and saved next to a small local BPE tokenizer; synthetic feedback of the kind each
loss trains on (pairwise / binary / scalar) is generated with sequence lengths (prompt +
response, in tokens, chat template included) drawn uniformly in [--seq-min, --seq-max]; then
`halos_core.training.Trainer.from_config(RunConfig)` + `Trainer.train()` run the round exactly as
`python -m halos_core.train` does. The round has `--steps + 1` optimizer steps and is stopped
(`train(stop_after=--steps)`) after `--steps`, so no multi-GB final checkpoint is written.

Per loss it reports, over the steps after the first `--warmup` ones:
- tokens/s: non-pad tokens of the trained streams (chosen+rejected, or the target; KTO's KL
  stream is not counted) per second of optimizer-step wall time, as the trainer measures it
  (`tokens` / `tokens_per_s` in metrics.jsonl: collation, policy forward+backward, the reference
  forward unless the trainer has it cached, clipping and the optimizer step);
- step_s: mean optimizer-step wall time;
- peak memory: CUDA `torch.cuda.max_memory_allocated` (reset before the loss's trainer is built),
  CPU peak RSS (`VmHWM` of /proc/self/status, reset per loss through /proc/self/clear_refs when
  the kernel allows it, else the process-wide peak);
- MFU (CUDA only): 6 * N * tokens/s / peak FLOP/s, N = parameters that do matmuls (all but the
  input embedding table; a tied table counts once, as the LM head). Reference forwards, KTO's
  KL forward and attention's quadratic term are not counted (the usual convention).

The 1b preset: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate
8192, vocab 128256, tied embeddings), sequences of 160-720 tokens, bf16 autocast over fp32 master
weights (the trainer's only mode). The tokenizer stays small (the data layer tokenises text): its
ids are a subset of the model's 128256-row vocabulary, which changes no FLOP or memory figure.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import workload  # noqa: E402 - after sys.path names the checkout
from bench.cli import device_name, set_up_torch, work_dir, write_report  # noqa: E402 - same
from bench.measure import H100_BF16_DENSE_TFLOPS, PeakMemory, mfu, read_metrics, steady  # noqa: E402 - same
from bench.workload import CHAT_OVERHEAD, LlamaShape, TextPool, make_records  # noqa: E402 - same

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=4,
        intermediate=128,
        vocab=512,
        seq_min=24,
        seq_max=96,
        batch_size=8,
        microbatch_size=4,
        steps=6,
        dtype="float32",
        tie=False,
    ),
    "1b": dict(
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=8192,
        vocab=128256,
        seq_min=160,
        seq_max=720,
        batch_size=32,
        microbatch_size=4,
        steps=6,
        dtype="bf16",
        tie=True,
    ),
}


# --------------------------------------------------------------------------- helpers


def supported_losses() -> list[str]:
    from halos_core.loss_registry import LOSSES

    return list(LOSSES)


def feedback_kind_for(loss: str) -> str:
    from halos_core.loss_registry import loss_spec

    return {"paired": "pairwise", "unpaired": "binary", "grouped": "scalar", "sft": "pairwise"}[loss_spec(loss).data]


def build_model(path: Path, args: argparse.Namespace, device: str) -> tuple[Path, dict[str, int]]:
    """Random-weight Llama of the requested shape + the local BPE tokenizer, saved to `path`."""
    shape = LlamaShape(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab, args.tie)
    counts = workload.build_model(
        path,
        shape,
        bf16=args.dtype == "bf16",
        device=device,
        seed=args.seed,
        max_positions=max(2048, args.seq_max + 64),
    )
    return path, counts


# --------------------------------------------------------------------------- one loss


def bench_loss(
    loss: str, args: argparse.Namespace, model_dir: Path, sha: str, counts: dict, work: Path, device: str
) -> dict:
    import torch
    from transformers import AutoTokenizer

    from halos_core.job_spec import RunConfig, hyperparams_problem
    from halos_core.synthetic import write_jsonl
    from halos_core.train import _release
    from halos_core.training import Stopped, Trainer

    hp = {
        "lr": args.lr,
        "batch_size": args.batch_size,
        "microbatch_size": args.microbatch_size,
        "max_length": args.seq_max + 8,
        "max_prompt_length": args.seq_max // 2 + 8,
        "warmup_steps": 0,
        "seed": args.seed,
    }
    kind = feedback_kind_for(loss)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pool = TextPool(tokenizer, seed=args.seed, n_tokens=max(20000, 4 * args.seq_max))
    n_examples = (args.steps + 1) * args.batch_size
    records = make_records(
        kind, n_examples, pool, args.seq_min, args.seq_max, hp["max_prompt_length"], seed=args.seed + 1
    )
    fb = write_jsonl(records, work / f"{loss}.jsonl")
    cfg = RunConfig.model_validate(
        {
            "job_id": f"bench-{loss}",
            "run_dir": str(work / f"run-{loss}"),
            "reference_path": str(model_dir),
            "reference_sha256": sha,
            "feedback": [{"path": str(fb), "kind": kind, "file_id": "f0"}],
            "loss": {"name": loss},
            "hyperparams": hp,
            "mixed_precision": "bf16" if args.dtype == "bf16" else "no",
        }
    )
    problem = hyperparams_problem(loss, cfg.hyperparams, 1)
    if problem:
        return {"loss": loss, "skipped": problem}

    cuda = device == "cuda"
    peak_memory = PeakMemory(cuda)
    peak_memory.start()
    t_build = time.perf_counter()
    trainer = Trainer.from_config(cfg)
    t_train = time.perf_counter()
    try:
        total_steps = trainer.train_loader.total_steps
        if total_steps <= args.steps:
            raise RuntimeError(f"only {total_steps} steps of data for {args.steps} measured steps")
        try:
            trainer.train(stop_after=args.steps)
        except Stopped:
            pass
        if cuda:
            torch.cuda.synchronize()
        t_end = time.perf_counter()
    finally:
        _release(trainer)
        del trainer
        gc.collect()
    peak, peak_kind = peak_memory.stop()
    if cuda:
        torch.cuda.empty_cache()

    steps = read_metrics(Path(cfg.run_dir))
    measured = steady(steps, args.warmup)
    tok_s = measured.tokens_per_s
    out = {
        "loss": loss,
        "feedback": kind,
        "steps_measured": measured.steps,
        "tokens_per_step": measured.tokens / max(measured.steps, 1),
        "tokens_per_s": tok_s,
        "step_s": measured.seconds / max(measured.steps, 1),
        "step_s_median": statistics.median(measured.step_times) if measured.step_times else float("nan"),
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "setup_s": t_train - t_build,  # trainer build: hashing, model loads, data
        "train_call_s": t_end - t_train,  # train(): reference precompute (if any) + all steps
        "final_loss": steps[-1]["loss"] if steps else None,
    }
    if cuda:
        out["mfu"] = mfu(counts["matmul_params"], tok_s, args.peak_tflops)
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Per-loss training throughput of one round (real trainer, random Llama).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="defaults for every shape/run option")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="default: the preset's, or --heads when --heads is given")
    p.add_argument("--intermediate", type=int, help="default: the preset's, or 4 x --hidden when --hidden is given")
    p.add_argument("--vocab", type=int)
    p.add_argument("--seq-min", type=int)
    p.add_argument("--seq-max", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--microbatch-size", type=int)
    p.add_argument("--steps", type=int, help="optimizer steps per loss (the first --warmup are not averaged)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--losses", default="all", help="comma-separated; default: every loss the trainer supports")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bf16"))
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None, help="tie input/output embeddings")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="accelerator peak for MFU")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the model, feedback and run dirs go (default: a temp dir, removed)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.kv_heads is None and args.heads is not None:
        args.kv_heads = args.heads
    if args.intermediate is None and args.hidden is not None:
        args.intermediate = 4 * args.hidden
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.seq_min > args.seq_max or args.seq_min < CHAT_OVERHEAD + 2:
        p.error(f"need {CHAT_OVERHEAD + 2} <= --seq-min <= --seq-max")
    if args.batch_size % args.microbatch_size:
        p.error("--batch-size must be a multiple of --microbatch-size")
    if args.warmup >= args.steps:
        args.warmup = 0
    return args


def format_table(rows: list[dict], cuda: bool) -> str:
    head = ["loss", "steps", "tok/step", "tok/s", "step_s", "median_s", "peak_MiB"] + (["MFU"] if cuda else [])
    width = max(9, *(len(r["loss"]) for r in rows)) if rows else 9
    lines = [" | ".join(f"{h:>{width if i == 0 else 9}}" for i, h in enumerate(head))]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['loss']:>{width}} | skipped: {r['skipped']}")
            continue
        cells = [
            r["loss"],
            str(r["steps_measured"]),
            f"{r['tokens_per_step']:.0f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['step_s']:.3f}",
            f"{r['step_s_median']:.3f}",
            f"{(r['peak_mem_bytes'] or 0) / 2**20:.0f}",
        ]
        if cuda:
            cells.append(f"{100 * r['mfu']:.1f}%")
        lines.append(" | ".join(f"{c:>{width if i == 0 else 9}}" for i, c in enumerate(cells)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    device = set_up_torch(args.device, args.threads)
    losses = supported_losses() if args.losses == "all" else [x.strip() for x in args.losses.split(",") if x.strip()]
    unknown = [x for x in losses if x not in supported_losses()]
    if unknown:
        raise SystemExit(f"unsupported loss(es) {unknown}; the trainer supports {supported_losses()}")

    from halos_core.run_dir import tree_sha256

    with work_dir(args.workdir, "halos-bench-") as work:
        t0 = time.perf_counter()
        model_dir, counts = build_model(work / "model", args, device)
        sha = tree_sha256(model_dir)
        build_s = time.perf_counter() - t0
        dev_name = device_name(device)
        print(
            f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, intermediate "
            f"{args.intermediate}, vocab {counts['vocab']} (tokenizer {counts['tokenizer_vocab']}), "
            f"{counts['params'] / 1e6:.2f}M params ({counts['matmul_params'] / 1e6:.2f}M matmul), "
            f"built in {build_s:.1f}s",
            flush=True,
        )
        print(
            f"run: {device} {dev_name}, {args.dtype}, seq {args.seq_min}-{args.seq_max}, batch {args.batch_size} "
            f"(microbatch {args.microbatch_size}), {args.steps} steps (first {args.warmup} not averaged)",
            flush=True,
        )
        rows = []
        for loss in losses:
            row = bench_loss(loss, args, model_dir, sha, counts, work, device)
            rows.append(row)
            if "skipped" not in row:
                print(f"  {loss}: {row['tokens_per_s']:.0f} tok/s, {row['step_s']:.3f} s/step", flush=True)
        print(format_table(rows, device == "cuda"))
        report = {
            "device": device,
            "device_name": dev_name,
            "torch": torch.__version__,
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
            "model": counts,
            "results": rows,
        }
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()

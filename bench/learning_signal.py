"""Learning signal across online rounds: held-out reward accuracy before and after each round.

    .venv/bin/python bench/learning_signal.py                     # DPO and KTO, 3 rounds, CPU, ~2 min
    .venv/bin/python bench/learning_signal.py --losses dpo --rounds 2 --out signal.json

Acceptance (issue): on synthetic feedback whose preferred outputs follow a rule a tiny model can
learn (`halos_core.synthetic`: the preferred reply repeats the prompt's topic word and ends with
"thanks"), 2-3 DPO rounds take held-out reward accuracy from ~0.5 to >= 0.9, and KTO likewise.

What runs, per loss:
- a tiny local Llama (`halos_core.tiny.build_tiny_model`) is the SFT model = the pinned reference;
- round k = 1..R trains on NEW synthetic feedback (its own seed; DPO: pairwise records, KTO:
  binary records, or pairwise + `pairwise_to_unpaired` with `--kto-feedback pairwise`), a share
  of whose records are `split: "test"` (the trainer's held-out eval set for that round);
- rounds are chained as the server chains them: round k+1's `RunConfig.init_from` = round k's
  `final/` dir, `counters` = round k's result step/examples, same reference path and sha256;
  each round runs through `halos_core.train.run(config)`.

Two held-out measurements, both reported:
- "trainer eval": the trainer's own eval metrics of the round (`result.eval`, computed by
  `Trainer.evaluate()` on that round's test split). Round 0 (the SFT model, before any round) is
  `Trainer.from_config(round-1 config).evaluate()` without training. KTO's eval has no accuracy
  (its desirable and undesirable rows are different examples): it reports margin
  (mean desirable reward - mean undesirable reward) and loss only.
- "fixed pairs": one fixed set of held-out pairwise records (never trained on), the same for
  every round and loss, scored with the library's pieces (ChatEncoder, Batcher, token_logps and
  the DPO loss unit): implicit reward r(x, y) = beta * sum_t log pi/pi_ref, accuracy = share of
  pairs with r(chosen) > r(rejected), ties counted as 1/2. For the SFT model pi = pi_ref, every
  reward is exactly 0 and every pair is a tie: accuracy 0.5 (the library's strict `>` would say
  0.0). This is the accuracy the KTO criterion is judged on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.cli import work_dir, write_report  # noqa: E402 - after sys.path names the checkout

TARGET = 0.9


# --------------------------------------------------------------------------- held-out scoring


def pair_scores(
    policy_dir: Path,
    reference_dir: Path,
    heldout_file: Path,
    *,
    beta: float,
    max_length: int,
    max_prompt_length: int,
    microbatch_size: int = 16,
) -> dict[str, float]:
    """Implicit-reward accuracy / margin / DPO loss of `policy_dir` against the reference on pairs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from halos_core.data.collate import concat_streams
    from halos_core.data.examples import build_examples
    from halos_core.data.loaders import Batcher
    from halos_core.data.tokenize import ChatEncoder
    from halos_core.feedback import read_records
    from halos_core.logprobs import token_logps
    from halos_core.losses import build_loss

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    examples = build_examples([("heldout", list(read_records(heldout_file)))], "paired", seed=0).eval
    batcher = Batcher(ChatEncoder(tokenizer, max_length, max_prompt_length), "paired")
    loss = build_loss({"name": "dpo", "beta": beta})
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    same = Path(policy_dir).resolve() == Path(reference_dir).resolve()
    reference = policy if same else AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    chosen, rejected, losses = [], [], []
    with torch.no_grad():
        for i in range(0, len(examples), microbatch_size):
            mb = batcher(examples[i : i + microbatch_size])
            both = concat_streams([mb.streams["chosen"], mb.streams["rejected"]], int(tokenizer.pad_token_id))
            args = (both["input_ids"], both["attention_mask"], both["labels"])
            logps, mask = token_logps(policy, *args)
            ref = logps if same else token_logps(reference, *args)[0]
            n = mb.size
            out = loss.compute(
                policy_chosen_logps=logps[:n],
                policy_rejected_logps=logps[n:],
                reference_chosen_logps=ref[:n],
                reference_rejected_logps=ref[n:],
                chosen_mask=mask[:n],
                rejected_mask=mask[n:],
            )
            chosen.append(out.values["chosen_rewards"])
            rejected.append(out.values["rejected_rewards"])
            losses.append(out.values["losses"])
    c, r, per_example = torch.cat(chosen), torch.cat(rejected), torch.cat(losses)
    wins, ties = (c > r).float(), (c == r).float()
    return {
        "accuracy": float((wins + 0.5 * ties).mean()),
        "accuracy_strict": float(wins.mean()),
        "ties": float(ties.mean()),
        "margin": float((c - r).mean()),
        "dpo_loss": float(per_example.mean()),
        "n": len(examples),
    }


def topic_contrast_records(
    n: int, seed: int, test_fraction: float = 1.0, binary: bool = False, prefix: str = "t"
) -> list[dict]:
    """Pairs that differ ONLY in the topic word: the well-formed reply about the prompt's topic vs
    the same reply about another topic (binary: one of the two, alternately). Only a model that
    learned "repeat the prompt's topic" (not just "prefer the '..., thanks.' template that the
    synthetic feedback's preferred replies always use") ranks these right."""
    import random

    from halos_core.synthetic import PROMPT_TEMPLATES, TOPICS

    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        other = rng.choice([w for w in TOPICS if w != topic])
        prompt = [{"role": "user", "content": rng.choice(PROMPT_TEMPLATES).format(t=topic)}]
        good, bad = (f"The {w} is a fine {w}, thanks." for w in (topic, other))
        split = "test" if rng.random() < test_fraction else "train"
        if binary:
            desirable = i % 2 == 0
            out.append(
                {
                    "type": "binary_feedback",
                    "prompt_id": f"{prefix}{i}",
                    "prompt": prompt,
                    "output": [{"role": "assistant", "content": good if desirable else bad}],
                    "label": int(desirable),
                    "split": split,
                }
            )
            continue
        a_good = rng.random() < 0.5
        out.append(
            {
                "type": "pairwise_feedback",
                "prompt_id": f"{prefix}{i}",
                "prompt": prompt,
                "output_A": [{"role": "assistant", "content": good if a_good else bad}],
                "output_B": [{"role": "assistant", "content": bad if a_good else good}],
                "label": 1 if a_good else 0,
                "split": split,
            }
        )
    return out


# --------------------------------------------------------------------------- rounds


def round_feedback(loss: str, k: int, args: argparse.Namespace, work: Path) -> tuple[Path, str, dict | None]:
    from halos_core.synthetic import binary_records, pairwise_records, write_jsonl

    seed = args.seed * 1000 + 100 + k  # NEW feedback every round
    binary = loss == "kto" and args.kto_feedback == "binary"
    path = work / f"{loss}-round{k}.jsonl"
    if args.feedback == "topic":
        recs = topic_contrast_records(args.records, seed, args.test_fraction, binary=binary, prefix=f"r{k}-")
    elif binary:
        recs = binary_records(args.records, seed=seed, test_fraction=args.test_fraction, id_prefix=f"r{k}-")
    else:
        recs = pairwise_records(args.records, seed=seed, test_fraction=args.test_fraction, id_prefix=f"r{k}-")
    write_jsonl(recs, path)
    if binary:
        return path, "binary", None
    return path, "pairwise", ({"type": "pairwise_to_unpaired"} if loss == "kto" else None)


def loss_config(loss: str, args: argparse.Namespace) -> dict:
    if loss == "dpo":
        return {"name": "dpo", "beta": args.beta}
    if loss == "kto":
        return {"name": "kto", "beta": args.kto_beta}
    raise ValueError(f"learning_signal covers dpo and kto, not {loss!r}")


def make_config(
    loss: str,
    k: int,
    args: argparse.Namespace,
    work: Path,
    model_dir: Path,
    sha: str,
    parent: Any | None,
    run_dir: Path | None = None,
):
    from halos_core.job_spec import RunConfig

    fb, kind, conversion = round_feedback(loss, k, args, work)
    lr = args.kto_lr if (loss == "kto" and args.kto_lr) else args.lr
    return RunConfig.model_validate(
        {
            "job_id": f"{loss}-round{k}",
            "run_dir": str(run_dir or work / f"{loss}-round{k}"),
            "reference_path": str(model_dir),
            "reference_sha256": sha,
            "init_from": str(parent.final_dir) if parent is not None else None,
            "counters": {"step": parent.step, "examples": parent.examples}
            if parent is not None
            else {"step": 0, "examples": 0},
            "feedback": [{"path": str(fb), "kind": kind, "file_id": f"round{k}"}],
            "loss": loss_config(loss, args),
            "conversion": conversion,
            "hyperparams": {
                "lr": lr,
                "batch_size": args.batch_size,
                "microbatch_size": args.microbatch_size,
                "n_epochs": args.epochs,
                "max_length": args.max_length,
                "max_prompt_length": args.max_prompt_length,
                "warmup_steps": 0,
                "seed": args.seed + k,
            },
        }
    )


def eval_before(cfg) -> dict[str, float]:
    """The trainer's eval metrics of the SFT model on round 1's test split (no training)."""
    from halos_core.train import _release
    from halos_core.training import Trainer

    trainer = Trainer.from_config(cfg)
    try:
        return trainer.evaluate() if trainer.eval_loader is not None else {}
    finally:
        _release(trainer)


def run_loss(
    loss: str, args: argparse.Namespace, work: Path, model_dir: Path, sha: str, heldout: Path, topic: Path
) -> list[dict]:
    from halos_core.train import run

    score_kw = dict(beta=args.beta, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    rows = []
    cfg1 = make_config(loss, 1, args, work, model_dir, sha, None, run_dir=work / f"{loss}-round0-eval")
    t0 = time.perf_counter()
    ev = eval_before(cfg1)
    fixed = pair_scores(model_dir, model_dir, heldout, **score_kw)
    fixed["topic_accuracy"] = pair_scores(model_dir, model_dir, topic, **score_kw)["accuracy"]
    rows.append(_row(loss, 0, ev, fixed, None, time.perf_counter() - t0))
    _print_row(rows[-1])
    parent = None
    for k in range(1, args.rounds + 1):
        cfg = make_config(loss, k, args, work, model_dir, sha, parent)
        t0 = time.perf_counter()
        res = run(cfg)
        fixed = pair_scores(res.final_dir, model_dir, heldout, **score_kw)
        fixed["topic_accuracy"] = pair_scores(res.final_dir, model_dir, topic, **score_kw)["accuracy"]
        rows.append(_row(loss, k, res.eval, fixed, res, time.perf_counter() - t0))
        _print_row(rows[-1])
        parent = None if args.no_chain else res
    return rows


def _row(loss: str, k: int, ev: dict, fixed: dict, res: Any, seconds: float) -> dict:
    return {
        "loss": loss,
        "round": k,
        "eval_accuracy": ev.get("rewards/accuracy"),
        "eval_margin": ev.get("rewards/margin"),
        "eval_loss": ev.get("loss"),
        "eval_n": ev.get("n"),
        "fixed": fixed,
        "step": res.step if res else 0,
        "examples": res.examples if res else 0,
        "round_step": res.round_step if res else 0,
        "seconds": seconds,
    }


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


HEADER = (
    f"{'loss':>5} {'round':>5} {'step':>5} | {'eval_acc':>8} {'eval_margin':>11} {'eval_loss':>9} {'n':>4} | "
    f"{'fixed_acc':>9} {'fixed_margin':>12} {'ties':>5} | {'topic_acc':>9} | {'sec':>5}"
)


def _print_row(r: dict) -> None:
    f = r["fixed"]
    print(
        f"{r['loss']:>5} {r['round']:>5} {r['step']:>5} | {_fmt(r['eval_accuracy']):>8} "
        f"{_fmt(r['eval_margin'], '.4f'):>11} "
        f"{_fmt(r['eval_loss'], '.4f'):>9} {_fmt(r['eval_n'], '.0f'):>4} | {f['accuracy']:>9.3f} {f['margin']:>12.4f} "
        f"{f['ties']:>5.2f} | {f['topic_accuracy']:>9.3f} | {r['seconds']:>5.1f}",
        flush=True,
    )


def verdict(rows: list[dict], loss: str) -> tuple[bool, str]:
    mine = [r for r in rows if r["loss"] == loss]
    before = mine[0]["fixed"]["accuracy"]
    after = {r["round"]: r["fixed"]["accuracy"] for r in mine[1:]}
    trainer_after = {r["round"]: r["eval_accuracy"] for r in mine[1:] if r["eval_accuracy"] is not None}
    reached = [k for k in sorted(after) if after[k] >= TARGET and k <= 3]
    ok = abs(before - 0.5) <= 0.1 and bool(reached)
    if loss == "dpo" and trainer_after:  # DPO: the trainer's own eval accuracy must agree
        ok = ok and any(trainer_after.get(k, 0) >= TARGET for k in range(1, 4))
    # chaining: counters continue and every round moves the held-out margin further (a round that
    # restarted from the SFT weights would land near round 1's margin again)
    steps_ok = all(b["step"] == a["step"] + b["round_step"] for a, b in zip(mine, mine[1:]))
    margins = [r["fixed"]["margin"] for r in mine]
    grows = all(b > a for a, b in zip(margins, margins[1:]))
    ok = ok and steps_ok and grows
    text = f"{loss}: fixed held-out accuracy {before:.2f} before round 1 -> " + ", ".join(
        f"round {k}: {v:.2f}" for k, v in sorted(after.items())
    )
    if trainer_after:
        text += " (trainer eval: " + ", ".join(f"round {k}: {v:.2f}" for k, v in sorted(trainer_after.items())) + ")"
    text += f"; >= {TARGET} first at round {reached[0]}" if reached else f"; never >= {TARGET} within 3 rounds"
    text += (
        f"; chained: counters {'continue' if steps_ok else 'BROKEN'}, held-out margin "
        + ("grows every round" if grows else "does NOT grow every round")
        + " ("
        + ", ".join(f"{m:.2f}" for m in margins)
        + ")"
    )
    return ok, text


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Held-out reward accuracy across chained DPO/KTO rounds (tiny model, CPU).")
    p.add_argument("--losses", default="dpo,kto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--records", type=int, default=96, help="synthetic records per round (new ones every round)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="share of each round's records held out")
    p.add_argument("--heldout", type=int, default=64, help="fixed held-out pairs scored after every round")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kto-lr", type=float, default=None, help="KTO's lr (default: --lr)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (also scales the fixed-pairs rewards)")
    p.add_argument("--kto-beta", type=float, default=0.1)
    p.add_argument(
        "--kto-feedback",
        choices=("binary", "pairwise"),
        default="binary",
        help="KTO rounds on binary records, or on pairwise ones with the pairwise_to_unpaired conversion",
    )
    p.add_argument(
        "--feedback",
        choices=("synthetic", "topic"),
        default="synthetic",
        help="training feedback: halos_core.synthetic's (the issue's rule), or harder pairs that differ "
        "only in the topic word",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--microbatch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-prompt-length", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--workdir", help="keep models, feedback and run dirs here (default: a temp dir, removed)")
    p.add_argument("--out", help="write the rows and verdicts as JSON here")
    p.add_argument(
        "--no-chain",
        action="store_true",
        help="negative control: every round starts from the SFT model (the chaining check must then fail)",
    )
    p.add_argument("--check", action="store_true", help="exit 1 when the acceptance criterion does not hold")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    from halos_core.run_dir import tree_sha256
    from halos_core.synthetic import pairwise_records, write_jsonl
    from halos_core.tiny import build_tiny_model

    logging.getLogger("halos_core").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]

    with work_dir(args.workdir, "halos-signal-") as work:
        t_start = time.perf_counter()
        model_dir = build_tiny_model(
            work / "sft", seed=args.seed, hidden_size=args.hidden, layers=args.layers, heads=args.heads
        )
        sha = tree_sha256(model_dir)
        heldout = write_jsonl(
            pairwise_records(args.heldout, seed=args.seed * 1000 + 999, test_fraction=1.0, id_prefix="h"),
            work / "heldout-pairs.jsonl",
        )
        topic = write_jsonl(
            topic_contrast_records(args.heldout, seed=args.seed * 1000 + 998), work / "topic-pairs.jsonl"
        )
        print(
            f"tiny Llama hidden {args.hidden}, {args.layers} layers; {args.records} records/round "
            f"({args.test_fraction:.0%} test), lr {args.lr}, dpo beta {args.beta}, kto beta {args.kto_beta}, "
            f"batch {args.batch_size}, {args.epochs} epoch(s)/round; fixed held-out pairs: {args.heldout}",
            flush=True,
        )
        print(HEADER, flush=True)
        rows: list[dict] = []
        for loss in losses:
            rows.extend(run_loss(loss, args, work, model_dir, sha, heldout, topic))
        verdicts = {loss: verdict(rows, loss) for loss in losses}
        total = time.perf_counter() - t_start
        for ok, text in verdicts.values():
            print(f"{'PASS' if ok else 'FAIL'} {text}")
        print(f"total {total:.0f}s")
        report = {
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
            "rows": rows,
            "verdicts": {k: {"ok": ok, "text": t} for k, (ok, t) in verdicts.items()},
            "seconds": total,
        }
    write_report(args.out, report)
    if args.check and not all(ok for ok, _ in verdicts.values()):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()

"""Entry point of a labelling job: `python -m halos_core.label --config run.json` (a LabelConfig).

Scores every sample with a reward model — a `bradley_terry` checkpoint: the policy body and its
reward head (`halos_core.heads.RewardHead`, the last non-padding token's hidden state), on the
prompt + output tokenised exactly as its round trained (`ChatEncoder`, the round's max lengths) —
and turns the scores into feedback with the reference implementation's label semantics, through
the same conversions a round applies (`halos_core.feedback.convert`):

- scalar:   one scalar_feedback record per sample, reward = the score;
- binary:   desirable iff score > cut, the cut = threshold / mean / median of all scores;
- pairwise: per prompt the best sample against a random / the lowest / the closest other one whose
            score is at least `min_gap` lower (ties express no preference and are never paired).

Output: HALOs JSONL (`type` scalar_feedback / binary_feedback / pairwise_feedback) with each record's
prompt id, split, and the scores; metrics.jsonl per batch; result.json last (mean score in `stats`).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from halos_core.artefact_spec import OUTPUT_DIR, ArtefactResult, LabelConfig, RewardModel, write_output_atomic
from halos_core.feedback import BinaryRecord, PairwiseRecord, ScalarRecord, read_records
from halos_core.feedback.convert import scalar_to_binary, scalar_to_pairs
from halos_core.feedback.records import SampledRecord
from halos_core.run_dir import RunDir, write_json_atomic

OUTPUT_NAME = "feedback.jsonl"


class RewardScorer:
    """Scores (prompt, output) pairs with a bradley_terry checkpoint's body + reward head."""

    def __init__(self, rm: RewardModel):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from halos_core.data.tokenize import ChatEncoder
        from halos_core.heads import HEAD_FILE, RewardHead
        from halos_core.logprobs import TokenLogprobModel

        path = Path(rm.path)
        state = json.loads((path / "trainer_state.json").read_text())
        head_desc = state.get("head") or {}
        if head_desc.get("kind") != "reward":
            raise ValueError(f"checkpoint {rm.checkpoint_id} has no reward head (head: {head_desc or None})")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        head = RewardHead(int(head_desc["hidden_size"]))
        from safetensors.torch import load_file

        head.load_state_dict(load_file(str(path / HEAD_FILE)), strict=True)
        self.model = TokenLogprobModel(lm, head=head).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.encoder = ChatEncoder(self.tokenizer, rm.max_length, rm.max_prompt_length)

    def score(self, records: list[SampledRecord]) -> list[float]:
        import torch

        from halos_core.data.examples import turns

        encoded = [self.encoder.encode(turns(r.prompt), turns(r.output)).input_ids for r in records]
        width = max(len(e) for e in encoded)
        pad = self.encoder.pad_token_id
        ids = torch.tensor([list(e) + [pad] * (width - len(e)) for e in encoded], device=self.device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=self.device)
        with torch.no_grad():
            return [float(x) for x in self.model(ids, mask, mode="reward").cpu()]


def _halos(record: Any) -> dict[str, Any]:
    """A normal-form record as the HALOs JSON record a round reads."""
    base = {"prompt_id": record.prompt_id, "prompt": [t.model_dump() for t in record.prompt], "split": record.split}
    if isinstance(record, PairwiseRecord):
        return {
            "type": "pairwise_feedback",
            **base,
            "output_A": [t.model_dump() for t in record.output_A],
            "output_B": [t.model_dump() for t in record.output_B],
            "label": record.label,
            "reward_A": record.reward_A,
            "reward_B": record.reward_B,
        }
    if isinstance(record, BinaryRecord):
        return {
            "type": "binary_feedback",
            **base,
            "output": [t.model_dump() for t in record.output],
            "label": record.label,
            "reward": record.reward,
        }
    return {
        "type": "scalar_feedback",
        **base,
        "output": [t.model_dump() for t in record.output],
        "reward": record.reward,
    }


def label(config: LabelConfig, scores: list[float], samples: list[SampledRecord]) -> list[Any]:
    """The feedback records for `samples` scored `scores` under `config.label`."""
    scalars = [
        ScalarRecord.model_construct(prompt_id=s.prompt_id, prompt=s.prompt, output=s.output, reward=r, split=s.split)
        for s, r in zip(samples, scores)
    ]
    rule = config.label
    if rule.type == "binary":
        return scalar_to_binary(scalars, rule.method, rule.threshold)
    if rule.type == "pairwise":
        return scalar_to_pairs(scalars, rule.method, rule.min_gap, seed=config.seed)
    return scalars


def run(config: LabelConfig) -> ArtefactResult:
    run_dir = RunDir(config.run_dir).create()
    samples = [r for r in read_records(config.samples.path)]
    if not all(isinstance(r, SampledRecord) for r in samples):
        raise ValueError(f"feedback file {config.samples.file_id} is not a samples file")
    scorer = RewardScorer(config.reward_model)
    scores: list[float] = []
    total = (len(samples) + config.batch_size - 1) // config.batch_size
    for b in range(total):
        t0 = time.perf_counter()
        batch = samples[b * config.batch_size : (b + 1) * config.batch_size]
        scores += scorer.score(batch)
        elapsed = time.perf_counter() - t0
        run_dir.append_metrics(
            {
                "step": b + 1,
                "round_step": b + 1,
                "total_steps": total,
                "examples": len(scores),
                "mean_score": statistics.fmean(scores),
                "samples_per_s": len(batch) / elapsed if elapsed > 0 else None,
                "time": time.time(),
            }
        )
    records = label(config, scores, samples)
    target = run_dir.path / OUTPUT_DIR / OUTPUT_NAME
    sha, size = write_output_atomic(target, (json.dumps(_halos(r), ensure_ascii=False) for r in records))
    prompts = {r.prompt_id for r in records}
    n_test = sum(r.split == "test" for r in records)
    result = ArtefactResult(
        job_id=config.job_id,
        kind="label",
        output_path=str(target.resolve()),
        sha256=sha,
        size_bytes=size,
        feedback_kind=config.label.type,
        format="halos_jsonl",
        n_records=len(records),
        n_prompts=len(prompts),
        n_train=len(records) - n_test,
        n_test=n_test,
        stats={"mean_score": statistics.fmean(scores) if scores else 0.0, "samples": float(len(samples))},
    )
    write_json_atomic(run_dir.result_json, result.to_json())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m halos_core.label", description="Label samples with a reward model."
    )
    parser.add_argument("--config", required=True, help="path of run.json (a LabelConfig)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(LabelConfig.model_validate_json(Path(args.config).read_text()))
        print(
            f"halos_core.label: ok {result.n_records} {result.feedback_kind} records -> {result.output_path}",
            flush=True,
        )
        return 0
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    sys.exit(main())

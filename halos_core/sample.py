"""Entry point of a sampling job: `python -m halos_core.sample --config run.json` (a SampleConfig).

Draws `params.n` completions for every prompt of the prompt set from the generator (the run's
head, a checkpoint or a registered model, resolved by the server at submit time) and writes them
in HALOs' samples format (`train.sample`'s output: prompt_id, sample_id, prompt, output, split,
plus the generator's checkpoint id), which a round can train on directly and a labelling job can
label. Same run-directory contract as a round (halos_core.artefact_spec): metrics.jsonl per batch
(samples_per_s), outputs/samples.jsonl written atomically, result.json last. Exit 0 after
result.json; 1 with the traceback on any error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from halos_core.artefact_spec import OUTPUT_DIR, ArtefactResult, SampleConfig, write_output_atomic
from halos_core.feedback.prompts import PromptRecord, read_prompts
from halos_core.run_dir import RunDir, write_json_atomic

OUTPUT_NAME = "samples.jsonl"


def _batches(prompts: list[PromptRecord], size: int) -> Iterator[list[PromptRecord]]:
    for start in range(0, len(prompts), size):
        yield prompts[start : start + size]


def run(config: SampleConfig) -> ArtefactResult:
    from halos_core import generation

    run_dir = RunDir(config.run_dir).create()
    params = config.params
    prompts = list(read_prompts(config.prompts.path))
    engine = generation.build(config.generator, params)
    total = (len(prompts) + params.batch_size - 1) // params.batch_size
    lines: list[str] = []
    started = time.perf_counter()
    n_test = 0
    for b, batch in enumerate(_batches(prompts, params.batch_size)):
        t0 = time.perf_counter()
        texts = engine.generate([p.prompt for p in batch], params, b)
        for record, outputs in zip(batch, texts):
            n_test += record.split == "test"
            for j, text in enumerate(outputs):
                lines.append(
                    json.dumps(
                        {
                            "type": "sample",
                            "prompt_id": record.prompt_id,
                            "sample_id": str(j),
                            "prompt": [t.model_dump() for t in record.prompt],
                            "output": text,
                            "split": record.split,
                            "dataset": config.prompts.prompt_set_id,
                            "generator": config.generator.checkpoint_id or config.generator.model_id,
                            "seed": params.seed,
                        },
                        ensure_ascii=False,
                    )
                )
        elapsed = time.perf_counter() - t0
        run_dir.append_metrics(
            {
                "step": b + 1,
                "round_step": b + 1,
                "total_steps": total,
                "examples": len(lines),
                "samples_per_s": len(batch) * params.n / elapsed if elapsed > 0 else None,
                "time": time.time(),
            }
        )
    target = run_dir.path / OUTPUT_DIR / OUTPUT_NAME
    sha, size = write_output_atomic(target, lines)
    wall = time.perf_counter() - started
    result = ArtefactResult(
        job_id=config.job_id,
        kind="sample",
        output_path=str(target.resolve()),
        sha256=sha,
        size_bytes=size,
        feedback_kind="sampled",
        format="halos_sampled",
        n_records=len(lines),
        n_prompts=len(prompts),
        n_train=len(lines) - n_test * params.n,
        n_test=n_test * params.n,
        engine=engine.name,
        stats={"samples_per_s": len(lines) / wall if wall > 0 else 0.0, "seconds": wall},
    )
    write_json_atomic(run_dir.result_json, result.to_json())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m halos_core.sample", description="Sample completions.")
    parser.add_argument("--config", required=True, help="path of run.json (a SampleConfig)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run(SampleConfig.model_validate_json(Path(args.config).read_text()))
        print(f"halos_core.sample: ok {result.n_records} samples ({result.engine}) -> {result.output_path}", flush=True)
        return 0
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    sys.exit(main())

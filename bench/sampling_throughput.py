"""Sampling throughput: samples/s of a sampling job's engine (what `POST /v1/sampling-jobs` runs).

    .venv/bin/python bench/sampling_throughput.py                          # tiny model, engine auto
    .venv/bin/python bench/sampling_throughput.py --model /models/llama --engine vllm --prompts 512

Runs `halos_core.sample.run` in this process (the job's subprocess body, without the server) on
`--prompts` synthetic prompts, `--n` samples each, once per engine asked for, and prints
samples/s (the job's own `stats.samples_per_s`: records / wall time of the run, model load
included) and the per-batch figures. Engine `auto` is vLLM where vLLM is installed and a GPU is
present (`pip install halos-server[vllm]`), else transformers `generate`; `--engine hf vllm`
compares both on the same prompts. The vLLM path has only ever been written against vLLM's
documented API here: no GPU was available to run it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> list[dict]:
    from halos_core.artefact_spec import Generator, PromptsInput, SampleConfig, SamplingParams
    from halos_core.run_dir import RunDir
    from halos_core.sample import run
    from halos_core.synthetic import PROMPT_TEMPLATES, TOPICS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a HF model directory (default: build the tiny test model)")
    parser.add_argument("--engine", nargs="+", default=["auto"], choices=["auto", "hf", "vllm"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="halos-sampling-bench-"))
    model = args.model
    if model is None:
        model = str(work / "tiny")
        subprocess.run([sys.executable, "-m", "halos_core.tiny", model], check=True, stdout=subprocess.DEVNULL)
    rng = random.Random(0)
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps(
                {
                    "prompt_id": f"p{i}",
                    "prompt": [{"role": "user", "content": rng.choice(PROMPT_TEMPLATES).format(t=rng.choice(TOPICS))}],
                }
            )
            + "\n"
            for i in range(args.prompts)
        )
    )
    rows = []
    for engine in args.engine:
        config = SampleConfig(
            job_id=f"bench-{engine}",
            run_dir=str(work / f"run-{engine}"),
            generator=Generator(model_path=model, model_id="bench"),
            prompts=PromptsInput(path=str(prompts), prompt_set_id="bench"),
            params=SamplingParams(
                n=args.n, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, engine=engine, seed=0
            ),
        )
        result = run(config)
        batches = [m["samples_per_s"] for m in RunDir(config.run_dir).read_metrics()[0] if m.get("samples_per_s")]
        row = {
            "engine_asked": engine,
            "engine": result.engine,
            "samples": result.n_records,
            "seconds": round(result.stats["seconds"], 2),
            "samples_per_s": round(result.stats["samples_per_s"], 1),
            "batch_samples_per_s_median": round(sorted(batches)[len(batches) // 2], 1) if batches else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()

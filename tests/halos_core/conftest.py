"""Fixtures of the training-core tests: one tiny local model per session, run configs on tmp dirs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from halos_core.config import Hyperparams
from halos_core.job_spec import RunConfig
from halos_core.run_dir import tree_sha256
from halos_core.synthetic import pairwise_records, write_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from halos_core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "sft", seed=0)


@pytest.fixture(scope="session")
def tiny_sha(tiny_model_dir) -> str:
    return tree_sha256(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def pairwise_file(tmp_path_factory) -> Path:
    return write_jsonl(pairwise_records(48, seed=1), tmp_path_factory.mktemp("fb") / "pairs.jsonl")


def make_config(
    run_dir: Path,
    model_dir: Path,
    sha: str,
    feedback: list[tuple[Path, str]] | Path,
    loss: dict[str, Any] | None = None,
    job_id: str = "job",
    **kwargs: Any,
) -> RunConfig:
    """A RunConfig for the tiny model; hyperparameters default to small, quick values."""
    if isinstance(feedback, Path):
        feedback = [(feedback, "pairwise")]
    hp = {
        "lr": 1e-3,
        "batch_size": 8,
        "microbatch_size": 4,
        "max_length": 64,
        "max_prompt_length": 32,
        "warmup_steps": 0,
        "seed": 0,
    }
    hp.update(kwargs.pop("hyperparams", {}))
    for name in list(kwargs):
        if name in Hyperparams.model_fields:
            hp[name] = kwargs.pop(name)
    data = {
        "job_id": job_id,
        "run_dir": str(run_dir),
        "reference_path": str(model_dir),
        "reference_sha256": sha,
        "feedback": [{"path": str(p), "kind": kind, "file_id": f"f{i}"} for i, (p, kind) in enumerate(feedback)],
        "loss": loss or {"name": "dpo", "beta": 0.1},
        "hyperparams": hp,
        **kwargs,
    }
    return RunConfig.model_validate(data)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def chained_eval(
    tmp_path: Path, model_dir: Path, sha: str, loss: dict[str, Any], rounds: int = 2, **hyperparams: Any
) -> list[dict[str, float]]:
    """A learning-signal check for a paired loss on the synthetic task (`halos_core.synthetic`: the
    preferred reply repeats the prompt's topic): `rounds` chained rounds, each on 32 fresh training
    pairs, all evaluated on the same 32 held-out pairs (`split: test`). Returns each round's eval
    metrics (the loss's own rewards: `rewards/accuracy`, `rewards/margin`)."""
    from halos_core.synthetic import pairwise_records, write_jsonl
    from halos_core.train import run

    held_out = write_jsonl(
        pairwise_records(32, seed=900, test_fraction=1.0, id_prefix="h"), tmp_path / "held_out.jsonl"
    )
    evals, parent = [], None
    for k in range(1, rounds + 1):
        train = write_jsonl(pairwise_records(32, seed=900 + k, id_prefix=f"r{k}-"), tmp_path / f"train{k}.jsonl")
        chain = (
            {"init_from": str(parent.final_dir), "counters": {"step": parent.step, "examples": parent.examples}}
            if parent
            else {}
        )
        cfg = make_config(
            tmp_path / f"round{k}",
            model_dir,
            sha,
            [(train, "pairwise"), (held_out, "pairwise")],
            loss=loss,
            job_id=f"round{k}",
            **{"lr": 3e-4, "microbatch_size": 8, **hyperparams},
            **chain,
        )
        parent = run(cfg)
        evals.append(parent.eval)
    return evals


def assert_learns(evals: list[dict[str, float]]) -> None:
    """Held-out preference accuracy ends >= 0.9 and the held-out margin grows every round."""
    margins = [e["rewards/margin"] for e in evals]
    assert evals[-1]["rewards/accuracy"] >= 0.9, evals
    assert all(b > a for a, b in zip([0.0, *margins], margins)), margins

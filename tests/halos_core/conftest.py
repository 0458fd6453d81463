"""Fixtures of the training-core tests: one tiny local model per session, run configs on tmp dirs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from halos_core.config import Hyperparams, RunConfig
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

"""Round option `hyperparams.adam_betas`: set on a round, it reaches the trainer's live optimizer —
also when the round continues a parent whose saved optimizer state had other betas — and the API
accepts and validates it without any change of its own (RoundCreate patches Hyperparams)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from halos_core.config import Hyperparams
from halos_core.train import _release, run
from halos_core.training import Trainer
from tests.halos_core.conftest import make_config


def _betas(trainer: Trainer) -> set[tuple[float, float]]:
    return {tuple(g["betas"]) for g in trainer.optimizer.param_groups}


def test_betas_reach_the_optimizer_of_a_first_and_a_continued_round(tmp_path, tiny_model_dir, tiny_sha, pairwise_file):
    r1 = run(make_config(tmp_path / "r1", tiny_model_dir, tiny_sha, pairwise_file, job_id="r1", adam_betas=(0.8, 0.95)))
    cfg2 = make_config(
        tmp_path / "r2",
        tiny_model_dir,
        tiny_sha,
        pairwise_file,
        job_id="r2",
        adam_betas=(0.5, 0.9),
        init_from=str(r1.final_dir),
        counters={"step": r1.step, "examples": r1.examples},
    )
    trainer = Trainer.from_config(cfg2)
    try:
        assert trainer.restored is not None  # the parent's optimizer state was loaded (with betas 0.8/0.95) ...
        assert _betas(trainer) == {(0.5, 0.9)}  # ... and this round's betas apply from its first step
    finally:
        _release(trainer)
    first = Trainer.from_config(
        make_config(tmp_path / "r3", tiny_model_dir, tiny_sha, pairwise_file, job_id="r3", adam_betas=(0.8, 0.95))
    )
    try:
        assert _betas(first) == {(0.8, 0.95)}
    finally:
        _release(first)


def test_defaults_and_validation():
    assert Hyperparams().adam_betas == (0.9, 0.999)
    with pytest.raises(ValidationError):
        Hyperparams(adam_betas=(0.9, 1.0))


def test_the_api_accepts_the_option_as_a_round_override():
    from halos_client.models import RoundCreate

    body = RoundCreate.model_validate({"feedback_ids": ["fb_x"], "hyperparams": {"adam_betas": [0.5, 0.9]}})
    assert body.hyperparams.model_dump(exclude_unset=True) == {"adam_betas": (0.5, 0.9)}

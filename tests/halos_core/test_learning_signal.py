"""The learning-signal check new losses use (tests/halos_core/conftest.py `chained_eval`), on DPO:
chained rounds raise the held-out accuracy and margin; unchained rounds (every round from the SFT
model) do not keep growing the margin, so the check can fail."""

from __future__ import annotations

import pytest

from tests.halos_core.conftest import assert_learns, chained_eval


def test_dpo_learns_across_chained_rounds(tmp_path, tiny_model_dir, tiny_sha):
    evals = chained_eval(tmp_path, tiny_model_dir, tiny_sha, {"name": "dpo", "beta": 0.1}, rounds=2)
    assert_learns(evals)


def test_the_check_fails_without_learning(tmp_path, tiny_model_dir, tiny_sha):
    evals = chained_eval(tmp_path, tiny_model_dir, tiny_sha, {"name": "dpo", "beta": 0.1}, rounds=2, lr=1e-12)
    with pytest.raises(AssertionError):
        assert_learns(evals)

"""Golden values: every case of the fixture computed with HALOs must be reproduced.

The fixture path comes from $HALOS_GOLDEN_LOSSES (default: tests/fixtures/halos_losses.json).
A case whose loss is unknown fails (build_loss raises), it is never skipped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from halos_core.config import Hyperparams
from halos_core.loss_registry import LOSSES
from halos_core.losses import LossOutput, all_loss_classes, build_loss

RTOL, ATOL = 1e-4, 1e-5
FIXTURE = Path(
    os.environ.get("HALOS_GOLDEN_LOSSES") or Path(__file__).resolve().parents[1] / "fixtures" / "halos_losses.json"
)


def _load_cases() -> list[dict]:
    data = json.loads(FIXTURE.read_text())
    return data["cases"]


CASES = _load_cases()
_counts: dict[str, int] = {}
IDS = []
for _case in CASES:
    _n = _counts.get(_case["loss"], 0)
    _counts[_case["loss"]] = _n + 1
    IDS.append(f"{_case['loss']}-{_n}")


def _build(case: dict):
    return build_loss({"name": case["loss"], **case["params"]}, Hyperparams(humanline=bool(case["humanline"])))


def _inputs(case: dict, dtype: torch.dtype, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in case["inputs"].items():
        if key == "prompt_ids":
            tensors[key] = torch.tensor(value, dtype=torch.long)
        else:
            t = torch.tensor(value, dtype=dtype)
            if requires_grad and key.startswith("policy_") and t.numel():
                t.requires_grad_(True)
            tensors[key] = t
    return tensors


def test_fixture_is_not_empty():
    assert CASES, f"no cases in {FIXTURE}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_golden(case: dict, dtype: torch.dtype):
    loss = _build(case)
    assert loss.name == case["loss"]
    out = loss.compute(**_inputs(case, dtype))
    assert isinstance(out, LossOutput)
    assert out.loss.ndim == 0
    for key, expected in case["expected"].items():
        assert key in out.values, f"{case['loss']}: missing value {key!r} (have {sorted(out.values)})"
        got = out.values[key].to(torch.float64)
        want = torch.tensor(expected, dtype=torch.float64)
        assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
    # the scalar to backprop is the mean of the per-example losses (or the recorded loss)
    if "losses" in case["expected"]:
        want = torch.tensor(case["expected"]["losses"], dtype=torch.float64).mean()
    else:
        want = torch.tensor(case["expected"]["loss"], dtype=torch.float64)
    torch.testing.assert_close(out.loss.detach().to(torch.float64), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_flow(case: dict):
    loss = _build(case)
    inputs = _inputs(case, torch.float64, requires_grad=True)
    out = loss.compute(**inputs)
    assert out.loss.requires_grad
    out.loss.backward()
    grads = {k: t.grad for k, t in inputs.items() if t.requires_grad}
    assert grads, "no policy input required grad"
    for key, grad in grads.items():
        if key.startswith("policy_kl"):
            # KTO's KL estimate is detached: no gradient reaches the mismatched pairs
            assert grad is None or torch.count_nonzero(grad) == 0
            continue
        assert grad is not None, f"no gradient for {key}"
        assert torch.isfinite(grad).all(), f"non-finite gradient for {key}"
    total = sum(float(g.abs().sum()) for k, g in grads.items() if g is not None)
    assert total > 0 and math.isfinite(total)
    for value in out.values.values():
        assert not value.requires_grad


def test_registry_matches_config():
    """Every declaration names an implementation that declares itself as that loss."""
    classes = all_loss_classes()
    assert sorted(classes) == sorted(LOSSES)
    for name, cls in classes.items():
        assert cls.name == name
        assert cls.spec.data == LOSSES[name].data
        assert isinstance(cls.spec.needs_reference, bool)


def test_every_fixture_loss_is_registered():
    unknown = sorted({c["loss"] for c in CASES} - set(all_loss_classes()))
    assert not unknown, f"fixture losses with no implementation: {unknown}"


def test_unknown_loss_fails():
    with pytest.raises(ValueError):
        build_loss({"name": "not_a_loss"}, Hyperparams())

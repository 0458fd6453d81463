"""A save that runs out of disk fails cleanly (issue 12): on a real small filesystem (tmpfs), the
save raises ENOSPC, leaves no temp directory, and every earlier checkpoint still verifies and
loads. And a checkpoint whose optimizer state the storage lifecycle dropped still loads its
weights but refuses to be continued from."""

from __future__ import annotations

import errno
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from halos_core.checkpoint import OPTIMIZER_FILE, SaveRequest, load_checkpoint, save_checkpoint
from halos_core.run_dir import OPTIMIZER_STATE_FILES, CheckpointError, RunDir, drop_from_manifest, read_manifest
from halos_core.training import warmup_lambda


@pytest.fixture()
def trained(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(5))
    ids = torch.randint(10, 500, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    return model, opt, sched, tiny_tokenizer


def _save(path: Path, trained, step: int):
    model, opt, sched, tok = trained
    state = {"step": step, "examples": 8 * step, "round_step": step, "data_position": 8 * step, "epoch": 1.0}
    return save_checkpoint(
        path, SaveRequest(model, tok, opt.state_dict(), sched.state_dict(), state), manifest_extra={"kind": "t"}
    )


@pytest.fixture()
def small_fs(tmp_path: Path, trained):
    """A tmpfs that holds one checkpoint and a half: the second save cannot fit."""
    probe = tmp_path / "probe"
    _save(probe, trained, 1)
    one = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
    shutil.rmtree(probe)
    mount = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    size_kb = int(one * 1.5) // 1024 + 64
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_enospc_during_save_keeps_the_previous_checkpoint(small_fs: Path, trained):
    run_dir = RunDir(small_fs / "run").create()
    first = _save(run_dir.checkpoint_path(1), trained, 1)
    assert first is not None
    with pytest.raises(OSError) as caught:
        _save(run_dir.checkpoint_path(2), trained, 2)
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in run_dir.checkpoints.iterdir()] == ["step-000001"]  # no .tmp- left behind
    assert [m.step for m in run_dir.complete_checkpoints()] == [1]
    loaded = load_checkpoint(run_dir.checkpoint_path(1))  # verifies every sha256, loads the optimizer
    assert loaded.optimizer_state is not None and loaded.trainer_state["step"] == 1


def test_dropped_optimizer_state_loads_weights_but_cannot_continue(tmp_path: Path, trained):
    path = tmp_path / "final"
    _save(path, trained, 3)
    assert drop_from_manifest(path, OPTIMIZER_STATE_FILES) == list(OPTIMIZER_STATE_FILES)
    assert drop_from_manifest(path, OPTIMIZER_STATE_FILES) == []  # idempotent
    manifest = read_manifest(path, verify=True)  # the weights still verify
    assert manifest.extra["dropped"] == sorted(OPTIMIZER_STATE_FILES)
    with pytest.raises(CheckpointError, match=OPTIMIZER_FILE):
        load_checkpoint(path, need_optimizer=True)
    assert load_checkpoint(path, need_optimizer=False).optimizer_state is None

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path)  # evaluable / samplable

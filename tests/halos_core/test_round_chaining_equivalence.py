"""Round chaining is exact: round 1 on D1, then round 2 on D2 started from round 1's `final/`
(weights + Adam state + scheduler, counters from round 1's result) ends with THE SAME weights and
Adam state as one continuous trainer that sees D1's batches and then D2's, with one schedule.

Why the continuous baseline is not a single `run()` over `feedback=[D1, D2]`: the train loader
(`halos_core.data.loaders.TrainLoader`) shuffles the examples of ALL the round's files together
(`random.Random(f"{seed}:epoch:{e}")` over the concatenated example list) and has no switch to
disable the shuffle or keep files in order, so one round over both files trains on an interleaving
of D1 and D2 — a different batch sequence, a different model. The trainer cannot express "D1 then
D2" in one round. The baseline is therefore the real `Trainer` (built by `Trainer.from_config`,
running its own `train()` loop, saving its own `final/`) whose loader is replaced by the
concatenation of the two rounds' own loaders: step s < n1 is round 1's step s (D1, D1's shuffle),
step n1 + t is round 2's step t (D2, D2's shuffle). Same batcher, same microbatches, same padding,
one optimizer, one scheduler, one accelerator — nothing is restored, nothing is re-seeded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from halos_core.checkpoint import load_checkpoint
from halos_core.data.loaders import TrainLoader
from halos_core.run_dir import RunDir
from halos_core.synthetic import pairwise_records, write_jsonl
from halos_core.train import _release, run
from halos_core.training import Trainer, load_examples

from .conftest import make_config, read_jsonl

# 4 + 3 optimizer steps; warmup (5 global steps) straddles the round boundary, so round 2 must pick
# the schedule up at global step 4 (not restart it); weight decay and clipping are in play.
HP = dict(lr=2e-3, batch_size=8, microbatch_size=4, warmup_steps=5, weight_decay=0.01, max_grad_norm=0.5, seed=3)


class Consecutive:
    """The rounds' loaders one after the other: the duck type `Trainer.train()` consumes."""

    def __init__(self, *parts: TrainLoader):
        self.parts = parts
        self.total_steps = sum(p.total_steps for p in parts)
        self.steps_per_epoch = self.total_steps  # only feeds the "epoch" metric / trainer_state

    def microbatches(self, step: int):
        for part in self.parts:
            if step < part.total_steps:
                return part.microbatches(step)
            step -= part.total_steps
        raise IndexError(step)


def _steps(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_jsonl(RunDir(run_dir).metrics_jsonl) if m.get("split") != "eval"}


def test_round_two_from_round_one_equals_one_continuous_trainer(tmp_path, tiny_model_dir, tiny_sha):
    d1 = write_jsonl(pairwise_records(32, seed=11), tmp_path / "d1.jsonl")
    d2 = write_jsonl(pairwise_records(24, seed=12), tmp_path / "d2.jsonl")  # same prompt ids, other pairs

    # ---- the chain, as the server runs it: round 2 = init_from round 1's final + its counters
    r1 = run(make_config(tmp_path / "r1", tiny_model_dir, tiny_sha, d1, job_id="r1", **HP))
    assert (r1.step, r1.round_step, r1.examples) == (4, 4, 32)
    cfg2 = make_config(
        tmp_path / "r2",
        tiny_model_dir,
        tiny_sha,
        d2,
        job_id="r2",
        init_from=str(r1.final_dir),
        counters={"step": r1.step, "examples": r1.examples},
        **HP,
    )
    r2 = run(cfg2)
    assert (r2.step, r2.round_step, r2.examples) == (7, 3, 56)
    assert r2.result.restored.optimizer_step == 4 and r2.result.restored.scheduler_last_epoch == 4

    # ---- the baseline: one trainer, D1's batches then D2's, one optimizer and schedule throughout
    cfg = make_config(tmp_path / "one", tiny_model_dir, tiny_sha, d1, job_id="one", **HP)
    trainer = Trainer.from_config(cfg)
    try:
        first = trainer.train_loader
        second = TrainLoader(
            load_examples(cfg2, "paired").train,
            first.batcher,
            batch_size=first.batch_size,
            microbatch_size=first.microbatch_size,
            n_epochs=1,
            seed=HP["seed"],
        )
        trainer.train_loader = Consecutive(first, second)
        assert (first.total_steps, second.total_steps) == (4, 3)
        one = trainer.train()
    finally:
        _release(trainer)
    assert one.step == 7 and one.examples == 56

    # ---- same per-step losses / lr at every global step (round 2's steps are 5..7)
    chain = {**_steps(tmp_path / "r1"), **_steps(tmp_path / "r2")}
    base = _steps(tmp_path / "one")
    assert sorted(chain) == sorted(base) == list(range(1, 8))
    for s in base:
        for key in ("loss", "lr", "grad_norm", "examples", "rewards/chosen", "rewards/rejected"):
            assert chain[s][key] == base[s][key], (s, key, chain[s][key], base[s][key])
    assert [base[s]["lr"] for s in range(1, 8)] == pytest.approx([2e-3 * min(1, k / 5) for k in range(1, 8)])

    # ---- same final weights (bit for bit)
    wc = load_file(str(Path(r2.final_dir) / "model.safetensors"))
    wb = load_file(str(Path(one.final_dir) / "model.safetensors"))
    assert wc.keys() == wb.keys()
    w1 = load_file(str(Path(r1.final_dir) / "model.safetensors"))
    assert any(not torch.equal(w1[k], wc[k]) for k in wc)  # round 2 did train
    diff = max((wc[k] - wb[k]).abs().max().item() for k in wc)
    assert all(torch.equal(wc[k], wb[k]) for k in wc), f"max |Δw| = {diff:.3e}"

    # ---- same Adam state (moments, step counts) and the same scheduler position / lr
    oc = load_checkpoint(r2.final_dir).optimizer_state
    ob = load_checkpoint(one.final_dir).optimizer_state
    assert oc["state"].keys() == ob["state"].keys() and len(oc["state"]) > 0
    for idx in ob["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(oc["state"][idx][key], ob["state"][idx][key]), (idx, key)
        assert int(ob["state"][idx]["step"]) == 7
    strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]
    assert strip(oc["param_groups"]) == strip(ob["param_groups"])
    sc = torch.load(Path(r2.final_dir) / "scheduler.pt", weights_only=True)
    sb = torch.load(Path(one.final_dir) / "scheduler.pt", weights_only=True)
    assert sc["last_epoch"] == sb["last_epoch"] == 7 and sc["_last_lr"] == sb["_last_lr"]

"""Multi-process eval: every rank runs the same number of eval forwards and joins the metric
reduction, whatever its share of the eval set (a rank with no eval example, or with fewer
microbatches than another, used to skip the all-reduce / the FSDP all-gathers and hang).
The eval metrics equal the 1-process eval."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from halos_core.data.loaders import Batcher, EvalLoader
from halos_core.data.tokenize import ChatEncoder
from halos_core.metrics import MetricAccumulator
from halos_core.run_dir import RunDir
from halos_core.synthetic import pairwise_records, write_jsonl

from .conftest import make_config
from .test_data import _examples


def test_eval_loader_pads_every_rank_to_the_same_count(tiny_tokenizer):
    enc = ChatEncoder(tiny_tokenizer, 64, 32)
    for n, mb, procs in [(1, 4, 2), (9, 4, 2), (5, 2, 3), (8, 4, 2)]:
        exs = _examples(n)
        counts, weights = set(), 0.0
        for r in range(procs):
            loader = EvalLoader(exs, Batcher(enc, "paired"), microbatch_size=mb, num_processes=procs, process_index=r)
            batches = list(loader.padded())
            counts.add(len(batches))
            weights += sum(w * b.size for b, w in batches)
        assert len(counts) == 1, (n, mb, procs, counts)
        assert weights == n


def test_reduce_runs_the_collective_over_the_given_names():
    calls = []

    def all_reduce(t):
        calls.append(t.shape)
        return t

    empty = MetricAccumulator()
    assert empty.reduce(all_reduce, names=["loss"]) == {}
    assert calls == [(1, 2)]
    acc = MetricAccumulator()
    acc.add_values({"chosen_rewards": torch.tensor([1.0, 2.0])}, 2, weight=0.0)
    assert acc.reduce(all_reduce, names=["loss", "rewards/chosen"]) == {}


def _launch(rd, procs, fsdp):
    from .test_fsdp import launch

    try:
        proc = launch(rd, procs, fsdp=fsdp, timeout=150)
    except subprocess.TimeoutExpired:  # the bug: a rank waits in a collective forever
        pytest.fail(f"{procs}-process {'FSDP' if fsdp else 'DDP'} run hung (eval)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(rd.result_json.read_text())["eval"]


@pytest.mark.e2e
@pytest.mark.parametrize("n_eval,fsdp", [(1, False), (9, True)], ids=["ddp-1-eval-record", "fsdp-9-eval-mb4"])
def test_multiprocess_eval_finishes_and_matches_one_process(tmp_path, tiny_model_dir, tiny_sha, n_eval, fsdp):
    records = pairwise_records(8 + n_eval, seed=0)
    for r in records[:n_eval]:
        r["split"] = "test"
    feedback = write_jsonl(records, tmp_path / "p.jsonl")
    evals = {}
    for procs in (1, 2):
        rd = RunDir(tmp_path / f"p{procs}").create()
        rd.write_config(make_config(rd.path, tiny_model_dir, tiny_sha, feedback, job_id=f"p{procs}"))
        evals[procs] = _launch(rd, procs, fsdp=fsdp and procs == 2)
    one, two = evals[1], evals[2]
    assert one["n"] == two["n"] == n_eval
    assert one.keys() == two.keys() and "loss" in one and "rewards/accuracy" in one
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key

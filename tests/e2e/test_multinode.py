"""Multi-node rounds with real processes on one machine: two `halos worker` processes (concurrency
1 each) are the two "nodes" of a `hyperparams.nodes: 2` round; each claims its own member of the
gang and runs `accelerate launch` with the c10d rendezvous (torchrun, CPU/gloo, one rank per node)
in the shared run directory. `halos serve --no-worker` (SQLite + the embedded broker) is the API.

- A 2-node round equals a 1-node round with the same global batch (batch 8 = 2 nodes x 1 rank x
  microbatch 4, against 1 rank x microbatch 4 x accumulation 2): the same per-step losses and
  final weights/Adam state within the tolerance of the 2-rank test (tests/halos_core/test_train_cli.py).
- SIGKILL of node 1's trainer after the first checkpoint fails the attempt for both nodes; the
  retry (2 nodes again) resumes from that checkpoint and succeeds; no process of the first
  attempt is left; every checkpoint directory is written once; the result still equals the 1-node
  round.
"""

from __future__ import annotations

import json
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlmodel import Session, col, select

from halos_core.run_dir import RunDir, read_manifest
from halos_core.synthetic import pairwise_records, to_jsonl_bytes
from server.db import make_engine
from server.models import Attempt, Event, GangMember
from tests.e2e.conftest import Deployment, wait_for_job
from tests.worker.support import wait_for
from worker.monitor import ENV_ATTEMPT, ENV_JOB, ENV_NODE
from worker.watchdog import proc_stat, read_environ

pytestmark = pytest.mark.e2e

STEPS = 12
EVERY = 3
HYPERPARAMS = {
    "lr": 1e-3,
    "batch_size": 8,
    "microbatch_size": 4,
    "warmup_steps": 2,
    "max_length": 64,
    "max_prompt_length": 32,
    "checkpoint_every": EVERY,
    "seed": 1,
}
ENV = {
    "HALOS_USE_CPU": "true",
    "HALOS_MAX_NODES": "2",
    "HALOS_NODE_ADDRESS": "127.0.0.1",  # both "nodes" are on this machine
    "HALOS_LEASE_TTL_S": "6",
    "HALOS_HEARTBEAT_INTERVAL_S": "0.5",
    "HALOS_SWEEP_INTERVAL_S": "0.5",
    "HALOS_KILL_GRACE_S": "2",
    "HALOS_RETRY_BACKOFF_S": "0.2",
    "HALOS_REPUBLISH_AFTER_S": "2",
    "HALOS_MAX_ATTEMPTS": "3",
    # a round takes ~15 s here: a hung attempt is retried, a gang that cannot form released, well
    # within the test's wait (test_two_node_round_equals_one_node_round)
    "HALOS_STALL_TIMEOUT_S": "90",
    "HALOS_GANG_FORM_TIMEOUT_S": "60",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class Cluster:
    def __init__(self, dep: Deployment):
        self.dep = dep
        self.client = dep.client()
        self.engine = make_engine(f"sqlite:///{(dep.data_dir / 'halos.db').resolve()}")

    def round(self, model_id: str, feedback_id: str, nodes: int) -> dict:
        run = self.client.post(
            "/v1/runs",
            json={
                "model_id": model_id,
                "loss": {"name": "dpo", "beta": 0.1},
                "hyperparams": {**HYPERPARAMS, "nodes": nodes},
            },
        )
        assert run.status_code == 201, run.text
        rnd = self.client.post(f"/v1/runs/{run.json()['id']}/rounds", json={"feedback_ids": [feedback_id]})
        assert rnd.status_code == 201, rnd.text
        return rnd.json()

    def members(self, job_id: str) -> list[GangMember]:
        with Session(self.engine) as s:
            return list(
                s.exec(
                    select(GangMember)
                    .where(GangMember.job_id == job_id)
                    .order_by(col(GangMember.attempt), col(GangMember.rank))
                ).all()
            )

    def attempts(self, job_id: str) -> list[Attempt]:
        with Session(self.engine) as s:
            return list(s.exec(select(Attempt).where(Attempt.job_id == job_id).order_by(col(Attempt.attempt))).all())

    def wait(self, job_id: str, timeout: float = 300) -> dict:
        """The finished job; past `timeout` (a CPU round takes ~15 s) an assertion carrying what
        every process wrote (API, both workers, both nodes' trainers) and the job's events."""
        try:
            return wait_for_job(self.client, job_id, timeout=timeout)
        except AssertionError as exc:
            run = RunDir(self.dep.data_dir / "runs" / job_id)
            nodes = "\n".join(
                f"--- node {r}\n{run.node_log(r).read_text()[-6000:]}" for r in (0, 1) if run.node_log(r).is_file()
            )
            with Session(self.engine) as s:
                events = [(e.type, e.attempt, e.data) for e in s.exec(select(Event).where(Event.job_id == job_id))]
            raise AssertionError(f"{exc}\nevents: {events}\n{self.dep.logs()}\n{nodes}") from None

    def checkpoint_events(self, job_id: str) -> list[Event]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.exec(select(Event).where(Event.job_id == job_id, Event.type == "job.checkpoint_saved")).all())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir) -> Iterator[tuple[Cluster, str, str]]:
    data = tmp_path_factory.mktemp("multinode") / "data"
    dep = Deployment(data, ENV)
    dep.halos("migrate")
    dep.key = dep.halos("keys", "create", "--project", "multinode").strip()
    dep.spawn("serve", "--no-worker", "--port", str(dep.port), log_name="api.log")
    for i in range(2):
        dep.spawn("worker", "--concurrency", "1", log_name=f"worker{i}.log")
    try:
        dep.wait_ready()
        c = Cluster(dep)
        model = c.client.post("/v1/models", json={"name": "tiny", "path": str(tiny_model_dir)})
        assert model.status_code == 201, model.text
        body = to_jsonl_bytes(pairwise_records(STEPS * HYPERPARAMS["batch_size"], seed=3))
        fb = c.client.post("/v1/feedback", files={"file": ("fb.jsonl", body)}, data={"kind": "pairwise"})
        assert fb.status_code == 201, fb.text
        yield c, model.json()["id"], fb.json()["id"]
    finally:
        dep.stop()


@pytest.fixture(scope="module")
def one_node(cluster) -> RunDir:
    c, model_id, fb_id = cluster
    rnd = c.round(model_id, fb_id, nodes=1)
    job = c.wait(rnd["job_id"])
    assert job["status"] == "succeeded", (job, c.dep.logs())
    assert c.members(rnd["job_id"]) == []
    return RunDir(c.dep.data_dir / "runs" / rnd["job_id"])


def _train_lines(rd: RunDir) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for m in rd.read_metrics()[0]:
        if m.get("split") != "eval":
            out[m["step"]] = m  # after a resume the log repeats steps: the later line wins
    return out


def _assert_same_training(one: RunDir, two: RunDir) -> None:
    a, b = _train_lines(one), _train_lines(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        x, y = a[step], b[step]
        assert x["examples"] == y["examples"] and x["lr"] == y["lr"]
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margin"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (step, key)
    wa, wb = load_file(str(one.final / "model.safetensors")), load_file(str(two.final / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)
    oa = torch.load(one.final / "optimizer.pt", weights_only=True)
    ob = torch.load(two.final / "optimizer.pt", weights_only=True)
    for idx in oa["state"]:
        assert torch.equal(oa["state"][idx]["step"], ob["state"][idx]["step"])
        torch.testing.assert_close(ob["state"][idx]["exp_avg"], oa["state"][idx]["exp_avg"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            ob["state"][idx]["exp_avg_sq"], oa["state"][idx]["exp_avg_sq"], rtol=1e-4, atol=1e-10
        )


def _assert_written_once(checkpoint: Path) -> None:
    """One complete checkpoint of the 2-rank world: every file matches its manifest, written by
    the process group's rank 0 (with each rank's RNG state), not once per node."""
    read_manifest(checkpoint)
    assert (checkpoint / "rng.pt").is_file() and (checkpoint / "rng-rank1.pt").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_processes"] == 2
    if checkpoint.parent.name == "checkpoints":  # no temporary or partial directory beside it
        assert all(p.name.startswith("step-") for p in checkpoint.parent.iterdir())


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _live(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _processes(job_id: str, attempt: int, node: str | None = None) -> set[int]:
    """Live processes carrying the attempt's markers (launchers and ranks), of one node or all."""
    found = set()
    for pid in _pids():
        env = read_environ(pid)
        if env.get(ENV_JOB) != job_id or env.get(ENV_ATTEMPT) != str(attempt):
            continue
        if node is not None and env.get(ENV_NODE) != node:
            continue
        if _live(pid):
            found.add(pid)
    return found


def _ranks(pids: set[int]) -> set[int]:
    """The trainer processes among them (torchrun sets RANK in its workers' environment only)."""
    return {p for p in pids if "TORCHELASTIC_RUN_ID" in read_environ(p, prefix=b"")}


def test_two_node_round_equals_one_node_round(cluster, one_node):
    c, model_id, fb_id = cluster
    rnd = c.round(model_id, fb_id, nodes=2)
    job_id = rnd["job_id"]
    job = c.wait(job_id)
    assert job["status"] == "succeeded", (job, c.dep.logs())
    two = RunDir(c.dep.data_dir / "runs" / job_id)
    _assert_same_training(one_node, two)

    # One attempt is what a 2-node round needs. Once (CI, 2026-12-07) one did not finish in 10
    # minutes, cause unknown (the logs were not kept; `Cluster.wait` prints them now). Should that
    # recur, only the product's own recoveries may bring the round through, and the test says so:
    # a trainer that stops making progress is stopped and retried (HALOS_STALL_TIMEOUT_S), a gang
    # that does not form is released (HALOS_GANG_FORM_TIMEOUT_S); no other end of an attempt passes.
    attempts = c.attempts(job_id)
    assert attempts[-1].outcome == "succeeded"
    for a in attempts[:-1]:
        assert a.outcome == "released" or "no progress" in (a.error or ""), (a.outcome, a.error, c.dep.logs())
    if len(attempts) > 1:
        warnings.warn(
            f"2-node round {job_id} took {len(attempts)} attempts: {[(a.outcome, a.error) for a in attempts]}"
            f"\n{c.dep.logs()}",
            stacklevel=1,
        )
    last = attempts[-1].attempt

    # two separate worker processes claimed one member each, with their own leases
    members = [m for m in c.members(job_id) if m.attempt == last]
    assert [m.rank for m in members] == [0, 1]
    assert members[0].pid != members[1].pid and members[0].token != members[1].token
    assert {m.outcome for m in members} <= {"succeeded", "done", "lost"}
    # each node ran `accelerate launch` with the c10d rendezvous; one world of 2 ranks
    for rank in (0, 1):
        conf = two.node_accelerate_yaml(rank).read_text()
        assert "rdzv_backend: c10d" in conf and f"machine_rank: {rank}" in conf and "num_machines: 2" in conf
    assert "node 1/2" in two.node_log(1).read_text()
    _assert_written_once(two.final)
    saved = [e.data["step"] for e in c.checkpoint_events(job_id)]
    # every checkpoint reported once, by node 0 only (from the trainer's checkpoint log: the first
    # is pruned during the round and still has its event)
    assert sorted(saved) == list(range(EVERY, STEPS, EVERY)), saved


@pytest.mark.skipif(
    os.environ.get("HALOS_RUN_MULTINODE_KILL") != "1",
    reason="two 2-node attempts of CPU training: set HALOS_RUN_MULTINODE_KILL=1",
)
def test_killing_one_node_fails_the_attempt_for_both_and_the_retry_resumes(cluster, one_node):
    c, model_id, fb_id = cluster
    rnd = c.round(model_id, fb_id, nodes=2)
    job_id = rnd["job_id"]
    rd = RunDir(c.dep.data_dir / "runs" / job_id)
    wait_for(
        lambda: rd.checkpoints.is_dir() and rd.complete_checkpoints(verify=False), 600, 0.05, "the first checkpoint"
    )
    first = rd.complete_checkpoints(verify=False)[-1]
    seen = first.step
    _assert_written_once(first.path)
    victims = _ranks(_processes(job_id, 1, node="1"))
    assert victims, "node 1's trainer is not running"
    attempt1 = _processes(job_id, 1)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)

    job = c.wait(job_id)
    assert job["status"] == "succeeded", (job, c.dep.logs())
    attempts = c.attempts(job_id)
    assert [a.outcome for a in attempts] == ["crashed", "succeeded"], [(a.outcome, a.error) for a in attempts]
    assert attempts[0].ended_at <= attempts[1].started_at  # the attempts never overlap
    assert attempts[1].resumed_from_step is not None and attempts[1].resumed_from_step >= seen
    members = c.members(job_id)
    assert [(m.attempt, m.rank) for m in members] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(m.ended_at is not None for m in members if m.attempt == 1)
    # nothing of attempt 1 survives, on either node
    assert not {p for p in attempt1 if _live(p)}
    assert not _processes(job_id, 1)
    _assert_written_once(rd.final)
    saved = [(e.attempt, e.data["step"]) for e in c.checkpoint_events(job_id)]
    assert len(saved) == len(set(saved))  # no checkpoint written (reported) twice by one attempt
    assert max(s for a, s in saved if a == 2) == STEPS - EVERY
    _assert_same_training(one_node, rd)

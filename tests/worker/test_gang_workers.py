"""Multi-node rounds with real worker processes, the short variant (the fake trainer; the real
trainer's equivalence and kill tests are tests/e2e/test_multinode.py): two `halos worker`
processes (concurrency 1, embedded SQLite broker) are the two nodes of a `nodes: 2` round, each
launching the fake trainer through the real `accelerate launch` with the c10d rendezvous (one
rank per node; only the global rank 0 trains, tests/worker/fake_trainer.py).

SIGKILL of node 1's ranks after a checkpoint: the attempt fails for both nodes, the retry (two
nodes again, not overlapping the first) resumes from the checkpoint and succeeds, and nothing of
the first attempt is left on either node.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import update
from sqlmodel import col, select

from halos_core.run_dir import RunDir
from server import jobs, queue
from server.models import GangMember, Job, JobStatus
from tests.worker.conftest import Env
from tests.worker.support import (
    TERMINAL,
    WorkerProc,
    add_round,
    attempts,
    overlapping_attempts,
    reload,
    trainer_starts,
    wait_for,
    wait_status,
)
from worker.monitor import ENV_ATTEMPT, ENV_JOB, ENV_NODE
from worker.watchdog import proc_stat, read_environ

pytestmark = pytest.mark.e2e


def _gang_job(env: Env, fake: dict) -> Job:
    job = add_round(env.session, env.run, env.root, fake, submit=False)
    spec = dict(job.spec)
    spec["hyperparams"] = {**spec["hyperparams"], "batch_size": 2, "nodes": 2}  # 1 example per rank
    env.session.exec(update(Job).where(col(Job.id) == job.id).values(spec=spec))
    env.session.commit()
    return jobs.submit(env.session, reload(env.session, job.id), max_attempts=3)


def _live(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _processes(job_id: str, attempt: int, node: str | None = None) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        env = read_environ(int(name))
        if env.get(ENV_JOB) == job_id and env.get(ENV_ATTEMPT) == str(attempt) and _live(int(name)):
            if node is None or env.get(ENV_NODE) == node:
                found.add(int(name))
    return found


@pytest.mark.parametrize("victim", ["rank", "worker"])
def test_two_worker_processes_run_a_two_node_round_and_recover_from_a_killed_node(tmp_path_factory, victim):
    """victim `rank`: node 1's trainer dies (its worker finishes the attempt as crashed); `worker`:
    node 1's worker dies (its watchdog stops its trainer; the sweeper crashes the attempt when
    node 1's own lease expires) and a replacement worker is started for the retry."""
    env = Env(tmp_path_factory.mktemp("gang"), lease_ttl_s=6.0)
    extra = {"HALOS_NODE_ADDRESS": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    workers = [WorkerProc(env.settings, env.root / f"worker{i}.log", extra_env=extra).wait_ready() for i in range(2)]
    try:
        s = env.session
        job = _gang_job(env, {"steps": 40, "sleep": 0.25, "checkpoint_every": 4})
        queue.publish(job.id, env.settings)
        rd = RunDir(env.settings.runs_dir / job.id)
        wait_for(lambda: rd.checkpoints.is_dir() and rd.complete_checkpoints(verify=False), 120, what="a checkpoint")
        seen = rd.complete_checkpoints(verify=False)[-1].step
        members = s.exec(select(GangMember).where(GangMember.job_id == job.id)).all()
        s.commit()
        assert sorted(m.rank for m in members) == [0, 1] and len({m.pid for m in members}) == 2
        assert {m.pid for m in members} == {w.pid for w in workers}  # one node per worker process
        node1 = {p for p in _processes(job.id, 1, node="1") if "TORCHELASTIC_RUN_ID" in read_environ(p, prefix=b"")}
        assert node1, "node 1's rank is not running"
        attempt1 = _processes(job.id, 1)
        t0 = time.monotonic()
        if victim == "rank":
            for pid in node1:
                os.kill(pid, signal.SIGKILL)
        else:
            node1_worker = next(w for w in workers if w.pid == next(m.pid for m in members if m.rank == 1))
            node1_worker.kill()
            workers.append(WorkerProc(env.settings, env.root / "worker2.log", extra_env=extra).wait_ready())

        j = wait_status(s, job.id, TERMINAL, 180)
        assert j.status == JobStatus.succeeded, (j.error, *(w.log_tail() for w in workers))
        rows = attempts(s, job.id)
        assert [a.outcome for a in rows] == ["crashed", "succeeded"], [(a.outcome, a.error) for a in rows]
        if victim == "worker":
            assert "node 1 of 2" in rows[0].error and "lost its lease" in rows[0].error
        assert overlapping_attempts(rows) == 0
        assert rows[1].resumed_from_step is not None and rows[1].resumed_from_step >= seen
        starts = trainer_starts(rd.path)
        first = [st for st in starts if st["rank"] == 0]
        assert [st["attempt"] for st in first] == ["1", "2"] and first[1]["resume_round_step"] >= seen
        # no process of attempt 1 (either node) was alive when attempt 2's rank 0 started
        attempt1_pids = {st["pid"] for st in starts if st["attempt"] == "1"}
        assert not attempt1_pids & set(first[1]["overlap"])
        members = s.exec(
            select(GangMember)
            .where(GangMember.job_id == job.id)
            .order_by(col(GangMember.attempt), col(GangMember.rank))
            .execution_options(populate_existing=True)
        ).all()
        s.commit()
        assert [(m.attempt, m.rank) for m in members] == [(1, 0), (1, 1), (2, 0), (2, 1)]
        assert all(m.ended_at is not None for m in members if m.attempt == 1)

        def all_ended() -> bool:  # node 1 of attempt 2 leaves once its (sleeping) rank is done
            rows = s.exec(select(GangMember.ended_at).where(GangMember.job_id == job.id)).all()
            s.commit()
            return all(e is not None for e in rows)

        wait_for(all_ended, 30, what="every member ended")
        assert not {p for p in attempt1 if _live(p)} and not _processes(job.id, 1)
        print(f"\n[gang node kill: {victim}] recovered in {time.monotonic() - t0:.1f}s, resumed from step {seen}")
    finally:
        for w in workers:
            w.stop()
        env.close()

"""The runner in-process (real `accelerate launch` + fake trainer, no Celery): self-fencing, the
exit-code table, the accelerate config, resume selection, orphan detection."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import update
from sqlmodel import col, select

from halos_core.round_result import RoundResult
from halos_core.run_dir import RunDir, write_manifest
from server import jobs
from server.models import Event, Job
from server.settings import Settings
from tests.worker.conftest import Env
from tests.worker.support import REPO, add_round, pid_alive, settings_env, trainer_starts, wait_for
from worker import exit_codes, launch, runner
from worker.monitor import ENV_DB, ENV_JOB, ENV_RUNNER, db_identity, find_orphans, reap_orphans
from worker.watchdog import group_alive


def _start(env: Env, fake: dict, **hp):
    job = add_round(env.session, env.run, env.root, fake)
    if hp:  # what the API would have required of the round for this worker's num_processes
        spec = {**job.spec, "hyperparams": {**job.spec["hyperparams"], **hp}}
        env.session.exec(update(Job).where(Job.id == job.id).values(spec=spec))
        env.session.commit()
    claim = jobs.claim(
        env.session, job.id, "test-host", 1, env.settings.lease_ttl_s, run_dir=str(env.settings.runs_dir / job.id)
    )
    box: dict = {}
    stop = threading.Event()
    thread = threading.Thread(target=lambda: box.setdefault("report", runner.run_job(claim, env.settings, stop)))
    thread.start()
    run_dir = env.settings.runs_dir / job.id
    wait_for(lambda: trainer_starts(run_dir), 60, what="trainer start")
    return job, claim, thread, box, stop, trainer_starts(run_dir)[0]


@pytest.fixture
def env(make_env, monkeypatch):
    e = make_env("runner")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the launched fake trainer is under tests/
    return e


def test_self_fencing_when_the_lease_is_stolen(env):
    job, claim, thread, box, _, start = _start(env, {"steps": 400, "sleep": 0.1})
    t0 = time.monotonic()
    env.session.exec(update(Job).where(Job.id == job.id).values(lease_token="someone-else"))
    env.session.commit()
    wait_for(lambda: not group_alive(start["pgid"]), 10, interval=0.05, what="trainer group killed")
    fenced = time.monotonic() - t0
    thread.join(10)
    assert box["report"].action == "lost" and "lease lost" in box["report"].detail
    assert fenced <= env.settings.heartbeat_interval_s + 1.5
    print(f"\n[self-fencing] lease stolen -> trainer group gone in {fenced:.2f}s")


def test_self_fencing_when_the_database_is_unreachable(env, monkeypatch):
    job, claim, thread, box, _, start = _start(env, {"steps": 400, "sleep": 0.1})
    t0 = time.monotonic()

    def broken(*a, **kw):
        raise RuntimeError("database unreachable")

    monkeypatch.setattr("worker.monitor.jobs.heartbeat", broken)
    wait_for(lambda: not group_alive(start["pgid"]), 15, interval=0.05, what="trainer group killed")
    fenced = time.monotonic() - t0
    thread.join(10)
    assert box["report"].action == "lost" and "no successful heartbeat" in box["report"].detail
    assert fenced < env.settings.lease_ttl_s  # before the sweeper may hand the job to someone else
    print(f"\n[self-fencing] DB unreachable -> trainer group gone in {fenced:.2f}s (lease {env.settings.lease_ttl_s}s)")


def test_multi_process_launch_ranks_in_their_own_sessions_are_fenced(make_env, monkeypatch):
    """Trap 3, worse: torch.distributed.run starts every rank with start_new_session=True, so a
    SIGKILL to the launcher's process group would leave the ranks running. The monitor kills by
    the attempt's environment markers as well."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    env = make_env("ranks", num_processes=2, use_cpu=True)
    job, claim, thread, box, _, _ = _start(env, {"steps": 400, "sleep": 0.1}, batch_size=2)
    run_dir = env.settings.runs_dir / job.id
    ranks = wait_for(lambda: (st := trainer_starts(run_dir)) and len(st) >= 2 and st, 60, what="two ranks")
    assert {r["rank"] for r in ranks} == {0, 1}
    assert all(r["sid"] == r["pid"] for r in ranks)  # each rank leads its own session
    t0 = time.monotonic()
    env.session.exec(update(Job).where(Job.id == job.id).values(lease_token="someone-else"))
    env.session.commit()
    wait_for(lambda: not any(pid_alive(r["pid"]) for r in ranks), 10, interval=0.05, what="all ranks killed")
    fenced = time.monotonic() - t0
    thread.join(10)
    assert box["report"].action == "lost"
    assert find_orphans(env.settings) == {}
    print(f"\n[self-fencing, 2 ranks via torchrun] all ranks gone in {fenced:.2f}s")


def test_warm_shutdown_event_releases(env):
    job, claim, thread, box, stop, start = _start(env, {"steps": 400, "sleep": 0.1})
    stop.set()
    thread.join(env.settings.kill_grace_s + 10)
    assert box["report"].action == "released"
    assert not group_alive(start["pgid"])
    j = jobs.get(env.session, job.id)
    assert j.status.value == "queued" and j.attempt == 1


def test_resume_picks_the_latest_complete_checkpoint_and_cleans_partials(env):
    job = add_round(env.session, env.run, env.root, {"steps": 8, "sleep": 0.01})
    rd = RunDir(env.settings.runs_dir / job.id).create()
    for step in (2, 4):
        d = rd.checkpoint_path(step)
        d.mkdir()
        (d / "w").write_text(str(step))
        write_manifest(d, step, step, round_step=step)
    partial = rd.checkpoint_path(6)
    partial.mkdir()
    (partial / "w").write_text("half")  # no meta.json: never selected, removed
    corrupt = rd.checkpoint_path(7)
    corrupt.mkdir()
    (corrupt / "w").write_text("x")
    write_manifest(corrupt, 7, 7)
    (corrupt / "w").write_text("tampered")
    jobs.claim(env.session, job.id, "h", 1, 30)
    jobs.finish(
        env.session,
        job.id,
        jobs.get(env.session, job.id).lease_token,
        jobs.Outcome("crashed", error="test"),
        retry_backoff_s=0,
    )
    claim = jobs.claim(env.session, job.id, "h", 1, 30, run_dir=str(rd.path))
    assert claim.attempt == 2
    report = runner.run_job(claim, env.settings, threading.Event())
    assert report.outcome.status == "succeeded", report.outcome.error
    assert not (partial / "w").exists() and not corrupt.exists()  # (step 6 was then rewritten by the trainer)
    starts = trainer_starts(rd.path)
    assert starts[0]["resume_round_step"] == 4 and starts[0]["resume_from"].endswith("step-000004")
    assert json.loads(rd.run_json.read_text())["resume_from"].endswith("step-000004")
    # the checkpoint it resumed from has its event (its writer may have died before logging it)
    env.session.expire_all()
    saved = env.session.exec(select(Event).where(Event.job_id == job.id, Event.type == "job.checkpoint_saved")).all()
    assert sorted(e.data["step"] for e in saved) == [4, 6]


def test_every_checkpoint_gets_its_event_even_when_pruned_before_the_next_poll(env):
    """The trainer logs each complete checkpoint (checkpoints.jsonl) before pruning; the monitor
    reports from that log, so a checkpoint written and pruned again between two polls (here every
    step, well inside one heartbeat interval) is reported like the others, once each."""
    job = add_round(env.session, env.run, env.root, {"steps": 12, "sleep": 0.01, "checkpoint_every": 1, "keep_last": 1})
    claim = jobs.claim(env.session, job.id, "h", 1, 30, run_dir=str(env.settings.runs_dir / job.id))
    report = runner.run_job(claim, env.settings, threading.Event())
    assert report.outcome.status == "succeeded", report.outcome.error
    rd = RunDir(env.settings.runs_dir / job.id)
    assert [m.step for m in rd.complete_checkpoints(verify=False)] == [11]  # the others were pruned
    env.session.expire_all()
    events = env.session.exec(
        select(Event).where(Event.job_id == job.id, Event.type == "job.checkpoint_saved").order_by(col(Event.id))
    ).all()
    assert [(e.data["step"], e.data["name"]) for e in events] == [(s, f"step-{s:06d}") for s in range(1, 12)]


def test_a_trainer_that_stops_making_progress_is_stopped_and_retried(make_env, monkeypatch):
    """A hung trainer (alive, writing nothing: e.g. a rank waiting in a collective for a peer that
    is gone) would hold its job `running` for ever while the worker keeps the lease alive. After
    `stall_timeout_s` without a byte of output, metrics or checkpoints its group is stopped and the
    attempt crashes (retried, from its last checkpoint); a trainer that keeps writing is left alone."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    env = make_env("stall", stall_timeout_s=3.0, kill_grace_s=1.0)
    job, claim, thread, box, _, start = _start(env, {"steps": 40, "sleep": 0.3, "mode": "hang", "at": 6})
    t0 = time.monotonic()
    thread.join(60)
    assert not thread.is_alive()
    report = box["report"]
    assert report.action == "finish" and report.outcome.status == "crashed", report
    assert "no progress for 3s" in report.outcome.error
    assert report.group_gone and not group_alive(start["pgid"])
    # 5 steps of 0.3 s (each well within the limit), then 3 s of silence, a poll, a 1 s grace
    assert 3.0 <= time.monotonic() - t0 <= 20
    j = jobs.finish(env.session, job.id, claim.lease_token, report.outcome, retry_backoff_s=0)
    assert j.status.value == "queued" and "no progress" in (j.error or "")  # queued again for the retry


def test_invalid_spec_fails_without_launching(env):
    job = add_round(env.session, env.run, env.root, {})
    spec = dict(job.spec)
    spec["loss"] = {"name": "nope"}
    env.session.exec(update(Job).where(Job.id == job.id).values(spec=spec))
    env.session.commit()
    claim = jobs.claim(env.session, job.id, "h", 1, 30)
    report = runner.run_job(claim, env.settings, threading.Event())
    assert report.outcome.status == "failed" and report.outcome.error.startswith("invalid job spec")


def test_previous_attempts_complete_result_is_reported_not_retrained(env):
    job = add_round(env.session, env.run, env.root, {"steps": 2, "sleep": 0.01})
    claim = jobs.claim(env.session, job.id, "h", 1, 30, run_dir=str(env.settings.runs_dir / job.id))
    report = runner.run_job(claim, env.settings, threading.Event())
    assert report.outcome.status == "succeeded"
    # the worker died before `finish`: the lease expires and attempt 2 finds the result
    jobs.finish(env.session, job.id, claim.lease_token, jobs.Outcome("crashed", error="lost"), retry_backoff_s=0)
    claim2 = jobs.claim(env.session, job.id, "h", 1, 30, run_dir=claim.run_dir)
    report2 = runner.run_job(claim2, env.settings, threading.Event())
    assert report2.outcome.status == "succeeded" and len(trainer_starts(Path(claim.run_dir))) == 1


def test_a_round_that_no_longer_fits_the_disk_fails_before_the_launch(env, monkeypatch):
    """Issue 12: the worker asks the storage admission again right before the launch (the disk may
    have filled since the submit): the round fails with the figures and no trainer starts."""
    from server.storage_lifecycle import files

    job = add_round(env.session, env.run, env.root, {"steps": 4})
    claim = jobs.claim(
        env.session, job.id, "test-host", 1, env.settings.lease_ttl_s, run_dir=str(env.settings.runs_dir / job.id)
    )
    monkeypatch.setattr(files, "free_bytes", lambda path: env.settings.storage_reserve_bytes - 1)  # under the reserve
    report = runner.run_job(claim, env.settings, threading.Event())
    assert report.outcome.status == "failed" and report.outcome.error.startswith("insufficient storage")
    assert trainer_starts(env.settings.runs_dir / job.id) == []


# --------------------------------------------------------------------------- pure functions


def test_enospc_fails_with_the_reason(tmp_path: Path):
    rd = RunDir(tmp_path / "r").create()
    rd.stdout_log.write_text(
        "Traceback (most recent call last):\n  File x\nOSError: [Errno 28] No space left on device\n"
    )
    outcome = exit_codes.classify(1, rd)
    assert outcome.status == "failed" and outcome.error.startswith("out of disk space on the data dir")
    assert "OSError: [Errno 28]" in outcome.error


def test_exit_code_table(tmp_path: Path):
    rd = RunDir(tmp_path / "r").create()
    assert exit_codes.classify(0, rd).status == "crashed"  # no result.json
    # the trainer itself killed (one process, no launcher) reads like a rank killed under the launcher
    assert exit_codes.classify(-9, rd).error == "a training process was killed by SIGKILL (out of memory?)"
    assert exit_codes.classify(-15, rd).error == "a training process was killed by SIGTERM"
    assert exit_codes.classify(3, rd, cancelled=True).status == "cancelled"
    rd.stdout_log.write_text("old attempt: died with <Signals.SIGKILL: 9>.\n")
    offset = rd.stdout_log.stat().st_size
    with open(rd.stdout_log, "a") as fh:
        fh.write(
            "Traceback (most recent call last):\n  File x\nKeyError: 'input_ids'\n"
            "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 1.\n"
        )
    failed = exit_codes.classify(1, rd, log_offset=offset)
    assert failed.status == "failed" and failed.error.startswith("training exited with code 1: KeyError: 'input_ids'")
    with open(rd.stdout_log, "a") as fh:
        fh.write("subprocess.CalledProcessError: Command '[...]' died with <Signals.SIGKILL: 9>.\n")
    assert (
        exit_codes.classify(1, rd, log_offset=offset).error
        == "a training process was killed by SIGKILL (out of memory?)"
    )
    assert exit_codes.rank_signal("  exitcode  : -6 (pid: 1234)") == "SIGABRT"
    # a complete final checkpoint + result.json
    final = rd.final
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"w")
    m = write_manifest(final, 5, 20)
    rd.write_result(
        RoundResult(
            job_id="job_x",
            final_dir=str(final),
            manifest_sha256=m.sha256,
            step=5,
            examples=20,
            round_step=5,
            total_steps=5,
            loss="dpo",
            reference_sha256="r",
        )
    )
    ok = exit_codes.classify(0, rd)
    assert ok.status == "succeeded" and ok.result.manifest_sha256 == m.sha256
    (final / "model.safetensors").write_bytes(b"tampered")
    bad = exit_codes.classify(0, rd)
    assert bad.status == "crashed" and "does not verify" in bad.error


def test_accelerate_config_and_command(tmp_path: Path):
    from server.settings import Settings

    rd = RunDir(tmp_path / "r").create()
    cpu = Settings(data_dir=tmp_path, use_cpu=True)
    assert launch.accelerate_config(cpu)["distributed_type"] == "NO"
    gpu4 = Settings(data_dir=tmp_path, num_processes=4, mixed_precision="bf16")
    cfg = launch.accelerate_config(gpu4, main_process_port=29555)
    assert (cfg["distributed_type"], cfg["num_processes"], cfg["mixed_precision"], cfg["main_process_port"]) == (
        "MULTI_GPU",
        4,
        "bf16",
        29555,
    )
    cpu2 = launch.accelerate_config(Settings(data_dir=tmp_path, num_processes=2, use_cpu=True))
    assert cpu2["distributed_type"] == "MULTI_GPU" and cpu2["use_cpu"] is True  # torchrun ranks + gloo
    assert launch.launch_env(Settings(data_dir=tmp_path, use_cpu=True)) == {"ACCELERATE_USE_CPU": "true"}
    fsdp = launch.accelerate_config(Settings(data_dir=tmp_path, num_processes=2, fsdp=True))
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_config"]["fsdp_version"] == 2 and fsdp["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False
    fsdp_cpu = launch.accelerate_config(Settings(data_dir=tmp_path, num_processes=2, fsdp=True, use_cpu=True))
    assert fsdp_cpu["distributed_type"] == "FSDP" and fsdp_cpu["use_cpu"] is True  # FSDP2 over gloo (the trainer)
    launch.write_accelerate_config(rd, cpu)
    assert yaml.safe_load(rd.accelerate_yaml.read_text())["use_cpu"] is True
    # one process without FSDP: the trainer itself, no `accelerate launch` interpreter in between
    assert launch.command(cpu, rd)[1:] == ["-m", "halos_core.train", "--config", str(rd.run_json)]
    multi = Settings(data_dir=tmp_path, num_processes=2, use_cpu=True)
    fsdp1 = Settings(data_dir=tmp_path, num_processes=1, fsdp=True, use_cpu=True)
    for launched in (multi, fsdp1):  # the launcher starts the ranks / exports the FSDP settings
        assert launch.command(launched, rd)[1:] == [
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(rd.accelerate_yaml),
            "-m",
            "halos_core.train",
            "--config",
            str(rd.run_json),
        ]


def test_orphans_are_found_only_for_this_database_and_dead_runners(env):
    """A training process whose runner is dead is an orphan of THIS database only."""
    code = "import time; time.sleep(60)"
    dead_runner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_runner.wait()
    base = settings_env(env.settings)
    mine = subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=True,
        env={**base, ENV_DB: db_identity(env.settings), ENV_JOB: "job_x", ENV_RUNNER: f"{dead_runner.pid}:1"},
    )
    other_db = subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=True,
        env={**base, ENV_DB: "someone-elses", ENV_JOB: "job_y", ENV_RUNNER: f"{dead_runner.pid}:1"},
    )
    try:
        time.sleep(0.3)
        assert find_orphans(env.settings) == {mine.pid: "job_x"}
        assert reap_orphans(env.settings, grace_s=1) == [mine.pid]
        mine.wait(5)
        assert pid_alive(other_db.pid)
    finally:
        for p in (mine, other_db):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_metrics_tail_keeps_lines_until_recorded(tmp_path: Path):
    """A record_progress that raises (database unreachable) used to lose the lines read: the offset
    had advanced. They stay pending and are retried (with skip_recorded); a batch the database
    refuses for its content is dropped after a few tries instead of stalling the series."""
    from sqlalchemy.exc import DataError, OperationalError

    from worker.monitor import MetricsTail

    rd = RunDir(tmp_path / "r").create()
    tail = MetricsTail(rd)
    recorded: list[tuple[int, bool]] = []
    outcomes: list = []

    def record(batch, retry):
        exc = outcomes.pop(0) if outcomes else None
        if exc is not None:
            raise exc
        recorded.extend((r["step"], retry) for r in batch)

    for step in (1, 2):
        rd.append_metrics({"step": step})
    outcomes[:] = [OperationalError("x", {}, Exception("server closed the connection"))] * 5
    for _ in range(5):  # a long outage: transient errors never drop lines
        assert tail.ingest(record) == 0
    rd.append_metrics({"step": 3})
    assert tail.ingest(record) == 3 and recorded == [(1, True), (2, True), (3, True)]
    assert tail.pending == [] and tail.dropped == 0
    rd.append_metrics({"step": 4})
    assert tail.ingest(record) == 1 and recorded[-1] == (4, False)
    rd.append_metrics({"step": 5})
    outcomes[:] = [DataError("x", {}, Exception("invalid input"))] * MetricsTail.MAX_CONTENT_FAILURES
    for _ in range(MetricsTail.MAX_CONTENT_FAILURES - 1):
        tail.ingest(record)
    assert tail.pending == [{"step": 5}]
    tail.ingest(record)  # the last try: dropped with an error
    assert tail.pending == [] and tail.dropped == 1
    rd.append_metrics({"step": 6})
    assert tail.ingest(record) == 1 and recorded[-1] == (6, False)


def test_tampered_parent_checkpoint_fails_the_job_with_the_checkpoint_error(env):
    """The API no longer hashes an explicit parent checkpoint in the request (only its meta.json
    must exist): the trainer verifies it when loading, and the job fails with that text."""
    parent = env.root / "parent-final"
    parent.mkdir()
    (parent / "model.safetensors").write_bytes(b"weights")
    (parent / "optimizer.pt").write_bytes(b"adam")
    write_manifest(parent, 6, 24)
    (parent / "optimizer.pt").write_bytes(b"tampered")
    job = add_round(env.session, env.run, env.root, {"steps": 2})
    spec = {**job.spec, "init_from": str(parent), "counters": {"step": 6, "examples": 24}}
    env.session.exec(update(Job).where(Job.id == job.id).values(spec=spec))
    env.session.commit()
    claim = jobs.claim(env.session, job.id, "h", 1, 30, run_dir=str(env.settings.runs_dir / job.id))
    report = runner.run_job(claim, env.settings, threading.Event())
    assert report.outcome.status == "failed"
    headline = report.outcome.error.splitlines()[0]
    assert headline.startswith("training exited with code 1: halos_core.run_dir.CheckpointError: checkpoint")
    assert "optimizer.pt has sha256" in headline and "manifest says" in headline


def test_the_real_trainer_verifies_init_from_before_loading():
    """What the fake trainer mimics above: halos_core's loader hashes every file (verify=True)
    and the trainer loads `init_from` through it (read, not imported: that module needs torch)."""
    import ast

    tree = ast.parse((REPO / "halos_core" / "checkpoint.py").read_text())
    loader = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "load_checkpoint")
    assert any(
        isinstance(c, ast.Call)
        and getattr(c.func, "id", None) == "read_manifest"
        and any(k.arg == "verify" and getattr(k.value, "value", None) is True for k in c.keywords)
        for c in ast.walk(loader)
    )
    trainer = (REPO / "halos_core" / "training" / "build.py").read_text()
    assert "load_checkpoint(config.init_from" in trainer


def test_multi_node_accelerate_config_and_command(tmp_path: Path):
    """Node r of a k-node gang: accelerate's multi-node launch with torchrun's c10d rendezvous at
    node 0's endpoint, k x num_processes ranks in all; node 0 hosts the rendezvous store."""
    from server.settings import Settings

    rd = RunDir(tmp_path / "r").create()
    gpu2 = Settings(data_dir=tmp_path, num_processes=2)
    for rank in (0, 1):
        node = launch.Node(rank=rank, nodes=3, address="10.1.2.3", port=29500)
        path = launch.write_accelerate_config(rd, gpu2, node=node)
        assert path == (rd.accelerate_yaml if rank == 0 else rd.path / f"accelerate-node{rank}.yaml")
        cfg = yaml.safe_load(path.read_text())
        assert (cfg["num_machines"], cfg["machine_rank"], cfg["num_processes"]) == (3, rank, 6)
        assert (cfg["rdzv_backend"], cfg["same_network"], cfg["distributed_type"]) == ("c10d", False, "MULTI_GPU")
        assert (cfg["main_process_ip"], cfg["main_process_port"]) == ("10.1.2.3", 29500)
        cmd = launch.command(gpu2, rd, node)
        assert cmd[cmd.index("--config_file") + 1] == str(path)
        assert cmd[cmd.index("--rdzv_conf") + 1] == f"is_host={'true' if rank == 0 else 'false'}"
        assert cmd[-2:] == ["--config", str(rd.run_json)]  # every node reads node 0's run.json
    # one process per node still goes through the launcher (the rendezvous); FSDP keeps its settings
    one = Settings(data_dir=tmp_path, use_cpu=True)
    assert "accelerate.commands.launch" in launch.command(one, rd, launch.Node(1, 2, "127.0.0.1", 1))
    fsdp = launch.accelerate_config(Settings(data_dir=tmp_path, fsdp=True), node=launch.Node(0, 2, "h", 1))
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2


def test_long_silent_phases_of_the_trainer_say_they_are_alive(caplog):
    """The reference pass before the first step (on an accelerator) and evaluations write no
    metric line for as long as the round is big: they log their progress at most every
    `EVERY_S`, so the stall check never reads a healthy trainer as hung."""
    from halos_core.training import alive

    caplog.set_level("INFO", logger="halos_core.training")
    quiet = alive.PhaseProgress("reference log-probs", every_s=3600)
    chatty = alive.PhaseProgress("evaluation", total=3, every_s=0)
    for _ in range(3):
        quiet.tick()
        chatty.tick()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"evaluation: {k}/3 microbatches done" for k in (1, 2, 3)]
    assert alive.EVERY_S * 10 <= Settings.model_fields["stall_timeout_s"].default  # room for several lines

"""Run one claimed attempt of a job: prepare runs/<job_id>/, launch the trainer, supervise it.

1. `runs/<job_id>/` (RunDir); stop leftovers of earlier attempts of this job on this host;
   delete partial checkpoints (I4).
2. A previous attempt that wrote a valid result.json + final/ but died before `finish` was
   recorded is not trained again: its result is reported.
3. Attempt > 1: `resume_from` = the latest COMPLETE checkpoint of this round (I3).
4. `run.json` (RunConfig from the job spec + worker settings) and `accelerate.yaml`.
5. `python -m accelerate.commands.launch --config_file accelerate.yaml -m <trainer> --config run.json`
   (several processes or FSDP; one process: `python -m <trainer> --config run.json`, no second
   interpreter, `worker.launch.command`) in its own session (process group), output appended to
   stdout.log, plus a watchdog that stops the group if this process dies.
   Sampling and labelling jobs (`Job.kind` sample / label, `halos_core.artefact_spec`) take the
   same path with their own run.json and `python -m halos_core.<entry> --config run.json` (one
   process, no accelerate); a retry starts them over (their output is written atomically at the end).
6. `worker.monitor.Supervisor` until it exits / is cancelled / loses its lease / we shut down.

A multi-node attempt (`claim.gang`, server/jobs/gang.py) first waits until every node has joined
(`wait_for_gang`). Node 0 then does 1-5 for the shared run directory (which must be on a
filesystem every node mounts at the same path) and records the checkpoint it resumes from; node
r > 0 waits for that, writes its own `accelerate-node<r>.yaml` and launches its ranks with rank
0's run.json (`_run_node`); every node's launcher meets at the c10d rendezvous (worker/launch.py).

The lease is renewed throughout by a `worker.lease.LeaseKeeper` (the task starts it right after
the claim): steps 1-3 may hash many GB. Right before the launch the runner checks that the lease
is still ours (and not cancelled) and hands the process group to the keeper's fence.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from halos_core.artefact_spec import ENTRY_POINTS, LabelSpec, SampleSpec, config_for_attempt
from halos_core.job_spec import LORA_FSDP_PROBLEM, RunConfig, fit_problem
from halos_core.run_dir import Manifest, RunDir, read_manifest, write_json_atomic
from server import jobs, queue
from server.db import session_scope
from server.jobs import Claim, GangState, Outcome
from server.models import utcnow
from server.settings import Settings
from server.storage_lifecycle import usage
from worker import exit_codes, launch
from worker.lease import LeaseKeeper
from worker.monitor import RunReport, Supervisor, attempt_marker, reap_orphans, supervised_env
from worker.slots import Slot

log = logging.getLogger(__name__)

# Set by the worker's shutdown hook (worker/app.py); runners notice it within a poll interval.
SHUTDOWN = threading.Event()


def hostname() -> str:
    return socket.gethostname()


def build_config(claim: Claim, settings: Settings, run_dir: RunDir, resume_from: str | None) -> RunConfig:
    """The attempt's run.json: the job's spec + where and how this worker runs it."""
    return RunConfig.for_attempt(
        claim.job_spec(),
        job_id=claim.job_id,
        run_dir=str(run_dir.path.resolve()),
        resume_from=resume_from,
        mixed_precision=settings.mixed_precision,
        reference_cache_dir=str(settings.reference_cache_dir.resolve()),
    )


class LaunchError(Exception):
    """The trainer could not be started at all (missing or unusable interpreter): not transient."""


def worker_error(exc: BaseException) -> Outcome:
    """The outcome of an exception in the worker's own code around an attempt: `failed` for what a
    retry cannot fix (the interpreter cannot be started, an invalid configuration), `crashed`
    (retried, bounded by max_attempts) for the rest — ENOSPC, I/O errors, bugs."""
    text = f"worker error: {exc}" if isinstance(exc, LaunchError) else f"worker error: {type(exc).__name__}: {exc}"
    if isinstance(exc, (LaunchError, ValidationError, ValueError, TypeError)):
        return Outcome("failed", error=text)
    return Outcome("crashed", error=text)


def worker_problem(claim: Claim, settings: Settings) -> str | None:
    """Why THIS worker cannot run the round (the API's submit-time question, `fit_problem`, asked
    with the worker's own num_processes / fsdp: the API and the workers must share them), or None.
    A spec too broken to tell is left to `build_config` ("invalid job spec")."""
    if claim.kind != "round":
        return None
    try:
        spec = claim.job_spec()
    except ValidationError:
        return None
    problem = fit_problem(spec, settings.num_processes, settings.fsdp)
    if problem is None:
        return None
    hint = (
        ""
        if problem == LORA_FSDP_PROBLEM
        else (
            f" (worker HALOS_NUM_PROCESSES={settings.num_processes}; the API and the workers must share"
            " HALOS_NUM_PROCESSES and HALOS_FSDP)"
        )
    )
    return f"this worker cannot run the round: {problem}{hint}"


def storage_problem(claim: Claim, settings: Settings) -> str | None:
    """The submit-time storage admission asked again right before the launch (the disk may have
    filled since): the reference cache is trimmed to its cap first, then a round that does not fit
    fails with the figures instead of dying on ENOSPC half-way through a save."""
    if claim.kind != "round":
        return None
    try:
        spec = claim.job_spec()
    except ValidationError:
        return None
    usage.evict_reference_cache(settings)  # the cap holds at every launch, not only at the sweeper's pass
    return usage.launch_problem(spec, settings)


def _finish_now(outcome: Outcome) -> RunReport:
    return RunReport("finish", outcome)


def _backfill_metrics(claim: Claim, settings: Settings, run_dir: RunDir, resume_step: int) -> int:
    """Record the lines an earlier attempt wrote but died before recording, up to the step this
    attempt resumes from (later ones are redone and logged again); return where tailing starts."""
    records, _ = run_dir.read_metrics(0)
    kept = [r for r in records if jobs.int_or_zero(r.get("step")) <= resume_step]
    if kept:
        try:
            with session_scope(settings) as session:
                jobs.record_progress(session, claim.job_id, claim.lease_token, kept, skip_recorded=True)
        except Exception as exc:
            log.warning("backfilling metrics of %s failed: %s", claim.job_id, exc)
    # Tail from the end of the file, past any half-written line of the killed attempt.
    return run_dir.metrics_jsonl.stat().st_size if run_dir.metrics_jsonl.exists() else 0


def _latest_complete(run_dir: RunDir) -> Manifest | None:
    """The newest complete checkpoint. Called right after `clean_partial_checkpoints`, which has
    just verified every checkpoint left in place (and removed the rest), so they are not hashed a
    second time here (hashing tens of GB twice before a retry is minutes of nothing)."""
    done = run_dir.complete_checkpoints(verify=False)
    return done[-1] if done else None


def run_job(
    claim: Claim,
    settings: Settings,
    shutdown: threading.Event | None = None,
    *,
    keeper: LeaseKeeper | None = None,
    slot: Slot | None = None,
) -> RunReport:
    """Run one claimed attempt. `keeper` renews the lease (worker.tasks starts it right after the
    claim and stops it after finish/release); without one (tests) the runner keeps its own for
    the duration of this call. `slot` (worker.slots): the GPUs and port of this job when the
    worker runs several at once; None = every GPU, the configured port."""
    if keeper is None:
        own = LeaseKeeper(claim, settings).start()
        try:
            return run_job(claim, settings, shutdown, keeper=own, slot=slot)
        finally:
            own.stop()
    shutdown = shutdown or SHUTDOWN
    run_dir = RunDir(claim.run_dir or (settings.runs_dir / claim.job_id)).create()

    # earlier attempts of this job on this host must be gone before this one starts (I2, I6)
    reap_orphans(settings, job_id=claim.job_id)
    # the API checked the round against ITS settings; this worker may be configured otherwise
    problem = worker_problem(claim, settings) or (storage_problem(claim, settings) if claim.rank == 0 else None)
    if problem:
        return _finish_now(Outcome("failed", error=problem))
    if claim.gang:
        # all or nothing: nobody prepares or launches before every node has joined; node r > 0
        # then waits for node 0 to have prepared the run directory and picked the resume point
        waited = wait_for_gang(claim, settings, keeper, shutdown, ready=claim.rank > 0)
        if isinstance(waited, RunReport):
            return waited
        if claim.rank > 0:
            return _run_node(claim, settings, run_dir, waited, keeper, shutdown, slot)
    removed = run_dir.clean_partial_checkpoints()
    if removed:
        log.warning("job %s: removed partial checkpoints %s", claim.job_id, [p.name for p in removed])

    if run_dir.result_json.exists():
        result, why = exit_codes.verify_result(run_dir, claim.kind)
        if result is not None and claim.attempt > 1:
            log.warning("job %s: attempt %d found the previous attempt's complete result", claim.job_id, claim.attempt)
            return _finish_now(Outcome("succeeded", result=result))
        run_dir.result_json.unlink(missing_ok=True)

    resume = _latest_complete(run_dir) if claim.attempt > 1 and claim.kind == "round" else None
    if resume is not None:
        # its writer may have died between publishing it and logging it: report it now (the server
        # keeps one checkpoint event per step, so one logged already changes nothing)
        run_dir.log_checkpoint(resume.step, resume.path.name)
    try:
        cmd = _prepare(claim, settings, run_dir, resume, slot)
    except (ValidationError, ValueError, TypeError) as exc:
        return _finish_now(Outcome("failed", error=f"invalid job spec: {exc}"))
    if claim.gang:
        with session_scope(settings) as session:
            jobs.mark_gang_ready(session, claim, str(resume.path.resolve()) if resume else None)
    metrics_offset = _backfill_metrics(claim, settings, run_dir, resume.step if resume else 0)
    return _launch(
        claim, settings, run_dir, cmd, resume.step if resume else None, metrics_offset, keeper, shutdown, slot
    )


def _run_node(
    claim: Claim,
    settings: Settings,
    run_dir: RunDir,
    gang: GangState,
    keeper: LeaseKeeper,
    shutdown: threading.Event,
    slot: Slot | None,
) -> RunReport:
    """Node r > 0 of a multi-node attempt: node 0's worker has prepared the shared run directory
    (partial checkpoints removed, run.json with the checkpoint every node resumes from); this node
    only writes its launcher config and starts its ranks."""
    node = _node(claim)
    launch.write_accelerate_config(run_dir, settings, node=node)
    resume_step = read_manifest(gang.resume_from, verify=False).step if gang.resume_from else None
    return _launch(
        claim, settings, run_dir, launch.command(settings, run_dir, node), resume_step, 0, keeper, shutdown, slot
    )


def _node(claim: Claim) -> launch.Node:
    address, port = claim.rendezvous or ("127.0.0.1", 0)
    return launch.Node(rank=claim.rank, nodes=claim.nodes, address=address, port=port)


def wait_for_gang(
    claim: Claim, settings: Settings, keeper: LeaseKeeper, shutdown: threading.Event, *, ready: bool
) -> GangState | RunReport:
    """Until every node has joined (and, with `ready`, node 0 has prepared the run directory).

    Node 0 republishes the job for the missing nodes every `republish_after_s` (a worker taking
    the message joins). Past `gang_form_timeout_s` the incomplete gang is released (the job is
    queued again, no retry consumed): no worker waits for a gang that cannot form."""
    poll = max(0.05, min(1.0, settings.heartbeat_interval_s / 2))
    started = time.monotonic()
    next_publish = started + settings.republish_after_s
    while True:
        ok, why = keeper.usable()
        if not ok:
            return RunReport("lost", None, detail=why)
        if keeper.cancel_requested:
            return _finish_now(Outcome("cancelled", error="cancelled by request"))
        try:
            if shutdown.is_set():
                with session_scope(settings) as session:
                    released = jobs.release(
                        session,
                        claim.job_id,
                        claim.lease_token,
                        "worker shutting down",
                        member_token=claim.member_token,
                    )
                return RunReport("released" if released else "lost", None, detail="worker shutting down")
            with session_scope(settings) as session:
                state = jobs.gang_state(session, claim)
            if state is None or not state.live:
                return RunReport("lost", None, detail="the gang's attempt ended")
            if state.formed and (state.ready or not ready):
                return state
            if not state.formed and time.monotonic() - started > settings.gang_form_timeout_s:
                with session_scope(settings) as session:
                    if jobs.release_unformed(session, claim, form_timeout_s=settings.gang_form_timeout_s):
                        return RunReport("released", None, detail=f"gang incomplete ({state.joined}/{state.size})")
            if not state.formed and claim.rank == 0 and time.monotonic() >= next_publish:
                next_publish = time.monotonic() + settings.republish_after_s
                queue.publish_many([claim.job_id] * (state.size - state.joined), settings)
        except Exception as exc:  # the database is unreachable: the keeper fences if it lasts
            log.warning("job %s: waiting for the gang: %s", claim.job_id, exc)
        shutdown.wait(poll)


def _launch(
    claim: Claim,
    settings: Settings,
    run_dir: RunDir,
    cmd: list[str],
    resume_step: int | None,
    metrics_offset: int,
    keeper: LeaseKeeper,
    shutdown: threading.Event,
    slot: Slot | None,
) -> RunReport:
    """Start the trainer (its own process group, output appended to this node's log) and supervise it."""
    env = {
        **os.environ,
        **launch.launch_env(settings),
        **(slot.env if slot is not None else {}),
        **supervised_env(claim, settings),
        "PYTHONUNBUFFERED": "1",
    }
    # the setup above may have taken long (hashing): start nothing on a lease that is no longer ours
    ok, why = keeper.usable()
    if not ok:
        log.error("job %s attempt %d: not starting the training: %s", claim.job_id, claim.attempt, why)
        return RunReport("lost", None, detail=why)
    if keeper.cancel_requested:
        return _finish_now(Outcome("cancelled", error="cancelled by request"))
    marker = attempt_marker(claim, settings)
    node = f" node {claim.rank}/{claim.nodes}" if claim.gang else ""
    resuming = f" resuming from step {resume_step}" if resume_step is not None else ""
    with open(run_dir.node_log(claim.rank if claim.gang else 0), "ab") as out:
        out.write(
            f"\n===== halos: job {claim.job_id} attempt {claim.attempt}{node} on {hostname()} at"
            f" {utcnow().isoformat()}{resuming} =====\n".encode()
        )
        out.flush()
        log_offset = out.tell()
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=run_dir.path,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise LaunchError(f"cannot start the trainer with {cmd[0]!r} (HALOS_PYTHON_EXECUTABLE): {exc}") from exc
    watchdog = _start_watchdog(proc.pid, settings, marker)
    log.info(
        "job %s attempt %d: started %s (pgid %d)%s",
        claim.job_id,
        claim.attempt,
        " ".join(cmd),
        proc.pid,
        f", resuming from step {resume_step}" if resume_step is not None else "",
    )
    try:
        if not keeper.attach(proc.pid, marker):
            # fenced between the check above and the start: the fence found nothing to kill
            from worker.watchdog import kill_group

            gone = kill_group(proc.pid, 0, marker=marker, reap=proc.poll)
            return RunReport("lost", None, detail=keeper.reason, group_gone=gone)
        try:
            if claim.rank == 0:
                with session_scope(settings) as session:
                    jobs.mark_attempt_started(session, claim.job_id, claim.lease_token, resumed_from_step=resume_step)
        except Exception as exc:
            log.warning("recording the resume point of %s failed: %s", claim.job_id, exc)
        return Supervisor(claim, settings, run_dir, proc, shutdown, metrics_offset, log_offset, keeper=keeper).run()
    except Exception as exc:
        # a bug in the supervisor must not leave the training running; the job is retried
        from worker.watchdog import kill_group

        log.exception("job %s attempt %d: supervising failed; stopping group %d", claim.job_id, claim.attempt, proc.pid)
        gone = kill_group(proc.pid, 0, marker=marker, reap=proc.poll)
        return RunReport(
            "finish",
            Outcome("crashed", error=f"worker error while supervising: {type(exc).__name__}: {exc}"),
            group_gone=gone,
        )
    except BaseException:
        # an interrupt: stop the training, then let it propagate
        from worker.watchdog import kill_group

        kill_group(proc.pid, 0, marker=marker, reap=proc.poll)
        raise
    finally:
        if proc.poll() is not None:
            keeper.detach()  # reaped: its pgid may be reused
        if watchdog is not None and watchdog.poll() is None:
            watchdog.terminate()
            try:
                watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                watchdog.kill()


def _prepare(
    claim: Claim, settings: Settings, run_dir: RunDir, resume: Manifest | None, slot: Slot | None
) -> list[str]:
    """Write the attempt's run.json (+ accelerate.yaml for a round); the command that runs it."""
    if claim.kind == "round":
        config = build_config(claim, settings, run_dir, str(resume.path.resolve()) if resume else None)
        run_dir.write_config(config)
        if claim.gang:
            node = _node(claim)
            launch.write_accelerate_config(run_dir, settings, node=node)
            return launch.command(settings, run_dir, node)
        if slot is None:
            launch.write_accelerate_config(run_dir, settings)
        else:
            launch.write_accelerate_config(
                run_dir, settings, main_process_port=slot.main_process_port(), port_from_settings=False
            )
        return launch.command(settings, run_dir)
    spec = claim.any_spec()
    if not isinstance(spec, (SampleSpec, LabelSpec)) or spec.kind != claim.kind:
        raise ValueError(f"job kind {claim.kind!r} with a {spec.kind!r} spec")
    # a retry starts over: what an earlier attempt wrote is not trusted
    run_dir.metrics_jsonl.unlink(missing_ok=True)
    attempt_config = config_for_attempt(spec, job_id=claim.job_id, run_dir=str(run_dir.path.resolve()))
    write_json_atomic(run_dir.run_json, attempt_config.model_dump(mode="json"))
    python = settings.python_executable or sys.executable
    return [python, "-m", ENTRY_POINTS[claim.kind], "--config", str(run_dir.run_json)]


def _start_watchdog(pgid: int, settings: Settings, marker: dict[str, str]) -> subprocess.Popen | None:
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))}
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.watchdog",
                str(os.getpid()),
                str(pgid),
                str(settings.kill_grace_s),
                json.dumps(marker),
            ],
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("could not start the watchdog for group %d: %s", pgid, exc)
        return None

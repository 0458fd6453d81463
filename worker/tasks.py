"""The only task: `halos.run_job(job_id)` — claim, run, finish, publish promoted children.

It is thin on purpose: the claim is one conditional UPDATE (a duplicate delivery — a Redis
redelivery after `visibility_timeout`, a sweeper republish — finds the job not `queued` and
returns at once), and all state lives in the database.

Right after the claim a `worker.lease.LeaseKeeper` renews the lease (and fences on its own
timer) until `finish` or `release` has returned: everything in between — reaping, hashing
checkpoints before a retry, the training, hashing `final/` after it — happens under a live lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery.exceptions import Reject

from server import jobs, queue
from server.db import session_scope
from server.settings import Settings, get_settings
from server.storage_lifecycle import retention
from worker import launch, runner, slots
from worker.app import app
from worker.lease import LeaseKeeper
from worker.monitor import ENV_JOB

log = logging.getLogger(__name__)


@app.task(name=queue.TASK_NAME, ignore_result=True, acks_late=True)
def run_job(job_id: str) -> str:
    if runner.SHUTDOWN.is_set():
        # put the message back for another worker (the sweeper would republish it anyway)
        raise Reject("worker shutting down", requeue=True)
    return execute(job_id, get_settings())


def execute(
    job_id: str, settings: Settings, shutdown: threading.Event | None = None, *, job_slots: slots.Slots | None = None
) -> str:
    """The task's body (callable without Celery): take a slot, claim, keep the lease, run, finish."""
    try:
        job_slots = job_slots or slots.current(settings)
    except slots.SlotError as exc:
        # not claimed: the sweeper republishes the job for a worker that can run it
        log.error("not running job %s: %s", job_id, exc)
        return "refused"
    slot = job_slots.acquire()
    try:
        return _claim_and_run(job_id, settings, shutdown, slot)
    finally:
        job_slots.release(slot)


def node_offer(settings: Settings, slot: slots.Slot) -> jobs.NodeOffer:
    """Where the other nodes of a gang this worker opens reach its rendezvous."""
    return jobs.NodeOffer(
        address=settings.node_address or socket.getfqdn(),
        port=slot.main_process_port() or launch.free_port(),
        form_timeout_s=settings.gang_form_timeout_s,
    )


def _claim_and_run(job_id: str, settings: Settings, shutdown: threading.Event | None, slot: slots.Slot) -> str:
    with session_scope(settings) as session:
        claim = jobs.claim(
            session,
            job_id,
            runner.hostname(),
            os.getpid(),
            settings.lease_ttl_s,
            run_dir=str((settings.runs_dir / job_id).resolve()),
            node=node_offer(settings, slot),
        )
    if claim is None:
        log.info("job %s not claimable (duplicate delivery, running elsewhere, finished or in backoff)", job_id)
        return "not-claimed"
    if claim.job_id != job_id:
        # this worker joined an older gang still forming: this message's job needs another worker
        queue.publish(job_id, settings)
    if claim.gang:
        log.info("job %s: attempt %d, node %d of %d", claim.job_id, claim.attempt, claim.rank, claim.nodes)
        if claim.rank == 0:  # messages for the workers the gang still needs
            queue.publish_many([claim.job_id] * (claim.nodes - 1), settings)
    else:
        log.info("job %s: attempt %d claimed", job_id, claim.attempt)
    job_id = claim.job_id
    keeper = LeaseKeeper(claim, settings).start()
    try:
        try:
            report = runner.run_job(claim, settings, shutdown, keeper=keeper, slot=slot)
        except Exception as exc:  # setup before the launch (nothing is running): end the attempt now
            log.exception("job %s attempt %d: worker error before the training started", job_id, claim.attempt)
            report = runner.RunReport("finish", runner.worker_error(exc))
        if report.group_gone:
            # nothing of the attempt runs any more: a heartbeat that now finds the attempt ended
            # (this task's own finish or release, another node's end) is no reason to fence
            keeper.ending()
        if report.action == "finish" and report.outcome is not None and not report.group_gone:
            # Processes of this attempt survived SIGKILL (uninterruptible sleep, another PID
            # namespace, …). Finishing would let the next attempt or round start beside them (I2):
            # stop renewing and leave the job to lease expiry and the sweeper, as a warm shutdown does.
            keeper.stop()
            log.critical(
                "job %s attempt %d: NOT finishing with %s: processes of the attempt survived SIGKILL;"
                " the lease will expire and the sweeper decides. Check this host for leftover training"
                " processes (env %s=%s).",
                job_id,
                claim.attempt,
                report.outcome.status,
                ENV_JOB,
                job_id,
            )
            return "group-survived"
        if report.action == "finish" and report.outcome is not None:
            ok, why = keeper.usable()
            if not ok:
                log.error(
                    "job %s attempt %d: not finishing (%s) with %s: the lease is no longer ours",
                    job_id,
                    claim.attempt,
                    why,
                    report.outcome.status,
                )
                report = runner.RunReport("lost", None, detail=why, group_gone=report.group_gone)
        if report.action == "finish" and report.outcome is not None:
            with session_scope(settings) as session:
                job = jobs.finish(
                    session,
                    job_id,
                    claim.lease_token,
                    report.outcome,
                    retry_backoff_s=settings.retry_backoff_s,
                    member_token=claim.member_token,
                )
                status = job.status.value
                children = jobs.unpublished_children(session, job_id)
            keeper.stop()
            log.info("job %s attempt %d: %s -> %s", job_id, claim.attempt, report.outcome.status, status)
            if children:
                queue.publish_many(children, settings)
            if status == "succeeded" and claim.kind == "round":
                try:
                    with session_scope(settings) as session:
                        retention.after_round_success(session, settings, job_id)
                except Exception:  # the sweeper's retention pass does it later
                    log.exception("job %s: removing intermediates / applying retention failed", job_id)
            return status
        keeper.stop()
        if report.action == "released":
            # another worker may take it now (this one is shutting down and will not)
            queue.publish(job_id, settings)
        elif claim.gang and report.group_gone:
            # this node's trainer is gone (exited 0, or fenced): it no longer holds up a retry
            try:
                with session_scope(settings) as session:
                    changed = jobs.leave_gang(session, claim, "done" if report.action == "left" else report.action)
                if changed == "queued":
                    queue.publish(job_id, settings)
            except Exception:  # its member lease expires instead
                log.exception("job %s: leaving the gang failed", job_id)
        log.warning("job %s attempt %d: %s (%s)", job_id, claim.attempt, report.action, report.detail)
        return report.action
    finally:
        keeper.stop()

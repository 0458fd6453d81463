"""Jobs: the state machine (the only writer of `Job.status`), round chaining, progress reports.

    state.py     transitions: submit, claim, heartbeat, finish, release, request_cancel,
                 expire_leases, claimable_unheld (+ publish bookkeeping); a gang's leave/ready/release
    gang.py      multi-node attempts: gang formation (all-or-nothing), members' leases
    chaining.py  what a parent's end does to the rounds waiting for it, and the lineage
    progress.py  metric points, eval/checkpoint events and resume points reported by the lease holder
    rows.py      the conditional-UPDATE primitive and row helpers
    types.py     Claim, Outcome, Heartbeat and the errors

Callers use this package's names (`from server import jobs; jobs.claim(...)`).
"""

from server.jobs.chaining import job_checkpoint, round_checkpoint
from server.jobs.gang import GangState, NodeOffer
from server.jobs.progress import mark_attempt_started, record_checkpoint_saved, record_progress
from server.jobs.rows import int_or_zero, json_safe
from server.jobs.state import (
    claim,
    claimable_unheld,
    expire_leases,
    finish,
    gang_state,
    get,
    heartbeat,
    is_terminal,
    leave_gang,
    mark_gang_ready,
    mark_published,
    release,
    release_unformed,
    request_cancel,
    submit,
    unpublished_children,
)
from server.jobs.types import Claim, Heartbeat, JobNotFound, Outcome, ParentFailed

__all__ = [
    "Claim",
    "GangState",
    "Heartbeat",
    "JobNotFound",
    "NodeOffer",
    "Outcome",
    "ParentFailed",
    "claim",
    "claimable_unheld",
    "expire_leases",
    "finish",
    "gang_state",
    "get",
    "heartbeat",
    "int_or_zero",
    "is_terminal",
    "job_checkpoint",
    "json_safe",
    "leave_gang",
    "mark_gang_ready",
    "mark_attempt_started",
    "mark_published",
    "record_checkpoint_saved",
    "record_progress",
    "release",
    "release_unformed",
    "request_cancel",
    "round_checkpoint",
    "submit",
    "unpublished_children",
]

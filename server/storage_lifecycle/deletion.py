"""DELETE of feedback files, prompt sets, runs and models.

Idempotent (deleting a deleted object is a 204 again), scoped to the caller's project (another
project's ids are 404s like ids that do not exist), refused with 409 while something unfinished
uses the object, and crash-safe: the rows become tombstones and a deletion intent is recorded in
one transaction, the bytes go after the commit (server/storage_lifecycle/files.py).

- a feedback file / prompt set keeps its row (sha256, counts, provenance: the lineage of the
  rounds trained on it) with `deleted_at`; the client's file name and the data-quality findings
  (which quote records) are cleared with the bytes; labelling-tool annotations sealed into a
  deleted feedback file lose their record (their ids stay, so a redelivery is still a no-op).
  Blobs are content-addressed: one still used by another live row stays (decided under
  `files.lock_blob`, which uploads of the same bytes take too).
- a run: every checkpoint becomes `pruned`, every round's run directory goes; the rows stay
  (`Run.deleted_at`; the run is 404 afterwards).
- a model: only its registration (`Model.deleted_at`); the directory is the operator's.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlmodel import Session, col, select

from server.errors import Conflict
from server.models import (
    UNFINISHED_STATUSES,
    Checkpoint,
    DraftAnnotation,
    FeedbackFile,
    Job,
    Model,
    PromptSet,
    Round,
    Run,
    utcnow,
)
from server.services.common import get_owned
from server.services.keys import Principal
from server.settings import Settings
from server.storage_lifecycle import files
from server.storage_lifecycle.retention import PRUNED

log = logging.getLogger("halos.storage")

MAX_LISTED = 20  # job / run ids named in a 409


def _strings_in(value: Any, wanted: str) -> bool:
    if isinstance(value, str):
        return value == wanted
    if isinstance(value, dict):
        return any(_strings_in(v, wanted) for v in value.values())
    if isinstance(value, list):
        return any(_strings_in(v, wanted) for v in value)
    return False


def unfinished_users(session: Session, project_id: str, object_id: str) -> list[str]:
    """Unfinished jobs of the project that name `object_id` in their spec or their round's feedback."""
    users: list[str] = []
    rows = session.exec(
        select(Job.id, Job.spec).where(Job.project_id == project_id, col(Job.status).in_(list(UNFINISHED_STATUSES)))
    ).all()
    job_ids = [job_id for job_id, _ in rows]
    rounds = (
        {r.job_id: r for r in session.exec(select(Round).where(col(Round.job_id).in_(job_ids))).all()}
        if job_ids
        else {}
    )
    for job_id, spec in rows:
        rnd = rounds.get(job_id)
        if _strings_in(spec or {}, object_id) or (rnd is not None and object_id in (rnd.feedback_ids or [])):
            users.append(job_id)
    return users


def _in_use(kind: str, object_id: str, jobs: list[str]) -> Conflict:
    return Conflict(
        f"{kind} {object_id} is used by {len(jobs)} unfinished job(s); cancel them or wait for them to finish",
        code=f"{kind}_in_use",
        details={"id": object_id, "job_ids": jobs[:MAX_LISTED]},
    )


def delete_feedback(session: Session, settings: Settings, principal: Principal, feedback_id: str) -> FeedbackFile:
    fb = get_owned(session, FeedbackFile, feedback_id, principal.project_id, "feedback")
    if fb.deleted_at is not None:
        session.commit()
        return fb
    users = unfinished_users(session, principal.project_id, fb.id)
    if users:
        raise _in_use("feedback", fb.id, users)
    fb.deleted_at = utcnow()
    fb.original_filename = None
    fb.findings = None
    session.add(fb)
    for draft in session.exec(select(DraftAnnotation).where(DraftAnnotation.sealed_into == fb.id)).all():
        draft.record = None
        session.add(draft)
    session.flush()
    intent = files.add_intent(
        session, "feedback", fb.id, [files.blob_action(settings.data_dir, fb.storage_path)], principal.project_id
    )
    session.commit()
    files.finish(session, [intent.id] if intent.id is not None else [], settings)
    return fb


def delete_prompt_set(session: Session, settings: Settings, principal: Principal, prompt_set_id: str) -> PromptSet:
    ps = get_owned(session, PromptSet, prompt_set_id, principal.project_id, "prompt_set")
    if ps.deleted_at is not None:
        session.commit()
        return ps
    users = unfinished_users(session, principal.project_id, ps.id)
    if users:
        raise _in_use("prompt_set", ps.id, users)
    ps.deleted_at = utcnow()
    ps.original_filename = None
    ps.findings = None
    session.add(ps)
    session.flush()
    intent = files.add_intent(
        session, "prompt_set", ps.id, [files.blob_action(settings.data_dir, ps.storage_path)], principal.project_id
    )
    session.commit()
    files.finish(session, [intent.id] if intent.id is not None else [], settings)
    return ps


def _owned_including_deleted(session: Session, table: Any, object_id: str, principal: Principal, kind: str) -> Any:
    return get_owned(session, table, object_id, principal.project_id, kind, include_deleted=True)


def delete_run(session: Session, settings: Settings, principal: Principal, run_id: str) -> Run:
    run = _owned_including_deleted(session, Run, run_id, principal, "run")
    if run.deleted_at is not None:
        session.commit()
        return run
    jobs = session.exec(
        select(Job.id, Job.status, Job.run_dir)
        .join(Round, col(Round.job_id) == col(Job.id))
        .where(Round.run_id == run.id)
    ).all()
    unfinished = [j for j, status, _ in jobs if status in UNFINISHED_STATUSES]
    ckpts = session.exec(select(Checkpoint).where(Checkpoint.run_id == run.id)).all()
    for ckpt in ckpts:  # sampling / labelling with one of its checkpoints
        unfinished += [j for j in unfinished_users(session, principal.project_id, ckpt.id) if j not in unfinished]
    if unfinished:
        raise Conflict(
            f"run {run.id} has {len(unfinished)} unfinished job(s); cancel them or wait for them to finish",
            code="run_in_use",
            details={"id": run.id, "job_ids": unfinished[:MAX_LISTED]},
        )
    run.deleted_at = utcnow()
    session.add(run)
    for ckpt in ckpts:
        ckpt.state = PRUNED  # the run directories below hold every one of them
        ckpt.pruned_at = ckpt.pruned_at or run.deleted_at
        session.add(ckpt)
    actions = [{"op": "rmtree", "path": str(files.resolve(settings.data_dir, d))} for _, _, d in jobs if d] + [
        {"op": "rmtree", "path": str(files.resolve(settings.data_dir, c.path))} for c in ckpts
    ]
    intent = files.add_intent(session, "run", run.id, actions, principal.project_id)
    session.commit()
    files.finish(session, [intent.id] if intent.id is not None else [], settings)
    return run


def delete_model(session: Session, settings: Settings, principal: Principal, model_id: str) -> Model:
    model = _owned_including_deleted(session, Model, model_id, principal, "model")
    if model.deleted_at is not None:
        session.commit()
        return model
    runs = session.exec(
        select(Run.id).where(Run.model_id == model.id, col(Run.deleted_at).is_(None)).limit(MAX_LISTED)
    ).all()
    if runs:
        raise Conflict(
            f"model {model.id} is used by {len(runs)} run(s); delete them first",
            code="model_in_use",
            details={"id": model.id, "run_ids": list(runs)},
        )
    users = unfinished_users(session, principal.project_id, model.id)
    if users:
        raise _in_use("model", model.id, users)
    model.deleted_at = utcnow()
    session.add(model)
    session.commit()
    return model

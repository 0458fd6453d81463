"""Runs and rounds: create, list and get runs; create a round.

A round request is checked (`round_checks`) against the run's defaults merged with its overrides,
its parent is chosen, and its job spec is built once (`round_spec`):
- by default a round continues from the run's HEAD (server/jobs/head.py). While the run's latest
  round is still waiting/queued/running the new job waits for it (`parent_job_id`; jobs.submit
  makes it `waiting`) and takes the head as it is when that round ends (its checkpoint if it was
  promoted); a failed/cancelled latest round ⇒ 409 `parent_round_failed`, unless the head was
  rolled back since that round was created (the rollback is the way on), or pass an explicit
  `parent_checkpoint_id` to branch;
- an explicit `parent_checkpoint_id` must belong to this run (else 404).
- a `gate` needs an eval set (records with split "test" or `hyperparams.eval_fraction`), else 422.
Then Round + Job (+ idempotency record) are committed in one transaction by `jobs.submit`, and
the job id is published to the queue after the commit (only when it is `queued`).
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from halos_client.models import RoundCreate, RunCreate
from server import jobs
from server.errors import Conflict, Unprocessable, not_found
from server.jobs import ParentFailed
from server.jobs.head import head_checkpoint
from server.models import UNFINISHED_STATUSES, Checkpoint, HeadMove, Job, JobStatus, Model, Round, Run
from server.services import idempotency
from server.services.common import get_owned, paginate
from server.services.keys import Principal
from server.services.models_registry import lora_target_problem
from server.services.round_checks import (
    check_hyperparams,
    check_lora_fits,
    check_loss_feedback,
    check_parent_params,
    checkpoint_params,
    effective_config,
    feedback_files,
    job_params,
    parent_manifest,
    parent_round_failed,
)
from server.services.round_spec import round_spec
from server.services.run_views import status_text
from server.settings import Settings
from server.storage_lifecycle.retention import require_continuable
from server.storage_lifecycle.usage import check_admission
from server.tracking.links import add_tracking_links

log = logging.getLogger("halos.runs")

RUN_ENDPOINT = "POST /v1/runs"
ROUND_ENDPOINT = "POST /v1/runs/{run_id}/rounds"


# --------------------------------------------------------------------------- seams to jobs/queue


def _submit(session: Session, job: Job, settings: Settings) -> Job:
    # a parent that failed since the check below: ParentFailed (→ 409), nothing inserted
    return jobs.submit(session, job, max_attempts=settings.max_attempts, refuse_failed_parent=True)


def _publish(job_id: str, settings: Settings) -> None:
    from server import queue

    queue.publish(job_id, settings)  # logs and swallows broker errors (the sweeper republishes)


# --------------------------------------------------------------------------- runs


def get_run(session: Session, principal: Principal, run_id: str) -> Run:
    return get_owned(session, Run, run_id, principal.project_id, "run")


def list_runs(session: Session, principal: Principal, limit: int, cursor: str | None) -> tuple[list[Run], str | None]:
    return paginate(session, Run, principal.project_id, limit, cursor, col(Run.deleted_at).is_(None))


def create_run(
    session: Session, settings: Settings, principal: Principal, body: RunCreate, idempotency_key: str | None
) -> tuple[Run, bool]:
    """Create a run. Returns (run, replayed)."""
    req_hash = idempotency.request_hash(RUN_ENDPOINT, body.model_dump(mode="json", exclude_unset=True))
    for _ in range(3):
        if idempotency_key is not None:
            record = idempotency.lookup(
                session, principal.project_id, RUN_ENDPOINT, idempotency_key, req_hash, settings.idempotency_ttl_hours
            )
            if record is not None:
                run = get_run(session, principal, record.resource_id or "")
                session.commit()
                return run, True
        model = get_owned(session, Model, body.model_id, principal.project_id, "model", field="model_id")
        check_hyperparams(body.loss.name, body.hyperparams, settings)
        check_lora_fits(body.lora, settings)
        if body.lora is not None and (problem := lora_target_problem(model.path, body.lora.target_modules)):
            raise Unprocessable(
                problem, code="lora_not_applicable", details={"field": "lora.target_modules", "reason": problem}
            )
        run = Run(
            project_id=principal.project_id,
            name=body.name,
            model_id=body.model_id,
            loss=body.loss.model_dump(mode="json"),
            hyperparams=body.hyperparams.model_dump(mode="json"),
            conversion=body.conversion.model_dump(mode="json") if body.conversion else None,
            lora=body.lora.model_dump(mode="json") if body.lora else None,
            retention=body.retention.model_dump(mode="json", exclude_none=True) if body.retention else None,
        )
        session.add(run)
        add_tracking_links(session, run, body.tracking)
        if idempotency_key is not None:
            idempotency.remember(session, principal.project_id, RUN_ENDPOINT, idempotency_key, req_hash, run.id, 201)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        return run, False
    raise Conflict("could not create the run because of concurrent requests; retry", code="concurrent_update")


# --------------------------------------------------------------------------- rounds


def _rolled_back_since(session: Session, run: Run, latest: Round) -> bool:
    """The head was rolled back after `latest` was created: a failed latest round no longer blocks."""
    move = session.exec(
        select(HeadMove)
        .where(HeadMove.run_id == run.id, HeadMove.reason == "rollback")
        .order_by(col(HeadMove.id).desc())
    ).first()
    return move is not None and move.created_at >= latest.created_at


def create_round(
    session: Session,
    settings: Settings,
    principal: Principal,
    run_id: str,
    body: RoundCreate,
    idempotency_key: str | None,
) -> tuple[Round, Job, bool]:
    """Validate and submit a round. Returns (round, job, replayed)."""
    req_hash = idempotency.request_hash(ROUND_ENDPOINT, run_id, body.model_dump(mode="json", exclude_unset=True))
    run = get_run(session, principal, run_id)

    def replay() -> tuple[Round, Job, bool] | None:
        if idempotency_key is None:
            return None
        record = idempotency.lookup(
            session, principal.project_id, ROUND_ENDPOINT, idempotency_key, req_hash, settings.idempotency_ttl_hours
        )
        if record is None:
            return None
        rnd = session.get(Round, record.resource_id)
        job = session.get(Job, rnd.job_id) if rnd is not None else None
        if rnd is None or job is None:
            raise RuntimeError(f"idempotency record {record.id} points at a missing round")
        session.commit()
        return rnd, job, True

    if (done := replay()) is not None:
        return done

    # Explicit parent: ownership first (cheap), the checkpoint's files last (see below).
    explicit: Checkpoint | None = None
    if body.parent_checkpoint_id is not None:
        explicit = get_owned(
            session, Checkpoint, body.parent_checkpoint_id, principal.project_id, "checkpoint", "parent_checkpoint_id"
        )
        if explicit.run_id != run.id:
            raise not_found("checkpoint", body.parent_checkpoint_id, "parent_checkpoint_id")
        require_continuable(explicit, "parent_checkpoint_id")

    loss, hp, conversion, lora = effective_config(run, body, settings)
    files = feedback_files(session, principal, body.feedback_ids)
    check_loss_feedback(loss.name, files, conversion)
    if body.gate and not any(f.n_test for f in files) and hp.eval_fraction <= 0:
        raise Unprocessable(
            "a gate compares eval metrics: the round needs an eval set (records with "
            '"split": "test" or hyperparams.eval_fraction > 0)',
            code="gate_without_eval_set",
            details={"field": "gate"},
        )
    if explicit is not None:
        # Complete (meta.json readable) and compatible; its files are NOT hashed here (tens of GB in
        # a request): the trainer verifies them when it loads the checkpoint and fails the job with
        # the CheckpointError text. The read transaction ends first (SQLite: BEGIN IMMEDIATE).
        session.commit()
        manifest = parent_manifest(explicit.path)
        check_parent_params(checkpoint_params(manifest), loss.name, lora, {"parent_checkpoint_id": explicit.id})
    model = session.get(Model, run.model_id)
    if model is None:  # FK-enforced; only a hand-edited database gets here
        raise Conflict(f"the run's model {run.model_id} is gone", code="model_missing")
    data_dir = settings.data_dir.resolve()

    for _ in range(3):
        if (done := replay()) is not None:
            return done
        latest = session.exec(select(Round).where(Round.run_id == run.id).order_by(col(Round.index).desc())).first()
        index = latest.index + 1 if latest else 1
        parent_round_id: str | None = None
        parent_job_id: str | None = None
        parent_ckpt: Checkpoint | None = None
        if explicit is not None:
            parent_ckpt, parent_round_id = explicit, explicit.round_id
        elif latest is not None:
            parent_round_id = latest.id
            parent_job = session.get(Job, latest.job_id)
            status = parent_job.status if parent_job is not None else None
            if parent_job is not None and status in UNFINISHED_STATUSES:
                parent_job_id = latest.job_id
                check_parent_params(
                    job_params(parent_job),
                    loss.name,
                    lora,
                    {"parent_job_id": parent_job.id, "round_index": latest.index},
                )
            elif status == JobStatus.succeeded or _rolled_back_since(session, run, latest):
                if status == JobStatus.succeeded and latest.checkpoint_id is None:
                    raise Conflict(
                        f"round {latest.index} succeeded but has no registered checkpoint",
                        code="parent_checkpoint_missing",
                        details={"round_index": latest.index, "job_id": latest.job_id},
                    )
                parent_ckpt = head_checkpoint(session, run)
                if parent_ckpt is not None:
                    require_continuable(parent_ckpt, "parent_checkpoint_id")
                    parent_round_id = parent_ckpt.round_id
                    manifest = parent_manifest(parent_ckpt.path)
                    head_round = session.get(Round, parent_ckpt.round_id)
                    check_parent_params(
                        checkpoint_params(manifest),
                        loss.name,
                        lora,
                        {
                            "parent_checkpoint_id": parent_ckpt.id,
                            "round_index": head_round.index if head_round else None,
                        },
                    )
            else:
                raise parent_round_failed(latest, status_text(parent_job))

        job = Job(
            project_id=principal.project_id,
            kind="round",
            max_attempts=settings.max_attempts,
            parent_job_id=parent_job_id,
        )
        job.run_dir = str(settings.runs_dir.resolve() / job.id)
        spec = round_spec(
            model=model,
            parent=parent_ckpt,
            files=files,
            data_dir=data_dir,
            loss=loss,
            hyperparams=hp,
            conversion=conversion,
            lora=lora,
            gate=body.gate,
        )
        job.spec = spec.model_dump(mode="json")
        check_admission(session, spec, settings)  # 507 before anything is inserted
        rnd = Round(
            project_id=principal.project_id,
            run_id=run.id,
            index=index,
            job_id=job.id,
            parent_round_id=parent_round_id,
            parent_checkpoint_id=parent_ckpt.id if parent_ckpt else None,
            feedback_ids=[f.id for f in files],
            loss=job.spec["loss"],
            hyperparams=job.spec["hyperparams"],
            conversion=job.spec["conversion"],
            gate=job.spec["gate"],
        )
        session.add(rnd)
        if idempotency_key is not None:
            idempotency.remember(session, principal.project_id, ROUND_ENDPOINT, idempotency_key, req_hash, rnd.id, 201)
        try:
            job = _submit(session, job, settings)  # inserts the job and commits the round with it
        except IntegrityError:
            session.rollback()  # a concurrent round took this index, or the same key won: look again
            continue
        except ParentFailed as exc:  # the parent failed between the check above and the insert
            assert latest is not None  # only a job with a parent (the latest round's) is refused
            raise parent_round_failed(latest, exc.status) from exc
        session.commit()  # end the read transaction submit's refresh opened (SQLite: it holds the write lock)
        if job.status == JobStatus.queued:
            try:
                _publish(job.id, settings)
            except Exception:  # the sweeper republishes queued jobs nobody holds
                log.exception("publishing job %s failed; the sweeper will retry", job.id)
        return rnd, job, False
    raise Conflict("could not create the round because of concurrent requests; retry", code="concurrent_update")

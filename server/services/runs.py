"""Runs and rounds: everything a round needs is validated here, at submit time, never on a GPU.

A round request is checked against the run's defaults merged with its overrides:
- every feedback id exists in the project (404 `feedback_not_found`, naming `feedback_ids[i]`);
- the loss is a known one (the pydantic discriminated union answers 422 for an unknown `name`);
- the loss can use the feedback kinds after the conversion (422 `loss_feedback_mismatch`);
- (runs) LoRA `target_modules` match a module of the model, when its safetensors headers tell
  (422 `lora_not_applicable`);
- the hyperparameters are valid and fit the workers (batch divisible by microbatch x
  num_processes, KTO microbatch >= 2, …: 422 `invalid_hyperparams`);
- an explicit parent checkpoint belongs to this run (else 404) and is complete: its `meta.json`
  is readable (422 `invalid_parent_checkpoint` with the CheckpointError text), checked after the
  cheap checks above; its files are not hashed in the request — the trainer verifies them when it
  loads the checkpoint and fails the job with the CheckpointError text;
- the parent (explicit, or the default below) trains the same parameters as this round, which is
  what the trainer's `check_compatible` refuses on the worker: LoRA vs full weights, other LoRA
  r/alpha/target_modules, another head (`bradley_terry` trains a reward head, `ppo` a value head,
  the other losses none). Read from the checkpoint's trainer_state.json (else meta.json), or for
  a parent still unfinished from its job spec (422 `parent_checkpoint_incompatible`, field `loss`
  for a head, else `parent_checkpoint_id`);
- the default parent is the run's latest round: succeeded ⇒ its final checkpoint; still
  waiting/queued/running ⇒ the new job waits for it (`parent_job_id`; jobs.submit makes it
  `waiting`); failed/cancelled ⇒ 409 `parent_round_failed` (submit with an explicit
  `parent_checkpoint_id` to branch from an earlier checkpoint instead);
- finally a `halos_core.config.RunConfig` is built from the job spec once, so what the worker
  will build cannot fail validation.
Then Round + Job (+ idempotency record) are committed in one transaction by `jobs.submit`, and
the job id is published to the queue after the commit (only when it is `queued`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from halos_core.config import (
    LOSS_HEAD_KIND,
    Conversion,
    Hyperparams,
    LoraSettings,
    LossConfig,
    RunConfig,
    hyperparams_problem,
    lora_structure,
    loss_feedback_problem,
)
from halos_core.run_dir import CheckpointError, Manifest, read_manifest
from server.errors import Conflict, Unprocessable, not_found, validation_details
from server.jobs import ParentFailed
from server.models import Checkpoint, FeedbackFile, Job, JobStatus, Model, Round, Run
from halos_client.models import RoundCreate, RoundOut, RunCreate, RunOut, RunSummary
from server.services import idempotency
from server.services.common import get_owned, paginate
from server.services.models_registry import lora_target_problem
from server.services.keys import Principal
from server.settings import Settings

log = logging.getLogger("halos.runs")

RUN_ENDPOINT = "POST /v1/runs"
ROUND_ENDPOINT = "POST /v1/runs/{run_id}/rounds"

_LOSS = TypeAdapter(LossConfig)
_CONVERSION = TypeAdapter(Conversion)
_UNFINISHED = {JobStatus.waiting, JobStatus.queued, JobStatus.running, JobStatus.cancelling, JobStatus.crashed}


# --------------------------------------------------------------------------- seams to jobs/queue


def _submit(session: Session, job: Job, settings: Settings) -> Job:
    from server import jobs

    # a parent that failed since the check below: ParentFailed (→ 409), nothing inserted
    return jobs.submit(session, job, max_attempts=settings.max_attempts, refuse_failed_parent=True)


def _publish(job_id: str, settings: Settings) -> None:
    from server import queue

    queue.publish(job_id, settings)  # logs and swallows broker errors (the sweeper republishes)


# --------------------------------------------------------------------------- views


def _status(job: Job | None) -> str:
    if job is None:
        return "unknown"
    return job.status.value if isinstance(job.status, JobStatus) else str(job.status)


def round_views(session: Session, rounds: list[Round]) -> list[RoundOut]:
    if not rounds:
        return []
    job_ids = [r.job_id for r in rounds]
    jobs = {j.id: j for j in session.exec(select(Job).where(col(Job.id).in_(job_ids))).all()}
    round_ids = [r.id for r in rounds]
    ckpt_by_round: dict[str, Checkpoint] = {}
    for c in session.exec(select(Checkpoint).where(col(Checkpoint.round_id).in_(round_ids))).all():
        best = ckpt_by_round.get(c.round_id)
        if best is None or (c.step, c.created_at) > (best.step, best.created_at):
            ckpt_by_round[c.round_id] = c
    by_id = {r.id: r for r in rounds}
    out = []
    for r in rounds:
        job = jobs.get(r.job_id)
        checkpoint_id = r.checkpoint_id or (ckpt_by_round[r.id].id if r.id in ckpt_by_round else None)
        parent_ckpt = r.parent_checkpoint_id
        if parent_ckpt is None and job is not None and isinstance(job.spec, dict):
            parent_ckpt = job.spec.get("init_from_checkpoint_id")
        if parent_ckpt is None and r.parent_round_id:
            parent = by_id.get(r.parent_round_id)
            if parent is not None:
                parent_ckpt = parent.checkpoint_id or (
                    ckpt_by_round[parent.id].id if parent.id in ckpt_by_round else None
                )
        out.append(
            RoundOut(
                index=r.index, round_id=r.id, run_id=r.run_id, job_id=r.job_id, status=_status(job),
                parent_checkpoint_id=parent_ckpt, parent_job_id=job.parent_job_id if job else None,
                checkpoint_id=checkpoint_id, feedback_ids=list(r.feedback_ids or []), loss=dict(r.loss or {}),
                hyperparams=dict(r.hyperparams or {}), conversion=r.conversion, created_at=r.created_at,
            )
        )
    return out


def round_view(session: Session, rnd: Round) -> RoundOut:
    # Include the siblings so the parent's checkpoint can be resolved for a waiting round.
    rounds = [rnd]
    if rnd.parent_round_id:
        parent = session.get(Round, rnd.parent_round_id)
        if parent is not None:
            rounds.insert(0, parent)
    return round_views(session, rounds)[-1]


def run_view(session: Session, run: Run) -> RunOut:
    rounds = list(session.exec(select(Round).where(Round.run_id == run.id).order_by(Round.index)).all())
    return RunOut(
        id=run.id, name=run.name, model_id=run.model_id, loss=dict(run.loss or {}),
        hyperparams=dict(run.hyperparams or {}), conversion=run.conversion, lora=run.lora,
        created_at=run.created_at, rounds=round_views(session, rounds),
    )


def run_summary(run: Run) -> RunSummary:
    return RunSummary(id=run.id, name=run.name, model_id=run.model_id, loss=dict(run.loss or {}), created_at=run.created_at)


# --------------------------------------------------------------------------- runs


def get_run(session: Session, principal: Principal, run_id: str) -> Run:
    return get_owned(session, Run, run_id, principal.project_id, "run")


def list_runs(session: Session, principal: Principal, limit: int, cursor: str | None) -> tuple[list[Run], str | None]:
    return paginate(session, Run, principal.project_id, limit, cursor)


def _hyperparams_check(loss_name: str, hp: Hyperparams, settings: Settings, field: str = "hyperparams") -> None:
    problem = hyperparams_problem(loss_name, hp, settings.num_processes)
    if problem:
        raise Unprocessable(problem, code="invalid_hyperparams",
                            details={"field": field, "reason": problem, "num_processes": settings.num_processes})


def create_run(session: Session, settings: Settings, principal: Principal, body: RunCreate,
               idempotency_key: str | None) -> tuple[Run, bool]:
    """Create a run. Returns (run, replayed)."""
    req_hash = idempotency.request_hash(RUN_ENDPOINT, body.model_dump(mode="json", exclude_unset=True))
    for _ in range(3):
        if idempotency_key is not None:
            record = idempotency.lookup(session, principal.project_id, RUN_ENDPOINT, idempotency_key, req_hash,
                                        settings.idempotency_ttl_hours)
            if record is not None:
                run = get_run(session, principal, record.resource_id or "")
                session.commit()
                return run, True
        model = get_owned(session, Model, body.model_id, principal.project_id, "model", field="model_id")
        _hyperparams_check(body.loss.name, body.hyperparams, settings)
        if body.lora is not None and settings.fsdp:
            problem = "LoRA runs are not supported with FSDP workers (HALOS_FSDP=true); use DDP or full fine-tuning"
            raise Unprocessable(problem, code="lora_not_supported", details={"field": "lora", "reason": problem})
        if body.lora is not None and (problem := lora_target_problem(model.path, body.lora.target_modules)):
            raise Unprocessable(problem, code="lora_not_applicable",
                                details={"field": "lora.target_modules", "reason": problem})
        run = Run(
            project_id=principal.project_id, name=body.name, model_id=body.model_id,
            loss=body.loss.model_dump(mode="json"), hyperparams=body.hyperparams.model_dump(mode="json"),
            conversion=body.conversion.model_dump(mode="json") if body.conversion else None,
            lora=body.lora.model_dump(mode="json") if body.lora else None,
        )
        session.add(run)
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


def _effective_config(run: Run, body: RoundCreate, settings: Settings) -> tuple[Any, Hyperparams, Any, Any]:
    """(loss, hyperparams, conversion, lora) for a round: the run's defaults + the round's overrides."""
    try:
        loss = body.loss if body.loss is not None else _LOSS.validate_python(run.loss)
    except ValidationError as exc:  # a run stored by an older version
        raise Unprocessable("the run's stored loss is no longer valid; pass `loss`", code="invalid_loss",
                            details={"field": "loss", **validation_details(exc.errors())}) from exc
    patch = body.hyperparams.model_dump(exclude_unset=True) if body.hyperparams is not None else {}
    try:
        hp = Hyperparams.model_validate({**(run.hyperparams or {}), **patch})
    except ValidationError as exc:
        raise Unprocessable("the merged hyperparameters are invalid", code="invalid_hyperparams",
                            details={"field": "hyperparams", **validation_details(exc.errors())}) from exc
    if "conversion" in body.model_fields_set:
        conversion = body.conversion
    else:
        conversion = _CONVERSION.validate_python(run.conversion) if run.conversion else None
    lora = LoraSettings.model_validate(run.lora) if run.lora else None
    _hyperparams_check(loss.name, hp, settings)
    return loss, hp, conversion, lora


def _feedback_files(session: Session, principal: Principal, ids: list[str]) -> list[FeedbackFile]:
    seen: dict[str, int] = {}
    for i, fid in enumerate(ids):
        if fid in seen:
            raise Unprocessable(f"feedback id {fid!r} is listed twice", code="duplicate_feedback_id",
                                details={"field": f"feedback_ids[{i}]", "id": fid})
        seen[fid] = i
    return [get_owned(session, FeedbackFile, fid, principal.project_id, "feedback", field=f"feedback_ids[{i}]")
            for i, fid in enumerate(ids)]


def _verify_checkpoint(path: str, verify: bool, field: str) -> Any:
    try:
        return read_manifest(path, verify=verify)
    except (CheckpointError, OSError, ValueError) as exc:
        raise Unprocessable(str(exc)[:2000], code="invalid_parent_checkpoint", details={"field": field}) from exc


TRAINER_STATE_FILE = "trainer_state.json"  # halos_core.checkpoint.STATE_FILE (that module imports torch)


def _trained_params(loss_name: str, lora: LoraSettings | None) -> dict[str, Any]:
    """What a round trains besides the base weights, in the trainer's terms (see check_compatible)."""
    return {"lora": lora_structure(lora) if lora is not None else None, "head": LOSS_HEAD_KIND.get(loss_name)}


def _checkpoint_params(manifest: Manifest) -> dict[str, Any]:
    """What a checkpoint trained, as its trainer recorded it: trainer_state.json's `lora` (the
    structure) and `head.kind`, else meta.json's `lora` (a bool) and `head` (the kind). Keys that
    neither records are left out: not checked here (the worker still checks)."""
    state: dict[str, Any] = {}
    try:
        loaded = json.loads((manifest.path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            state = loaded
    except (OSError, ValueError):
        pass
    found: dict[str, Any] = {}
    if "lora" in state:
        found["lora"] = state["lora"]
    elif isinstance(manifest.extra.get("lora"), bool):
        found["lora_used"] = manifest.extra["lora"]
    if "head" in state:
        head = state["head"]
        found["head"] = head.get("kind") if isinstance(head, dict) else head
    elif "head" in manifest.extra:
        found["head"] = manifest.extra["head"]
    if "loss" in state:
        found["loss"] = state["loss"]
    return found


def _job_params(job: Job) -> dict[str, Any]:
    """What an unfinished parent round will train, from its job spec (its checkpoint does not exist yet)."""
    spec = job.spec if isinstance(job.spec, dict) else {}
    try:
        loss_name = str(spec["loss"]["name"])
        lora = LoraSettings.model_validate(spec["lora"]) if spec.get("lora") else None
    except (KeyError, TypeError, ValidationError):
        return {}
    return {**_trained_params(loss_name, lora), "loss": loss_name}


def _check_parent_params(have: dict[str, Any], loss_name: str, lora: LoraSettings | None,
                         parent: dict[str, Any]) -> None:
    """422 `parent_checkpoint_incompatible` when the parent trained other parameters than this round
    would: the worker would refuse to continue its weights and optimizer state."""
    want = _trained_params(loss_name, lora)
    what = lambda x: "full weights" if not x else f"LoRA {x}" if isinstance(x, dict) else "LoRA"  # noqa: E731
    if "parent_checkpoint_id" in parent:
        where = f"checkpoint {parent['parent_checkpoint_id']}" + (
            f" (round {parent['round_index']})" if "round_index" in parent else "")
    else:
        where = f"round {parent.get('round_index')} (job {parent.get('parent_job_id')}, not finished yet)"
    if "lora" in have or "lora_used" in have:
        differs = have["lora"] != want["lora"] if "lora" in have else have["lora_used"] != (lora is not None)
        if differs:
            have_lora = have["lora"] if "lora" in have else have["lora_used"]
            raise Unprocessable(
                f"the parent {where} trains {what(have_lora)}; this round trains "
                f"{what(want['lora'])} (the run's `lora`): its weights and optimizer state cannot be continued."
                " Pass a `parent_checkpoint_id` trained with the run's settings, or start a new run.",
                code="parent_checkpoint_incompatible",
                details={"field": "parent_checkpoint_id", "reason": "lora", "parent": parent,
                         "parent_lora": have_lora, "round_lora": want["lora"]},
            )
    if "head" in have and have["head"] != want["head"]:
        have_head, want_head = have["head"], want["head"]
        parent_loss = have.get("loss")
        raise Unprocessable(
            f"the parent {where} trains {'a ' + str(have_head) + ' head' if have_head else 'no head'}"
            + (f" (loss {parent_loss!r})" if parent_loss else "")
            + f"; loss {loss_name!r} trains {'a ' + want_head + ' head' if want_head else 'no head'}: its weights"
            " and optimizer state cannot be continued. Use a loss that trains the same head (reward:"
            " bradley_terry; value: ppo; none: every other loss), or start a new run for this loss.",
            code="parent_checkpoint_incompatible",
            details={"field": "loss", "reason": "head", "parent": parent, "parent_head": have_head,
                     "round_head": want_head, "parent_loss": parent_loss, "loss": loss_name},
        )


def _latest_checkpoint_of_round(session: Session, rnd: Round) -> Checkpoint | None:
    if rnd.checkpoint_id:
        ckpt = session.get(Checkpoint, rnd.checkpoint_id)
        if ckpt is not None:
            return ckpt
    return session.exec(
        select(Checkpoint).where(Checkpoint.round_id == rnd.id).order_by(col(Checkpoint.step).desc(),
                                                                           col(Checkpoint.created_at).desc())
    ).first()


def _parent_round_failed(latest: Round, status: str) -> Conflict:
    return Conflict(
        f"the run's latest round ({latest.index}) ended {status}; a new round cannot start"
        " from it. Pass `parent_checkpoint_id` to continue from an earlier checkpoint.",
        code="parent_round_failed",
        details={"round_index": latest.index, "job_id": latest.job_id, "status": status},
    )


def create_round(session: Session, settings: Settings, principal: Principal, run_id: str, body: RoundCreate,
                 idempotency_key: str | None) -> tuple[Round, Job, bool]:
    """Validate and submit a round. Returns (round, job, replayed)."""
    req_hash = idempotency.request_hash(ROUND_ENDPOINT, run_id, body.model_dump(mode="json", exclude_unset=True))
    run = get_run(session, principal, run_id)

    def replay() -> tuple[Round, Job, bool] | None:
        if idempotency_key is None:
            return None
        record = idempotency.lookup(session, principal.project_id, ROUND_ENDPOINT, idempotency_key, req_hash,
                                    settings.idempotency_ttl_hours)
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
        explicit = get_owned(session, Checkpoint, body.parent_checkpoint_id, principal.project_id, "checkpoint",
                             "parent_checkpoint_id")
        if explicit.run_id != run.id:
            raise not_found("checkpoint", body.parent_checkpoint_id, "parent_checkpoint_id")

    loss, hp, conversion, lora = _effective_config(run, body, settings)
    files = _feedback_files(session, principal, body.feedback_ids)
    problem = loss_feedback_problem(loss.name, [f.kind for f in files], conversion)
    if problem:
        raise Unprocessable(problem, code="loss_feedback_mismatch",
                            details={"field": "loss", "reason": problem, "feedback_kinds": [f.kind for f in files]})
    if explicit is not None:
        # Complete (meta.json readable) and compatible; its files are NOT hashed here (tens of GB in
        # a request): the trainer verifies them when it loads the checkpoint and fails the job with
        # the CheckpointError text. The read transaction ends first (SQLite: BEGIN IMMEDIATE).
        session.commit()
        manifest = _verify_checkpoint(explicit.path, verify=False, field="parent_checkpoint_id")
        _check_parent_params(_checkpoint_params(manifest), loss.name, lora, {"parent_checkpoint_id": explicit.id})
    model = session.get(Model, run.model_id)
    if model is None:  # FK-enforced; only a hand-edited database gets here
        raise Conflict(f"the run's model {run.model_id} is gone", code="model_missing")
    data_dir = settings.data_dir.resolve()
    feedback_inputs = [{"path": str(data_dir / f.storage_path), "kind": f.kind, "file_id": f.id} for f in files]

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
            if status == JobStatus.succeeded:
                parent_ckpt = _latest_checkpoint_of_round(session, latest)
                if parent_ckpt is None:
                    raise Conflict(
                        f"round {latest.index} succeeded but has no registered checkpoint",
                        code="parent_checkpoint_missing", details={"round_index": latest.index, "job_id": latest.job_id},
                    )
                manifest = _verify_checkpoint(parent_ckpt.path, verify=False, field="parent_checkpoint_id")
                _check_parent_params(_checkpoint_params(manifest), loss.name, lora,
                                     {"parent_checkpoint_id": parent_ckpt.id, "round_index": latest.index})
            elif status in _UNFINISHED:
                parent_job_id = latest.job_id
                if parent_job is not None:
                    _check_parent_params(_job_params(parent_job), loss.name, lora,
                                         {"parent_job_id": parent_job.id, "round_index": latest.index})
            else:
                raise _parent_round_failed(latest, _status(parent_job))

        job = Job(project_id=principal.project_id, kind="round", max_attempts=settings.max_attempts,
                  parent_job_id=parent_job_id)
        job.run_dir = str(settings.runs_dir.resolve() / job.id)
        spec: dict[str, Any] = {
            "reference_path": model.path,
            "reference_sha256": model.sha256,
            "init_from": parent_ckpt.path if parent_ckpt else None,
            "init_from_checkpoint_id": parent_ckpt.id if parent_ckpt else None,
            "counters": {"step": parent_ckpt.step, "examples": parent_ckpt.examples} if parent_ckpt
            else {"step": 0, "examples": 0},
            "feedback": feedback_inputs,
            "loss": loss.model_dump(mode="json"),
            "conversion": conversion.model_dump(mode="json") if conversion is not None else None,
            "hyperparams": hp.model_dump(mode="json"),
            "lora": lora.model_dump(mode="json") if lora is not None else None,
        }
        try:
            RunConfig.model_validate(
                {"job_id": job.id, "run_dir": job.run_dir, **{k: v for k, v in spec.items() if k != "init_from_checkpoint_id"}}
            )
        except ValidationError as exc:
            raise Unprocessable("the round's configuration is invalid", code="invalid_round_config",
                                details=validation_details(exc.errors())) from exc
        job.spec = spec
        rnd = Round(
            project_id=principal.project_id, run_id=run.id, index=index, job_id=job.id,
            parent_round_id=parent_round_id, parent_checkpoint_id=parent_ckpt.id if parent_ckpt else None,
            feedback_ids=[f.id for f in files], loss=spec["loss"], hyperparams=spec["hyperparams"],
            conversion=spec["conversion"],
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
            raise _parent_round_failed(latest, exc.status) from exc
        session.commit()  # end the read transaction submit's refresh opened (SQLite: it holds the write lock)
        if job.status == JobStatus.queued:
            try:
                _publish(job.id, settings)
            except Exception:  # the sweeper republishes queued jobs nobody holds
                log.exception("publishing job %s failed; the sweeper will retry", job.id)
        return rnd, job, False
    raise Conflict("could not create the round because of concurrent requests; retry", code="concurrent_update")


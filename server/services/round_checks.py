"""Submit-time checks of run and round requests: everything a round needs is validated here, at
submit time, never on a GPU. Each check raises the API error a client sees.

- every feedback id exists in the project (404 `feedback_not_found`, naming `feedback_ids[i]`);
- the loss is a known one (the pydantic discriminated union answers 422 for an unknown `name`);
- the loss can use the feedback kinds after the conversion (422 `loss_feedback_mismatch`);
- the round fits the workers (`halos_core.job_spec.fit_problem` with the API's settings: at most
  `max_nodes` nodes, batch divisible by microbatch x num_processes x nodes, the loss's batch
  constraints, no LoRA with FSDP;
  422 `invalid_hyperparams` / `lora_not_supported`); the worker asks the same question again at
  claim time with its own settings;
- an explicit parent checkpoint is complete: its `meta.json` is readable (422
  `invalid_parent_checkpoint` with the CheckpointError text); its files are not hashed in the
  request — the trainer verifies them when it loads the checkpoint;
- the parent trains the same parameters as this round (`halos_core.compat`, the rule the trainer
  applies when it loads the checkpoint): 422 `parent_checkpoint_incompatible`, field `loss` for a
  head, else `parent_checkpoint_id`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlmodel import Session

from halos_client.models import RoundCreate
from halos_core.compat import TrainedParams, incompatibility, recorded_params, round_params
from halos_core.config import Conversion, Hyperparams, LoraSettings
from halos_core.job_spec import LORA_FSDP_PROBLEM, hyperparams_problem
from halos_core.loss_registry import LossConfig, loss_feedback_problem
from halos_core.run_dir import CheckpointError, Manifest, read_manifest
from server.errors import Conflict, Unprocessable, validation_details
from server.models import FeedbackFile, Job, Round, Run
from server.services.common import get_owned, refuse_deleted
from server.services.keys import Principal
from server.settings import Settings

_LOSS: TypeAdapter[Any] = TypeAdapter(LossConfig)
_CONVERSION: TypeAdapter[Any] = TypeAdapter(Conversion)

TRAINER_STATE_FILE = "trainer_state.json"  # halos_core.checkpoint.STATE_FILE (that module imports torch)


def check_hyperparams(loss_name: str, hp: Hyperparams, settings: Settings, field: str = "hyperparams") -> None:
    if hp.nodes > settings.max_nodes:
        # a gang that can never form would hold workers until it times out, again and again
        reason = (
            f"nodes {hp.nodes} is more than this deployment runs one round on (HALOS_MAX_NODES={settings.max_nodes})"
        )
        raise Unprocessable(
            reason,
            code="invalid_hyperparams",
            details={"field": f"{field}.nodes", "reason": reason, "max_nodes": settings.max_nodes},
        )
    problem = hyperparams_problem(loss_name, hp, settings.num_processes)
    if problem:
        raise Unprocessable(
            problem,
            code="invalid_hyperparams",
            details={"field": field, "reason": problem, "num_processes": settings.num_processes},
        )


def check_lora_fits(lora: LoraSettings | None, settings: Settings) -> None:
    if lora is not None and settings.fsdp:
        raise Unprocessable(
            LORA_FSDP_PROBLEM, code="lora_not_supported", details={"field": "lora", "reason": LORA_FSDP_PROBLEM}
        )


def effective_config(
    run: Run, body: RoundCreate, settings: Settings
) -> tuple[Any, Hyperparams, Any, LoraSettings | None]:
    """(loss, hyperparams, conversion, lora) for a round: the run's defaults + the round's overrides."""
    try:
        loss = body.loss if body.loss is not None else _LOSS.validate_python(run.loss)
    except ValidationError as exc:  # a run stored by an older version
        raise Unprocessable(
            "the run's stored loss is no longer valid; pass `loss`",
            code="invalid_loss",
            details={"field": "loss", **validation_details(exc.errors())},
        ) from exc
    patch: dict[str, Any] = body.hyperparams.model_dump(exclude_unset=True) if body.hyperparams is not None else {}
    try:
        hp = Hyperparams.model_validate({**(run.hyperparams or {}), **patch})
    except ValidationError as exc:
        raise Unprocessable(
            "the merged hyperparameters are invalid",
            code="invalid_hyperparams",
            details={"field": "hyperparams", **validation_details(exc.errors())},
        ) from exc
    if "conversion" in body.model_fields_set:
        conversion = body.conversion
    else:
        conversion = _CONVERSION.validate_python(run.conversion) if run.conversion else None
    lora = LoraSettings.model_validate(run.lora) if run.lora else None
    check_hyperparams(loss.name, hp, settings)
    return loss, hp, conversion, lora


def feedback_files(session: Session, principal: Principal, ids: list[str]) -> list[FeedbackFile]:
    seen: dict[str, int] = {}
    for i, fid in enumerate(ids):
        if fid in seen:
            raise Unprocessable(
                f"feedback id {fid!r} is listed twice",
                code="duplicate_feedback_id",
                details={"field": f"feedback_ids[{i}]", "id": fid},
            )
        seen[fid] = i
    out = []
    for i, fid in enumerate(ids):
        fb = get_owned(session, FeedbackFile, fid, principal.project_id, "feedback", field=f"feedback_ids[{i}]")
        refuse_deleted(fb, "feedback", f"feedback_ids[{i}]")
        out.append(fb)
    return out


def check_loss_feedback(loss_name: str, files: list[FeedbackFile], conversion: Any) -> None:
    kinds = [f.kind for f in files]
    problem = loss_feedback_problem(loss_name, kinds, conversion)
    if problem:
        raise Unprocessable(
            problem,
            code="loss_feedback_mismatch",
            details={"field": "loss", "reason": problem, "feedback_kinds": kinds},
        )


def parent_manifest(path: str, field: str = "parent_checkpoint_id") -> Manifest:
    """A parent checkpoint's manifest (its files are not hashed: the trainer verifies them)."""
    try:
        return read_manifest(path, verify=False)
    except (CheckpointError, OSError, ValueError) as exc:
        raise Unprocessable(str(exc)[:2000], code="invalid_parent_checkpoint", details={"field": field}) from exc


def checkpoint_params(manifest: Manifest) -> TrainedParams:
    """What a checkpoint trained, as its trainer recorded it (trainer_state.json, else meta.json)."""
    state: dict[str, Any] = {}
    try:
        loaded = json.loads((manifest.path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            state = loaded
    except (OSError, ValueError):
        pass
    return recorded_params(state, manifest.extra)


def job_params(job: Job) -> TrainedParams:
    """What an unfinished parent round will train, from its job spec (its checkpoint does not exist yet)."""
    spec = job.spec if isinstance(job.spec, dict) else {}
    try:
        loss_name = str(spec["loss"]["name"])
        lora = LoraSettings.model_validate(spec["lora"]) if spec.get("lora") else None
        return round_params(loss_name, lora)
    except (KeyError, TypeError, ValueError):
        return TrainedParams()  # nothing known: the worker still checks


def check_parent_params(have: TrainedParams, loss_name: str, lora: LoraSettings | None, parent: dict[str, Any]) -> None:
    """422 `parent_checkpoint_incompatible` when the parent trained other parameters than this round
    would: the worker would refuse to continue its weights and optimizer state."""
    problem = incompatibility(have, round_params(loss_name, lora))
    if problem is None:
        return
    if "parent_checkpoint_id" in parent:
        where = f"checkpoint {parent['parent_checkpoint_id']}" + (
            f" (round {parent['round_index']})" if "round_index" in parent else ""
        )
    else:
        where = f"round {parent.get('round_index')} (job {parent.get('parent_job_id')}, not finished yet)"
    if problem.reason == "lora":
        details = {
            "field": "parent_checkpoint_id",
            "reason": "lora",
            "parent": parent,
            "parent_lora": problem.have,
            "round_lora": problem.want,
        }
    else:
        details = {
            "field": "loss",
            "reason": "head",
            "parent": parent,
            "parent_head": problem.have,
            "round_head": problem.want,
            "parent_loss": problem.parent_loss,
            "loss": loss_name,
        }
    raise Unprocessable(problem.message(where), code="parent_checkpoint_incompatible", details=details)


def parent_round_failed(latest: Round, status: str) -> Conflict:
    return Conflict(
        f"the run's latest round ({latest.index}) ended {status}; a new round cannot start"
        " from it. Pass `parent_checkpoint_id` to continue from an earlier checkpoint.",
        code="parent_round_failed",
        details={"round_index": latest.index, "job_id": latest.job_id, "status": status},
    )

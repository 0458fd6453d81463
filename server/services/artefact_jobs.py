"""Submitting sampling and labelling jobs: resolve and check every input now (4xx at submit, never
on a worker), build the job's spec (`halos_core.artefact_spec`), insert the job through the state
machine (`jobs.submit`) and publish it — the same machinery as a round.

Sampling: the generator is a checkpoint (of any run of the project), a registered model, or a run
(its head at submit time, recorded in the spec and, later, in the samples' provenance); n × prompts
above `max_samples_per_job` ⇒ 422. Labelling: the samples must be a `sampled` feedback file and the
reward model a checkpoint with a reward head (a `bradley_terry` round's), else 422.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlmodel import Session

from halos_client.models import LabellingJobCreate, SamplingJobCreate
from halos_core.artefact_spec import (
    Generator,
    LabelSpec,
    PromptsInput,
    RewardModel,
    SamplesInput,
    SampleSpec,
)
from server import jobs
from server.errors import Unprocessable
from server.jobs.head import head_checkpoint
from server.models import Checkpoint, FeedbackFile, Job, JobStatus, Model, PromptSet, Round, Run
from server.services.common import get_owned, refuse_deleted
from server.services.keys import Principal
from server.services.round_checks import checkpoint_params, parent_manifest
from server.settings import Settings
from server.storage_lifecycle.retention import require_weights

log = logging.getLogger("halos.jobs")

ADAPTER_DIR = "adapter"  # halos_core.lora.ADAPTER_DIR (that module imports torch)


def _submit(session: Session, settings: Settings, principal: Principal, kind: str, spec: Any) -> Job:
    job = Job(project_id=principal.project_id, kind=kind, max_attempts=settings.max_attempts)
    job.run_dir = str(settings.runs_dir.resolve() / job.id)
    job.spec = spec.model_dump(mode="json")
    job = jobs.submit(session, job, max_attempts=settings.max_attempts)
    session.commit()
    if job.status == JobStatus.queued:
        from server import queue

        try:
            queue.publish(job.id, settings)
        except Exception:  # the sweeper republishes queued jobs nobody holds
            log.exception("publishing job %s failed; the sweeper will retry", job.id)
    return job


def _checkpoint_generator(session: Session, ckpt: Checkpoint, field: str) -> Generator:
    model = session.get(Model, ckpt.model_id)
    assert model is not None  # FK-enforced
    require_weights(ckpt, field)
    manifest = parent_manifest(ckpt.path, field)
    lora_unmerged = bool(manifest.extra.get("lora")) and not manifest.extra.get("merged")
    if lora_unmerged:  # adapter only: generate with the base (the run's SFT model) + the adapter
        return Generator(
            model_path=model.path,
            base_path=model.path,
            adapter_path=str(Path(ckpt.path) / ADAPTER_DIR),
            checkpoint_id=ckpt.id,
            model_id=model.id,
            run_id=ckpt.run_id,
        )
    return Generator(model_path=ckpt.path, checkpoint_id=ckpt.id, model_id=model.id, run_id=ckpt.run_id)


def resolve_generator(session: Session, principal: Principal, body: SamplingJobCreate) -> Generator:
    given = [name for name in ("checkpoint_id", "model_id", "run_id") if getattr(body, name) is not None]
    if len(given) != 1:
        raise Unprocessable(
            "give exactly one of checkpoint_id, model_id, run_id (the generator)",
            code="invalid_generator",
            details={"field": given[1] if len(given) > 1 else "checkpoint_id", "given": given},
        )
    pid = principal.project_id
    if body.checkpoint_id is not None:
        ckpt = get_owned(session, Checkpoint, body.checkpoint_id, pid, "checkpoint", "checkpoint_id")
        return _checkpoint_generator(session, ckpt, "checkpoint_id")
    if body.model_id is not None:
        model = get_owned(session, Model, body.model_id, pid, "model", "model_id")
        return Generator(model_path=model.path, model_id=model.id)
    run = get_owned(session, Run, body.run_id or "", pid, "run", "run_id")
    head = head_checkpoint(session, run)
    if head is not None:
        return _checkpoint_generator(session, head, "run_id")
    base = session.get(Model, run.model_id)
    assert base is not None  # FK-enforced
    return Generator(model_path=base.path, model_id=base.id, run_id=run.id)


def create_sampling_job(session: Session, settings: Settings, principal: Principal, body: SamplingJobCreate) -> Job:
    prompts = get_owned(session, PromptSet, body.prompt_set_id, principal.project_id, "prompt_set", "prompt_set_id")
    refuse_deleted(prompts, "prompt_set", "prompt_set_id")
    total = body.params.n * prompts.n_prompts
    if total > settings.max_samples_per_job:
        raise Unprocessable(
            f"n x prompts = {body.params.n} x {prompts.n_prompts} = {total} samples is over this server's cap of "
            f"{settings.max_samples_per_job} per job (HALOS_MAX_SAMPLES_PER_JOB); split the prompt set",
            code="too_many_samples",
            details={
                "field": "params.n",
                "n": body.params.n,
                "prompts": prompts.n_prompts,
                "max_samples_per_job": settings.max_samples_per_job,
            },
        )
    generator = resolve_generator(session, principal, body)
    spec = SampleSpec(
        generator=generator,
        params=body.params,
        prompts=PromptsInput(path=str(settings.data_dir.resolve() / prompts.storage_path), prompt_set_id=prompts.id),
    )
    session.commit()  # end the read transaction (SQLite: BEGIN IMMEDIATE) before submit's
    return _submit(session, settings, principal, "sample", spec)


def create_labelling_job(session: Session, settings: Settings, principal: Principal, body: LabellingJobCreate) -> Job:
    pid = principal.project_id
    samples = get_owned(session, FeedbackFile, body.samples_id, pid, "feedback", "samples_id")
    refuse_deleted(samples, "feedback", "samples_id")
    if samples.kind != "sampled":
        raise Unprocessable(
            f"feedback {samples.id} is {samples.kind} feedback, not samples (kind 'sampled')",
            code="not_samples",
            details={"field": "samples_id", "kind": samples.kind},
        )
    ckpt = get_owned(
        session, Checkpoint, body.reward_model_checkpoint_id, pid, "checkpoint", "reward_model_checkpoint_id"
    )
    require_weights(ckpt, "reward_model_checkpoint_id")
    session.commit()
    manifest = parent_manifest(ckpt.path, "reward_model_checkpoint_id")
    trained = checkpoint_params(manifest)
    if trained.head != "reward":
        what = f"a {trained.head} head" if isinstance(trained.head, str) else "no reward head"
        raise Unprocessable(
            f"checkpoint {ckpt.id} has {what}"
            + (f" (loss {trained.loss!r})" if trained.loss else "")
            + ": a reward model is a checkpoint of a bradley_terry round",
            code="no_reward_head",
            details={
                "field": "reward_model_checkpoint_id",
                "head": trained.head if isinstance(trained.head, str) else None,
            },
        )
    if manifest.extra.get("lora") and not manifest.extra.get("merged"):
        raise Unprocessable(
            f"checkpoint {ckpt.id} holds LoRA adapters without merged weights; export the reward "
            "model with lora.merge_on_export",
            code="reward_model_unmerged",
            details={"field": "reward_model_checkpoint_id"},
        )
    rnd = session.get(Round, ckpt.round_id)
    hp = (rnd.hyperparams or {}) if rnd is not None else {}
    reward_model = RewardModel(
        path=ckpt.path,
        checkpoint_id=ckpt.id,
        run_id=ckpt.run_id,
        max_length=int(hp.get("max_length", 512)),
        max_prompt_length=int(hp.get("max_prompt_length", 256)),
    )
    spec = LabelSpec(
        reward_model=reward_model,
        label=body.label,
        seed=body.seed,
        batch_size=body.batch_size,
        samples=SamplesInput(path=str(settings.data_dir.resolve() / samples.storage_path), file_id=samples.id),
    )
    session.commit()
    return _submit(session, settings, principal, "label", spec)

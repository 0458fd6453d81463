"""What a job's success leaves behind, in the transaction that records the success.

- a round: its final checkpoint (`chaining.register_checkpoint`) and, when its gate passes and it
  started from the run's head, the head moves to it (`head.promote`);
- a sampling or labelling job: its output file becomes a stored feedback file (kind, counts,
  sha256) with its provenance: which job, which generator / reward model, which inputs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from halos_core.artefact_spec import ArtefactResult, LabelSpec, SampleSpec, parse_job_spec
from halos_core.round_result import RoundResult
from server.jobs.chaining import register_checkpoint
from server.jobs.head import promote
from server.models import Checkpoint, FeedbackFile, Job

SOURCES = {"sample": "sampling", "label": "labelling"}


def progress_values(result: RoundResult | ArtefactResult) -> dict[str, Any]:
    """The job row's progress columns at success."""
    if isinstance(result, RoundResult):
        return {
            "step": result.step,
            "examples": result.examples,
            "round_step": result.round_step,
            "total_steps": result.total_steps,
        }
    return {"examples": result.n_records}


def provenance(job: Job, result: ArtefactResult) -> dict[str, Any]:
    spec = parse_job_spec(job.spec or {})
    out: dict[str, Any] = {"job_id": job.id, "kind": job.kind, "stats": dict(result.stats)}
    if isinstance(spec, SampleSpec):
        out.update(
            generator=spec.generator.model_dump(include={"checkpoint_id", "model_id", "run_id"}),
            prompt_set_id=spec.prompts.prompt_set_id,
            params=spec.params.model_dump(mode="json"),
            engine=result.engine,
        )
    elif isinstance(spec, LabelSpec):
        out.update(
            reward_model=spec.reward_model.model_dump(include={"checkpoint_id", "run_id"}),
            samples_id=spec.samples.file_id,
            label=spec.label.model_dump(mode="json"),
            seed=spec.seed,
        )
    return out


def register_artefact(session: Session, job: Job, result: ArtefactResult, now: datetime) -> FeedbackFile:
    fb = FeedbackFile(
        project_id=job.project_id,
        kind=result.feedback_kind,
        format=result.format,
        sha256=result.sha256,
        size_bytes=result.size_bytes,
        n_records=result.n_records,
        n_prompts=result.n_prompts,
        n_train=result.n_train,
        n_test=result.n_test,
        storage_path=result.output_path,  # absolute: the job's run directory (joined with the data dir, it stays)
        source=SOURCES.get(job.kind, job.kind),
        job_id=job.id,
        provenance=provenance(job, result),
        created_at=now,
    )
    session.add(fb)
    return fb


def record_success(
    session: Session, job: Job, result: RoundResult | ArtefactResult, now: datetime
) -> Checkpoint | FeedbackFile | None:
    """Returns what the success produced (the state machine writes its event)."""
    if isinstance(result, RoundResult):
        ckpt = register_checkpoint(session, job, result)
        if ckpt is not None:
            promote(session, job, ckpt, result, now)
        return ckpt
    return register_artefact(session, job, result, now)

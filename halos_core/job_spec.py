"""What a round job is, from the API to the trainer (torch-free): `JobSpec` and `RunConfig`.

    API (server/services/round_spec.py) builds a JobSpec  ──stored as Job.spec──▶
    round chaining (server/jobs/chaining.py) continues it from the parent's checkpoint  ──▶
    worker (worker/runner.py) turns it into a RunConfig = the same fields + where and how this
    attempt runs  ──run.json──▶  trainer (halos_core.training)

`RunConfig` *is* a `JobSpec` with the attempt's placement added, so a field added to the spec
reaches the trainer without any list of keys to keep in step (tests/halos_core/test_job_spec.py
round-trips every field). The checks that depend on where a round runs (`fit_problem`) are here
too, so the API (against its settings) and the worker (against its own, at claim time) ask the
same question.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from halos_core.config import Conversion, FeedbackKind, Hyperparams, LoraSettings
from halos_core.gate import GateRule
from halos_core.loss_registry import LossConfig, loss_batch_problem

LORA_FSDP_PROBLEM = "LoRA runs are not supported with FSDP workers (HALOS_FSDP=true); use DDP or full fine-tuning"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeedbackInput(_Strict):
    path: str  # a stored feedback file (JSON array or JSONL)
    kind: FeedbackKind
    file_id: str  # prompt ids are scoped to their file


class Counters(_Strict):
    """Progress carried across rounds (example counters carry on; the scheduler continues)."""

    step: int = 0
    examples: int = 0


class JobSpec(_Strict):
    """A round: what to train on, with what, starting from where. Stored as `Job.spec`."""

    kind: Literal["round"] = "round"
    reference_path: str  # the SFT model: pinned for the whole run
    reference_sha256: str
    init_from: str | None = None  # parent round's final checkpoint dir (weights+optimizer+scheduler); None = SFT
    init_from_checkpoint_id: str | None = None  # that checkpoint's id (lineage), None = SFT
    counters: Counters = Field(default_factory=Counters)  # where the parent round left off
    feedback: list[FeedbackInput] = Field(min_length=1)
    loss: LossConfig
    conversion: Conversion | None = None
    hyperparams: Hyperparams = Field(default_factory=Hyperparams)
    lora: LoraSettings | None = None
    # promotion gate: when set, the trainer also scores the eval set with the starting policy (the
    # run's head) before training (RoundResult.eval_before); the server compares (halos_core.gate)
    gate: list[GateRule] | None = None

    def continue_from(self, path: str | None, checkpoint_id: str | None, step: int, examples: int) -> JobSpec:
        """This spec starting from a checkpoint (the run's head; None: the SFT model, counters 0)."""
        return self.model_copy(
            update={
                "init_from": path,
                "init_from_checkpoint_id": checkpoint_id,
                "counters": Counters(step=step, examples=examples),
            }
        )


class RunConfig(JobSpec):
    """One attempt of a round, as the trainer reads it from run.json: the job's spec plus where it runs."""

    job_id: str
    run_dir: str
    resume_from: str | None = None  # an intermediate checkpoint of this same round (retry after a crash)
    # no fp16: it needs dynamic loss scaling (a GradScaler), whose state is not checkpointed and whose
    # skipped (overflow) steps would still advance the scheduler and the step/example counters;
    # bf16 has float32's exponent range and needs no loss scaling
    mixed_precision: Literal["no", "bf16"] = "no"
    reference_cache_dir: str | None = None  # shared cache of reference log-probs across rounds

    @classmethod
    def for_attempt(
        cls,
        spec: JobSpec,
        *,
        job_id: str,
        run_dir: str,
        resume_from: str | None = None,
        mixed_precision: Literal["no", "bf16"] = "no",
        reference_cache_dir: str | None = None,
    ) -> RunConfig:
        return cls.model_validate(
            {
                **spec.model_dump(),
                "job_id": job_id,
                "run_dir": run_dir,
                "resume_from": resume_from,
                "mixed_precision": mixed_precision,
                "reference_cache_dir": reference_cache_dir,
            }
        )

    def job_spec(self) -> JobSpec:
        return JobSpec.model_validate(self.model_dump(include=set(JobSpec.model_fields)))


def hyperparams_problem(loss_name: str, hp: Hyperparams, num_processes: int) -> str | None:
    """Why these hyperparameters cannot run with this loss on `num_processes` processes per node
    (x `hp.nodes` nodes), or None."""
    try:
        hp.gradient_accumulation_steps(num_processes * hp.nodes)
    except ValueError as exc:
        if hp.nodes == 1:
            return str(exc)
        return (
            f"batch_size {hp.batch_size} is not divisible by microbatch_size {hp.microbatch_size}"
            f" x num_processes {num_processes} x nodes {hp.nodes}"
        )
    if problem := loss_batch_problem(loss_name, hp.microbatch_size):
        return problem
    if hp.max_prompt_length >= hp.max_length:
        return "max_prompt_length must be smaller than max_length"
    if hp.prefix_sharing and hp.packing:
        return "prefix_sharing and packing cannot be combined (each lays the batch out its own way)"
    return None


def fit_problem(spec: JobSpec, num_processes: int, fsdp: bool) -> str | None:
    """Why a worker with `num_processes` processes per job (and FSDP or not) cannot run this round."""
    if problem := hyperparams_problem(spec.loss.name, spec.hyperparams, num_processes):
        return problem
    if spec.lora is not None and fsdp:
        return LORA_FSDP_PROBLEM
    return None

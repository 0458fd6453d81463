"""The settings a user gives a run or a round (torch-free): hyperparameters, feedback conversions,
LoRA. The losses and their parameters are declared in `halos_core.loss_registry`; what a round job
is (these settings + its inputs) in `halos_core.job_spec`.

The server validates round requests against these models, so a bad value is refused at submit
time instead of crashing on a GPU hours later.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FeedbackKind = Literal["binary", "pairwise", "scalar", "sampled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- conversions


class ScalarToBinary(_Strict):
    """Scalar rewards -> desirable (reward > cut) / undesirable."""

    type: Literal["scalar_to_binary"] = "scalar_to_binary"
    method: Literal["threshold", "mean", "median"] = "median"
    threshold: float | None = None

    @model_validator(mode="after")
    def _threshold_given(self) -> ScalarToBinary:
        if self.method == "threshold" and self.threshold is None:
            raise ValueError("method 'threshold' needs a 'threshold' value")
        return self


class ScalarToPairs(_Strict):
    """Scalar rewards -> pairs per prompt: the best output against a random/the max/the min one."""

    type: Literal["scalar_to_pairs"] = "scalar_to_pairs"
    method: Literal["random", "max", "min"] = "max"
    min_gap: float = Field(0.0, ge=0)  # drop pairs whose reward gap is below this


class PairwiseToUnpaired(_Strict):
    """Pairs -> unpaired examples (chosen desirable, rejected undesirable), as HALOs does for KTO."""

    type: Literal["pairwise_to_unpaired"] = "pairwise_to_unpaired"
    frac_unique_desirable: float = Field(1.0, gt=0, le=1)
    frac_unique_undesirable: float = Field(1.0, gt=0, le=1)


Conversion = Annotated[ScalarToBinary | ScalarToPairs | PairwiseToUnpaired, Field(discriminator="type")]

_CONVERSION_INPUT = {"scalar_to_binary": "scalar", "scalar_to_pairs": "scalar", "pairwise_to_unpaired": "pairwise"}
_CONVERSION_OUTPUT = {"scalar_to_binary": "binary", "scalar_to_pairs": "pairwise", "pairwise_to_unpaired": "unpaired"}


def effective_kind(feedback_kind: str, conversion: Conversion | None) -> str:
    """The kind of records a feedback file yields after the round's conversion (if it applies)."""
    if conversion is not None and _CONVERSION_INPUT[conversion.type] == feedback_kind:
        return _CONVERSION_OUTPUT[conversion.type]
    return feedback_kind


# --------------------------------------------------------------------------- hyperparameters


class Hyperparams(_Strict):
    lr: float = Field(5e-6, gt=0)
    batch_size: int = Field(32, ge=1)  # examples per optimizer step, across all processes
    microbatch_size: int = Field(8, ge=1)  # examples per forward pass on one process
    max_grad_norm: float = Field(10.0, gt=0)
    warmup_steps: int = Field(0, ge=0)  # linear warmup, then constant; counted across rounds
    n_epochs: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8)
    max_prompt_length: int = Field(256, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    # AdamW's (beta1, beta2); a round may change them: they apply from its first step, while the
    # moments restored from the parent carry on
    adam_betas: tuple[float, float] = Field((0.9, 0.999))

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError("adam_betas must both be in [0, 1)")
        return value

    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1)  # intermediate checkpoint every N optimizer steps
    max_pairs_per_prompt: int | None = Field(None, ge=1)  # cap on "all pairs per prompt"
    humanline: bool = False  # clamp per-token log-ratios to [log_eps_p, log_eps_r]
    log_epsilon_p: float = -1.0
    log_epsilon_r: float = 1.5
    eval_fraction: float = Field(0.0, ge=0, lt=1)  # held-out share when no record says split=test
    packing: bool = False  # log-prob passes on packed sequences (halos_core.data.packing); same results
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in backward (less memory; same results)
    # paired losses: each pair's prompt runs once (halos_core.prefix_sharing); log-probs equal the
    # unshared path within float tolerance, not bit for bit, hence opt-in
    prefix_sharing: bool = False
    # worker machines the round runs on at once (each runs the worker's num_processes ranks): the
    # global batch stays `batch_size`, split over nodes x num_processes ranks (README "Multi-node rounds")
    nodes: int = Field(1, ge=1)

    def gradient_accumulation_steps(self, num_processes: int) -> int:
        per_step = self.microbatch_size * num_processes
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by microbatch_size {self.microbatch_size}"
                f" x num_processes {num_processes}"
            )
        return self.batch_size // per_step


class LoraSettings(_Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge_on_export: bool = True


def lora_structure(settings: LoraSettings) -> dict[str, Any]:
    """The settings that decide the adapters' shapes and scale (what a restore must match); recorded
    as `lora` in a checkpoint's trainer_state.json."""
    return {"r": settings.r, "alpha": settings.alpha, "target_modules": sorted(settings.target_modules)}

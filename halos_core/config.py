"""Run configuration: what the worker hands the trainer (torch-free).

`RunConfig` is written by the worker as `run.json` and read by `python -m halos_core.train`.
The server validates round requests against the same models, so a bad loss name, a loss that
cannot use the uploaded feedback, or a batch size that does not divide evenly is refused at
submit time instead of crashing on a GPU hours later.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

FeedbackKind = Literal["binary", "pairwise", "scalar", "sampled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- losses
# Parameter names follow the reference implementation (ContextualAI/HALOs config/loss/*.yaml).


class SFTLoss(_Strict):
    name: Literal["sft"] = "sft"


class CSFTLoss(_Strict):
    """SFT with a control token prepended to desirable / undesirable outputs."""

    name: Literal["csft"] = "csft"
    chosen_control_token: str = "<|good|>"
    rejected_control_token: str = "<|bad|>"


class DPOLoss(_Strict):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)


class CDPOLoss(_Strict):
    name: Literal["cdpo"] = "cdpo"
    beta: float = Field(0.1, gt=0)
    epsilon: float = Field(0.2, ge=0, lt=0.5)  # label-smoothing probability that a label is flipped


class IPOLoss(_Strict):
    name: Literal["ipo"] = "ipo"
    tau: float = Field(0.1, gt=0)


class SimPOLoss(_Strict):
    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0)
    gamma_beta_ratio: float = Field(0.5, ge=0)


class SLiCLoss(_Strict):
    name: Literal["slic"] = "slic"
    beta: float = Field(1.0, gt=0)
    lambda_coef: float = Field(0.1, ge=0)


class KTOLoss(_Strict):
    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class GRPOLoss(_Strict):
    name: Literal["grpo"] = "grpo"
    beta: float = Field(0.01, ge=0)
    epsilon: float = Field(0.2, gt=0)  # ratio clip


class BradleyTerryLoss(_Strict):
    """Reward-model training: a scalar head on the policy, -log sigmoid(r_chosen - r_rejected)."""

    name: Literal["bradley_terry"] = "bradley_terry"


class PPOLoss(_Strict):
    """HALOs' offline PPO: value head, rewards from the feedback, GAE."""

    name: Literal["ppo"] = "ppo"
    cliprange: float = Field(0.5, gt=0)
    critic_coef: float = Field(0.01, ge=0)
    lam: float = Field(0.95, ge=0, le=1)
    gamma: float = Field(0.99, ge=0, le=1)


LossConfig = Annotated[
    Union[
        SFTLoss, CSFTLoss, DPOLoss, CDPOLoss, IPOLoss, SimPOLoss, SLiCLoss, KTOLoss, GRPOLoss,
        BradleyTerryLoss, PPOLoss,
    ],
    Field(discriminator="name"),
]

LOSS_NAMES: tuple[str, ...] = (
    "sft", "csft", "dpo", "cdpo", "ipo", "simpo", "slic", "kto", "grpo", "bradley_terry", "ppo",
)

# Which batches each loss trains on ("paired": chosen/rejected; "unpaired": one output with a
# desirable/undesirable label; "grouped": several scored outputs per prompt; "sft": one target).
LOSS_DATA_KIND: dict[str, str] = {
    "sft": "sft", "csft": "unpaired",
    "dpo": "paired", "cdpo": "paired", "ipo": "paired", "simpo": "paired", "slic": "paired",
    "bradley_terry": "paired",
    "kto": "unpaired", "ppo": "unpaired",
    "grpo": "grouped",
}

# Feedback kinds (after an explicit conversion) each data kind can be built from.
DATA_KIND_ACCEPTS: dict[str, frozenset[str]] = {
    "paired": frozenset({"pairwise"}),
    "unpaired": frozenset({"binary", "unpaired"}),
    "grouped": frozenset({"scalar", "binary"}),
    "sft": frozenset({"binary", "pairwise", "scalar", "sampled"}),
}

# Losses that train a head on the policy (`halos_core.heads`): loss name -> head kind; the others none.
LOSS_HEAD_KIND: dict[str, str] = {"bradley_terry": "reward", "ppo": "value"}

# Losses that need a frozen reference model (the others never load one).
LOSSES_WITH_REFERENCE = frozenset({"dpo", "cdpo", "ipo", "kto", "grpo", "ppo"})  # SLiC, SimPO, SFT never use one


# --------------------------------------------------------------------------- conversions


class ScalarToBinary(_Strict):
    """Scalar rewards -> desirable (reward > cut) / undesirable."""

    type: Literal["scalar_to_binary"] = "scalar_to_binary"
    method: Literal["threshold", "mean", "median"] = "median"
    threshold: float | None = None

    @model_validator(mode="after")
    def _threshold_given(self) -> "ScalarToBinary":
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


Conversion = Annotated[
    Union[ScalarToBinary, ScalarToPairs, PairwiseToUnpaired], Field(discriminator="type")
]

_CONVERSION_INPUT = {"scalar_to_binary": "scalar", "scalar_to_pairs": "scalar", "pairwise_to_unpaired": "pairwise"}
_CONVERSION_OUTPUT = {"scalar_to_binary": "binary", "scalar_to_pairs": "pairwise", "pairwise_to_unpaired": "unpaired"}


def effective_kind(feedback_kind: str, conversion: Conversion | None) -> str:
    """The kind of records a feedback file yields after the round's conversion (if it applies)."""
    if conversion is not None and _CONVERSION_INPUT[conversion.type] == feedback_kind:
        return _CONVERSION_OUTPUT[conversion.type]
    return feedback_kind


def loss_feedback_problem(loss_name: str, feedback_kinds: list[str], conversion: Conversion | None) -> str | None:
    """Why `loss_name` cannot train on files of these kinds, or None when it can."""
    data_kind = LOSS_DATA_KIND[loss_name]
    accepted = DATA_KIND_ACCEPTS[data_kind]
    for kind in feedback_kinds:
        eff = effective_kind(kind, conversion)
        if eff not in accepted:
            hint = {
                ("unpaired", "pairwise"): " (add conversion {'type': 'pairwise_to_unpaired'})",
                ("unpaired", "scalar"): " (add conversion {'type': 'scalar_to_binary'})",
                ("paired", "scalar"): " (add conversion {'type': 'scalar_to_pairs'})",
            }.get((data_kind, eff), "")
            return f"loss '{loss_name}' trains on {data_kind} data and cannot use {eff} feedback{hint}"
    return None


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
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1)  # intermediate checkpoint every N optimizer steps
    max_pairs_per_prompt: int | None = Field(None, ge=1)  # cap on "all pairs per prompt"
    humanline: bool = False  # clamp per-token log-ratios to [log_eps_p, log_eps_r]
    log_epsilon_p: float = -1.0
    log_epsilon_r: float = 1.5
    eval_fraction: float = Field(0.0, ge=0, lt=1)  # held-out share when no record says split=test
    packing: bool = False  # log-prob passes on packed sequences (halos_core.data.packing); same results
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in backward (less memory; same results)

    def gradient_accumulation_steps(self, num_processes: int) -> int:
        per_step = self.microbatch_size * num_processes
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by microbatch_size {self.microbatch_size}"
                f" x num_processes {num_processes}"
            )
        return self.batch_size // per_step


def hyperparams_problem(loss_name: str, hp: Hyperparams, num_processes: int) -> str | None:
    """Why these hyperparameters cannot run with this loss on this worker, or None."""
    try:
        hp.gradient_accumulation_steps(num_processes)
    except ValueError as exc:
        return str(exc)
    if loss_name == "kto" and hp.microbatch_size < 2:
        return "KTO needs microbatch_size >= 2 (its KL estimate pairs each prompt with another example's output)"
    if hp.max_prompt_length >= hp.max_length:
        return "max_prompt_length must be smaller than max_length"
    return None


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


# --------------------------------------------------------------------------- the run


class FeedbackInput(_Strict):
    path: str  # a stored feedback file (JSON array or JSONL)
    kind: FeedbackKind
    file_id: str  # prompt ids are scoped to their file


class Counters(_Strict):
    """Progress carried across rounds (example counters carry on; the scheduler continues)."""

    step: int = 0
    examples: int = 0


class RunConfig(_Strict):
    job_id: str
    run_dir: str
    reference_path: str  # the SFT model: pinned for the whole run
    reference_sha256: str
    init_from: str | None = None  # parent round's final checkpoint dir (weights+optimizer+scheduler); None = SFT
    resume_from: str | None = None  # an intermediate checkpoint of this same round (retry after a crash)
    feedback: list[FeedbackInput] = Field(min_length=1)
    loss: LossConfig
    conversion: Conversion | None = None
    hyperparams: Hyperparams = Field(default_factory=Hyperparams)
    lora: LoraSettings | None = None
    # no fp16: it needs dynamic loss scaling (a GradScaler), whose state is not checkpointed and whose
    # skipped (overflow) steps would still advance the scheduler and the step/example counters;
    # bf16 has float32's exponent range and needs no loss scaling
    mixed_precision: Literal["no", "bf16"] = "no"
    reference_cache_dir: str | None = None  # shared cache of reference log-probs across rounds
    counters: Counters = Field(default_factory=Counters)  # where the parent round left off

"""Jobs that produce a stored artefact instead of a checkpoint: sampling and labelling (torch-free).

They go through the same job machinery as rounds (claim, lease, supervised subprocess, retries,
cancel, metrics, logs) and keep the same run-directory contract:

    run.json       SampleConfig / LabelConfig (the job's spec + job_id + run_dir), written by the worker
    metrics.jsonl  one line per batch: step (batches done), total_steps, examples (records done), ...
    outputs/       the artefact, written to a temp name, fsynced, renamed (`write_output_atomic`)
    result.json    an `ArtefactResult` (the output's sha256 and counts), written last

    python -m halos_core.sample --config run.json      kind "sample"
    python -m halos_core.label  --config run.json      kind "label"

`JobSpecUnion` is what `Job.spec` holds, discriminated on `kind` ("round" is `halos_core.job_spec.JobSpec`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from halos_core.config import ScalarToBinary, ScalarToPairs
from halos_core.job_spec import JobSpec

ENTRY_POINTS = {"sample": "halos_core.sample", "label": "halos_core.label"}
OUTPUT_DIR = "outputs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- sampling


class Generator(_Strict):
    """What the samples are drawn from, resolved by the server at submit time (provenance)."""

    model_path: str  # a HF-loadable directory: the SFT model or a checkpoint's final/
    base_path: str | None = None  # LoRA checkpoint without merged weights: the base the adapter applies to
    adapter_path: str | None = None  # that checkpoint's adapter directory
    checkpoint_id: str | None = None  # None: the SFT model itself
    model_id: str
    run_id: str | None = None


class SamplingParams(_Strict):
    n: int = Field(4, ge=1, le=64, description="samples per prompt")
    temperature: float = Field(1.0, ge=0, le=10, description="0: greedy (every sample of a prompt is the same)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1, le=8192)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(default_factory=list, max_length=16)
    max_prompt_length: int = Field(512, ge=8, le=65536, description="prompts are cut to their last N tokens")
    batch_size: int = Field(16, ge=1, le=1024, description="prompts per generate call")
    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto: vLLM when it is installed and a GPU is present, else transformers generate"
    )


class PromptsInput(_Strict):
    path: str
    prompt_set_id: str


class SampleSpec(_Strict):
    kind: Literal["sample"] = "sample"
    generator: Generator
    prompts: PromptsInput
    params: SamplingParams = Field(default_factory=SamplingParams)


# --------------------------------------------------------------------------- labelling


class ScalarLabels(_Strict):
    """Each sample keeps the reward model's score (scalar_feedback)."""

    type: Literal["scalar"] = "scalar"


class BinaryLabels(ScalarToBinary):
    """desirable iff score > cut (threshold / mean / median of the file's scores): binary_feedback."""

    type: Literal["binary"] = "binary"  # type: ignore[assignment]  # the discriminator: replaces the parent's


class PairwiseLabels(ScalarToPairs):
    """At most one pair per prompt: the best sample against a random / the lowest (max gap) / the
    closest (min gap) other one whose score gap is at least `min_gap`: pairwise_feedback."""

    type: Literal["pairwise"] = "pairwise"  # type: ignore[assignment]  # the discriminator: replaces the parent's


LabelRule = Annotated[ScalarLabels | BinaryLabels | PairwiseLabels, Field(discriminator="type")]
LABEL_KIND = {"scalar": "scalar", "binary": "binary", "pairwise": "pairwise"}


class RewardModel(_Strict):
    path: str  # a bradley_terry checkpoint's final/ (model + head.safetensors)
    checkpoint_id: str
    run_id: str
    max_length: int = 512  # the tokenisation its round trained with
    max_prompt_length: int = 256


class SamplesInput(_Strict):
    path: str
    file_id: str


class LabelSpec(_Strict):
    kind: Literal["label"] = "label"
    reward_model: RewardModel
    samples: SamplesInput
    label: LabelRule = Field(default_factory=ScalarLabels)
    seed: int = 0  # the "random" pairing draw
    batch_size: int = Field(16, ge=1, le=1024)


# --------------------------------------------------------------------------- the union, configs, result

JobSpecUnion = Annotated[JobSpec | SampleSpec | LabelSpec, Field(discriminator="kind")]
_SPEC: TypeAdapter[Any] = TypeAdapter(JobSpecUnion)


def parse_job_spec(data: dict[str, Any]) -> JobSpec | SampleSpec | LabelSpec:
    """A stored `Job.spec` as its model (a spec without `kind` is a round: rows written before kinds)."""
    return _SPEC.validate_python({"kind": "round", **data})


class SampleConfig(SampleSpec):
    job_id: str
    run_dir: str


class LabelConfig(LabelSpec):
    job_id: str
    run_dir: str


def config_for_attempt(spec: SampleSpec | LabelSpec, *, job_id: str, run_dir: str) -> SampleConfig | LabelConfig:
    cls = SampleConfig if isinstance(spec, SampleSpec) else LabelConfig
    return cls.model_validate({**spec.model_dump(), "job_id": job_id, "run_dir": run_dir})


class ArtefactResult(_Strict):
    """result.json of a sampling or labelling job: the output file and what it holds."""

    status: Literal["ok"] = "ok"
    job_id: str
    kind: Literal["sample", "label"]
    output_path: str
    sha256: str
    size_bytes: int
    feedback_kind: Literal["sampled", "binary", "pairwise", "scalar"]
    format: str
    n_records: int
    n_prompts: int
    n_train: int
    n_test: int
    engine: str | None = None
    stats: dict[str, float] = {}  # e.g. samples_per_s, mean_score

    # the names the job row carries for progress (like RoundResult's)
    @property
    def step(self) -> int:
        return self.n_records

    @property
    def examples(self) -> int:
        return self.n_records

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def read_artefact_result(path: str | Path) -> ArtefactResult | None:
    file = Path(path)
    if not file.is_file():
        return None
    return ArtefactResult.model_validate_json(file.read_bytes())


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_output_atomic(target: Path, lines: Any) -> tuple[str, int]:
    """Write JSONL `lines` (strings without newline) to `target` via a temp file, fsync, rename.
    Returns (sha256, size)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as fh:
        for line in lines:
            data = (line + "\n").encode("utf-8")
            digest.update(data)
            size += len(data)
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest(), size

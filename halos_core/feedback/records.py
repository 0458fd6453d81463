"""The normal form of feedback, and the validation result types (torch-free, pydantic only).

Every accepted file format (HALOs JSON/JSONL, HALOs sampled outputs, TRL preference / unpaired,
OpenAI preference JSONL) is read into exactly one of four record kinds:

- `BinaryRecord`   one output with a desirable (1) / undesirable (0) label
- `PairwiseRecord` two outputs of one prompt; `label == 1` means `output_A` is preferred
- `ScalarRecord`   one output with a real-valued reward
- `SampledRecord`  one unlabelled output (HALOs `train.sample` output)

Prompts and outputs are always lists of `Turn`s: a plain-string prompt becomes one `user` turn,
a plain-string output one `assistant` turn. `prompt_id` is a string scoped to its file (files
without ids get one derived from the prompt's content, so equal prompts share an id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Split = Literal["train", "test"]
FeedbackFormat = Literal[
    "halos_json",
    "halos_jsonl",
    "trl_preference",
    "trl_unpaired",
    "openai_preference",
    "halos_sampled",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, strict=True)


class Turn(_Frozen):
    role: str
    content: str


class BinaryRecord(_Frozen):
    kind: Literal["binary"] = "binary"
    prompt_id: str
    prompt: list[Turn] = Field(min_length=1)
    output: list[Turn] = Field(min_length=1)
    label: Literal[0, 1]  # 1 = desirable
    reward: float | None = None
    split: Split = "train"


class PairwiseRecord(_Frozen):
    kind: Literal["pairwise"] = "pairwise"
    prompt_id: str
    prompt: list[Turn] = Field(min_length=1)
    output_A: list[Turn] = Field(min_length=1)
    output_B: list[Turn] = Field(min_length=1)
    label: Literal[0, 1]  # 1 = output_A preferred, 0 = output_B preferred
    reward_A: float | None = None
    reward_B: float | None = None
    split: Split = "train"

    @property
    def chosen(self) -> list[Turn]:
        return self.output_A if self.label == 1 else self.output_B

    @property
    def rejected(self) -> list[Turn]:
        return self.output_B if self.label == 1 else self.output_A

    @property
    def chosen_reward(self) -> float | None:
        return self.reward_A if self.label == 1 else self.reward_B

    @property
    def rejected_reward(self) -> float | None:
        return self.reward_B if self.label == 1 else self.reward_A


class ScalarRecord(_Frozen):
    kind: Literal["scalar"] = "scalar"
    prompt_id: str
    prompt: list[Turn] = Field(min_length=1)
    output: list[Turn] = Field(min_length=1)
    reward: float
    split: Split = "train"


class SampledRecord(_Frozen):
    kind: Literal["sampled"] = "sampled"
    prompt_id: str
    sample_id: str
    prompt: list[Turn] = Field(min_length=1)
    output: list[Turn] = Field(min_length=1)
    dataset: str = ""
    split: Split = "train"


FeedbackRecord = BinaryRecord | PairwiseRecord | ScalarRecord | SampledRecord


# --------------------------------------------------------------------------- validation results


class RecordError(_Frozen):
    """One problem in an uploaded file.

    index: 0-based record number (records are the elements of a JSON array / the non-blank lines
    of a JSONL file). line: 1-based line of the record in a JSONL file, None in a JSON array.
    field: a path inside the record such as `output_A[1].content`; "" means the record as a whole.
    code: a short machine-readable code (see `halos_core.feedback.ERROR_CODES`).
    """

    index: int
    line: int | None
    field: str
    code: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = f"record {self.index}" + (f" (line {self.line})" if self.line is not None else "")
        what = f" {self.field}:" if self.field else ":"
        tail = f" (hint: {self.hint})" if self.hint else ""
        return f"{where}{what} [{self.code}] {self.message}{tail}"


class FeedbackValidationError(Exception):
    """Raised by `validate_file` / `read_records`: every bad record found (up to `max_errors`)."""

    def __init__(self, errors: list[RecordError], truncated: bool = False, records_checked: int = 0):
        self.errors = list(errors)
        self.truncated = truncated
        self.records_checked = records_checked
        more = " (more not shown)" if truncated else ""
        first = f"; first: {self.errors[0]}" if self.errors else ""
        super().__init__(f"{len(self.errors)} error(s) in feedback file{more}{first}")

    def __reduce__(self):  # picklable (e.g. across a process pool)
        return (type(self), (self.errors, self.truncated, self.records_checked))


@dataclass(frozen=True)
class FeedbackLimits:
    max_errors: int = 100  # errors reported before validation stops (truncated=True)
    max_depth: int = 32  # JSON nesting depth of one record (the record object itself is depth 1)
    max_record_bytes: int = 1_000_000  # bytes of one record (one JSONL line / one array element)
    max_records: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("max_errors", "max_depth", "max_record_bytes", "max_records"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FeedbackLimits.{name} must be a positive integer, got {value!r}")


class FeedbackSummary(_Frozen):
    kind: Literal["binary", "pairwise", "scalar", "sampled"]
    format: FeedbackFormat
    n_records: int
    n_prompts: int
    n_train: int
    n_test: int

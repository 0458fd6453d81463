"""Data-quality findings of a VALID feedback file: records that pass validation but are probably
a mistake, which used to pass silently (torch-free).

| code               | what                                                        | in training      |
|--------------------|-------------------------------------------------------------|------------------|
| identical_outputs  | a pair whose two outputs are identical (no learning signal; | left out         |
|                    | usually a labelling-tool bug)                               |                  |
| duplicate_record   | a record identical to an earlier one (after normalisation)  | kept (as given)  |
| string_prompt      | a prompt given as a plain string (read as one user turn)    | kept             |
| empty_output       | an output whose every turn has empty content                | kept             |

By default the server returns them as warnings with the upload (counts + the first records);
`strict=true` refuses the file with the record-level 422 report (`as_errors`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .reader import READ_LIMITS, _Walk, validate_file
from .records import FeedbackLimits, FeedbackSummary, PairwiseRecord, RecordError, Turn

MAX_EXAMPLES = 20

MESSAGES = {
    "identical_outputs": (
        "the pair's two outputs are identical: it carries no preference and is left out of training",
        "check the labelling tool's export: both sides of the comparison are the same",
    ),
    "duplicate_record": ("exact duplicate of record {first}", "remove repeated records (they weigh double)"),
    "string_prompt": (
        "the prompt is a plain string; it was read as one user turn",
        'give the prompt as [{"role": "user", "content": ...}] to state the roles',
    ),
    "empty_output": ("the output is empty", "drop records without an output"),
}


def finding(code: str, index: int, line: int | None, field_: str = "", first: int = -1) -> RecordError:
    """One finding as the record-level report shows it (`first`: the earlier record a duplicate repeats)."""
    message, hint = MESSAGES[code]
    return RecordError(index=index, line=line, field=field_, code=code, message=message.format(first=first), hint=hint)


@dataclass
class Findings:
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[RecordError] = field(default_factory=list)

    def add(self, code: str, index: int, line: int | None, field_: str = "", first: int = -1) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(finding(code, index, line, field_, first))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "examples": [e.model_dump() for e in self.examples],
            "left_out_of_training": self.counts.get("identical_outputs", 0),
        }


def _empty(turns: list[Turn]) -> bool:
    return all(not t.content.strip() for t in turns)


def _prompt_was_string(raw: dict[str, Any], family: str) -> bool:
    if family == "openai_preference":
        inp = raw.get("input")
        return isinstance(inp, dict) and isinstance(inp.get("messages"), str)
    if family == "halos_sampled" and "prompt" not in raw:
        return isinstance(raw.get("instruction"), str)
    return isinstance(raw.get("prompt"), str)


def find(path: str | Path, limits: FeedbackLimits = READ_LIMITS) -> Findings:
    """The findings of a file that `validate_file` accepted (one more streaming pass)."""
    walk = _Walk(path, limits)
    out = Findings()
    seen: dict[bytes, int] = {}
    for record, errors, _fatal in walk:
        if errors or record is None:
            continue
        index, line, raw = walk.records_checked - 1, walk.last_line, walk.last_raw or {}
        if isinstance(record, PairwiseRecord):
            if record.output_A == record.output_B:
                out.add("identical_outputs", index, line, "output_B")
            outputs = [("output_A", record.output_A), ("output_B", record.output_B)]
        else:
            outputs = [("output", record.output)]
        for name, turns in outputs:
            if _empty(turns):
                out.add("empty_output", index, line, name)
        if walk.family is not None and _prompt_was_string(raw, walk.family):
            out.add("string_prompt", index, line, "prompt")
        key = hashlib.blake2b(
            json.dumps(record.model_dump(mode="json"), sort_keys=True).encode("utf-8", "surrogatepass"), digest_size=16
        ).digest()
        if key in seen:
            out.add("duplicate_record", index, line, "", first=seen[key])
        else:
            seen[key] = index
    return out


def check(path: str | Path, limits: FeedbackLimits) -> tuple[FeedbackSummary, Findings]:
    """Validate a file and find its data-quality findings: in one compiled pass when the fast path
    can prove the file valid (`fast.fast_check`), else the detailed scanner (which raises
    FeedbackValidationError with the record-level report) and then `find`. Same results either way."""
    from .fast import fast_check

    checked = fast_check(path, limits)
    if checked is not None:
        return checked
    return detailed_check(path, limits)


def detailed_check(path: str | Path, limits: FeedbackLimits) -> tuple[FeedbackSummary, Findings]:
    """`check` without the fast path."""
    return validate_file(path, limits, fast=False), find(path)

"""Prompt sets: the prompts a sampling job draws completions for (torch-free).

A record is `{"prompt_id", "prompt": [turns] | "string", "split"?}` (the prompt id is derived from
the prompt's content when missing, as for feedback), or any feedback record of an accepted format,
of which only the prompt part is taken (so a feedback file can be re-used as a prompt set). The
file is read with the same streaming scanner and the same record-level errors as feedback; a
prompt id repeated with the same prompt is one prompt (a feedback file lists a prompt once per
output), with another prompt it is `conflicting_prompt`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .formats import _Ctx, _id, _req_turns, _split, derived_prompt_id, detect, parse_record, prompt_digest
from .reader import READ_LIMITS
from .records import FeedbackLimits, FeedbackValidationError, RecordError, Turn
from .scan import RawReader

PROMPTS_FORMAT = "prompts"


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str
    prompt: list[Turn]
    split: str = "train"
    string_prompt: bool = False  # given as a plain string (a data-quality finding)


@dataclass(frozen=True)
class PromptsSummary:
    format: str
    n_prompts: int
    n_train: int
    n_test: int
    string_prompts: int
    examples: list[RecordError]  # the first string-prompt findings (index, line)


def _prompt_only(obj: dict, index: int, line: int | None) -> tuple[PromptRecord | None, list[RecordError]]:
    ctx = _Ctx(index, line)
    prompt = _req_turns(ctx, obj, "prompt", "user", 'a prompt set record needs a "prompt" (turns or a string)')
    prompt_id = _id(ctx, obj, "prompt_id", required=False)
    split = _split(ctx, obj)
    if ctx.errors or prompt is None:
        return None, ctx.errors
    return PromptRecord(prompt_id or derived_prompt_id(prompt), prompt, split, isinstance(obj.get("prompt"), str)), []


Step = tuple[PromptRecord | None, list[RecordError], str, int, int | None]


def _walk(path: str | Path, limits: FeedbackLimits) -> Iterator[Step]:
    """(record or None, errors, format, index, line) per record; repeated prompt ids are yielded once."""
    seen: dict[str, tuple[bytes, str, int]] = {}
    fmt: str | None = None
    for item in RawReader(path, limits):
        if item.index >= limits.max_records:
            yield (
                None,
                [
                    RecordError(
                        index=item.index,
                        line=item.line,
                        field="",
                        code="too_many_records",
                        message=f"file has more than {limits.max_records:,} records",
                        hint="split the prompt set into several files",
                    )
                ],
                fmt or PROMPTS_FORMAT,
                item.index,
                item.line,
            )
            return
        if item.error is not None:
            yield None, [item.error], fmt or PROMPTS_FORMAT, item.index, item.line
            if item.fatal:
                return
            continue
        obj = item.value
        if not isinstance(obj, dict):
            yield (
                None,
                [
                    RecordError(
                        index=item.index,
                        line=item.line,
                        field="",
                        code="wrong_type",
                        message=f"a record must be a JSON object, got {type(obj).__name__}",
                        hint="each record is one {...} object",
                    )
                ],
                fmt or PROMPTS_FORMAT,
                item.index,
                item.line,
            )
            continue
        detected = detect(obj)
        if detected is not None:
            family, kind = detected
            parsed, errors = parse_record(obj, family, kind, item.index, item.line)
            record = (
                None
                if parsed is None
                else PromptRecord(
                    parsed.prompt_id, list(parsed.prompt), parsed.split, isinstance(obj.get("prompt"), str)
                )
            )
            this_format = family
        else:
            record, errors = _prompt_only(obj, item.index, item.line)
            this_format = PROMPTS_FORMAT
        fmt = fmt or this_format
        if errors or record is None:
            yield None, errors, fmt, item.index, item.line
            continue
        digest = prompt_digest(record.prompt)
        first = seen.get(record.prompt_id)
        if first is not None:
            if first[0] != digest:
                yield (
                    None,
                    [
                        RecordError(
                            index=item.index,
                            line=item.line,
                            field="prompt",
                            code="conflicting_prompt",
                            message=f"prompt_id {record.prompt_id[:80]!r} has a different prompt here "
                            f"than in record {first[2]}",
                            hint="give different prompts different ids",
                        )
                    ],
                    fmt,
                    item.index,
                    item.line,
                )
            elif first[1] != record.split:
                yield (
                    None,
                    [
                        RecordError(
                            index=item.index,
                            line=item.line,
                            field="split",
                            code="conflicting_split",
                            message=f"prompt_id {record.prompt_id[:80]!r} is {first[1]!r} in record {first[2]} but "
                            f"{record.split!r} here",
                            hint="a prompt is in one split",
                        )
                    ],
                    fmt,
                    item.index,
                    item.line,
                )
            continue  # the same prompt again (a feedback file lists it once per output)
        seen[record.prompt_id] = (digest, record.split, item.index)
        yield record, [], fmt, item.index, item.line


def validate_prompts(path: str | Path, limits: FeedbackLimits = FeedbackLimits()) -> PromptsSummary:
    """The summary of a prompt file, or FeedbackValidationError listing every bad record."""
    errors: list[RecordError] = []
    truncated = False
    n_train = n_test = strings = 0
    examples: list[RecordError] = []
    fmt = PROMPTS_FORMAT
    checked = 0
    for record, record_errors, fmt, index, line in _walk(path, limits):  # noqa: B007 (the file's format: read after)
        checked = index + 1
        for error in record_errors:
            if len(errors) >= limits.max_errors:
                truncated = True
                break
            errors.append(error)
        if truncated:
            break
        if record is not None:
            if record.split == "test":
                n_test += 1
            else:
                n_train += 1
            if record.string_prompt:
                strings += 1
                if len(examples) < 20:
                    examples.append(
                        RecordError(
                            index=index,
                            line=line,
                            field="prompt",
                            code="string_prompt",
                            message="the prompt is a plain string; it was read as one user turn",
                            hint='give the prompt as [{"role": "user", "content": ...}]',
                        )
                    )
    if not errors and n_train + n_test == 0:
        errors.append(
            RecordError(
                index=0,
                line=None,
                field="",
                code="empty_file",
                message="the file holds no prompts",
                hint='upload JSON Lines of {"prompt_id", "prompt"} records',
            )
        )
    if errors:
        raise FeedbackValidationError(errors, truncated=truncated, records_checked=checked)
    return PromptsSummary(fmt, n_train + n_test, n_train, n_test, strings, examples)


def read_prompts(path: str | Path) -> Iterator[PromptRecord]:
    """The distinct prompts of a validated prompt file, in file order."""
    for record, errors, _fmt, _index, _line in _walk(path, READ_LIMITS):
        if errors:
            raise FeedbackValidationError(errors[:1], truncated=True)
        if record is not None:
            yield record

"""Streaming validation (`validate_file`) and reading (`read_records`) of feedback files.

Both walk the file once, record by record (see `scan.py`), so memory stays bounded by one record
plus a small per-prompt table (a 64-bit key and one integer per distinct `prompt_id`), whatever
the file size. Validation reports every bad record, up to `FeedbackLimits.max_errors`.

Checks across records:
- the first record that matches a format fixes the file's format and kind; a later record of
  another kind is `mixed_kinds`, of the same kind but another format `mixed_formats`;
- all records with one `prompt_id` must have the same prompt (`conflicting_prompt`) and the same
  split (`conflicting_split`): the trainer groups outputs by `prompt_id` within a file;
- at most `max_records` records (`too_many_records`), at least one (`empty_file`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from .formats import FAMILY_FIELDS, detect, parse_record, prompt_digest, unknown_format_error
from .records import FeedbackLimits, FeedbackRecord, FeedbackSummary, FeedbackValidationError, RecordError
from .scan import RawReader

_DEFAULT_LIMITS = FeedbackLimits()
# read_records trusts that the file was validated (possibly with limits raised above the defaults):
# it keeps only the limits that protect the reader itself.
READ_LIMITS = FeedbackLimits(max_errors=1, max_depth=256, max_record_bytes=1 << 31, max_records=1 << 62)


def _format_name(family: str, container: str | None) -> str:
    if family == "halos":
        return "halos_json" if container == "json" else "halos_jsonl"
    return family


class _Walk:
    """One pass over a file: yields (record | None, errors) and keeps the file-level state."""

    def __init__(self, path: str | Path, limits: FeedbackLimits):
        self.reader = RawReader(path, limits)
        self.limits = limits
        self.family: str | None = None
        self.kind: str | None = None
        self.records_checked = 0
        self.n_train = 0
        self.n_test = 0
        # prompt_id -> (prompt digest << 33) | (first record index << 1) | is_test
        self.prompts: dict[int, int] = {}
        self.last_raw: dict | None = None  # the JSON object of the record yielded last (data-quality checks)
        self.last_line: int | None = None

    @property
    def format(self) -> str | None:
        return None if self.family is None else _format_name(self.family, self.reader.container)

    def __iter__(self) -> Iterator[tuple[FeedbackRecord | None, list[RecordError], bool]]:
        """(record, errors, fatal) per record; iteration stops after a fatal error."""
        limits = self.limits
        for item in self.reader:
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
                            hint="split the feedback into several files",
                        )
                    ],
                    True,
                )
                return
            self.records_checked = item.index + 1
            if item.error is not None:
                yield None, [item.error], item.fatal
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
                    False,
                )
                continue
            detected = detect(obj)
            if self.family is None:
                if detected is None:
                    yield None, [unknown_format_error(obj, item.index, item.line)], False
                    continue
                self.family, self.kind = detected
            elif detected is not None and detected != (self.family, self.kind):
                yield None, [self._mixed(detected, item.index, item.line)], False
                continue
            elif detected is None and FAMILY_FIELDS[self.family].isdisjoint(obj):
                yield None, [unknown_format_error(obj, item.index, item.line)], False
                continue
            record, errors = parse_record(obj, self.family, self.kind, item.index, item.line)
            if errors:
                yield None, errors, False
                continue
            conflict = self._track(record, item.index, item.line)
            if conflict is not None:
                yield None, [conflict], False
                continue
            self.last_raw, self.last_line = obj, item.line
            yield record, [], False

    def _mixed(self, detected: tuple[str, str], index: int, line: int | None) -> RecordError:
        family, kind = detected
        file_fmt = self.format
        if kind != self.kind:
            return RecordError(
                index=index,
                line=line,
                field="type" if family == "halos" else "",
                code="mixed_kinds",
                message=f"{kind} record in a file of {self.kind} feedback (format {file_fmt})",
                hint="one kind of feedback per file: upload the other records as a separate file",
            )
        return RecordError(
            index=index,
            line=line,
            field="",
            code="mixed_formats",
            message=f"{_format_name(family, self.reader.container)} record in a {file_fmt} file",
            hint="use one record format per file",
        )

    def _track(self, record: FeedbackRecord, index: int, line: int | None) -> RecordError | None:
        key = int.from_bytes(
            hashlib.blake2b(record.prompt_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
        )
        digest = int.from_bytes(prompt_digest(record.prompt)[:8], "little")
        is_test = int(record.split == "test")
        seen = self.prompts.get(key)
        if seen is None:
            self.prompts[key] = (digest << 33) | (min(index, 2**32 - 1) << 1) | is_test
        else:
            first = (seen >> 1) & (2**32 - 1)
            if seen >> 33 != digest:
                return RecordError(
                    index=index,
                    line=line,
                    field="prompt",
                    code="conflicting_prompt",
                    message=f"prompt_id {record.prompt_id[:80]!r} has a different prompt here than in record {first}",
                    hint="records sharing a prompt_id must have the same prompt: give different prompts different ids",
                )
            if seen & 1 != is_test:
                splits = ("train", "test") if is_test else ("test", "train")
                return RecordError(
                    index=index,
                    line=line,
                    field="split",
                    code="conflicting_split",
                    message=f"prompt_id {record.prompt_id[:80]!r} is {splits[0]!r} in record {first} "
                    f"but {splits[1]!r} here",
                    hint="all records of one prompt must be in the same split (otherwise test prompts leak into "
                    "training)",
                )
        if is_test:
            self.n_test += 1
        else:
            self.n_train += 1
        return None


def validate_file(path: str | Path, limits: FeedbackLimits = _DEFAULT_LIMITS, *, fast: bool = True) -> FeedbackSummary:
    """Check a feedback file without loading it whole; the summary, or FeedbackValidationError listing
    every bad record (up to `limits.max_errors`; `truncated` says whether more were left out).

    A valid JSONL file is usually proven valid by the compiled fast path (`fast.py`, several times
    faster); whatever it cannot prove goes through the detailed scanner, which alone reports errors
    (`fast=False`: the detailed scanner only)."""
    if fast:
        from .fast import fast_summary

        summary = fast_summary(path, limits)
        if summary is not None:
            return summary
    walk = _Walk(path, limits)
    errors: list[RecordError] = []
    truncated = False
    for _record, record_errors, _fatal in walk:
        for error in record_errors:
            if len(errors) >= limits.max_errors:
                truncated = True
                break
            errors.append(error)
        if truncated:
            break
    if not errors and walk.family is None:
        errors.append(
            RecordError(
                index=0,
                line=None,
                field="",
                code="empty_file",
                message="the file holds no records",
                hint="upload a JSON array of records or JSON Lines with one record per line",
            )
        )
    if errors:
        raise FeedbackValidationError(errors, truncated=truncated, records_checked=walk.records_checked)
    return FeedbackSummary(
        kind=walk.kind,
        format=walk.format,
        n_records=walk.n_train + walk.n_test,
        n_prompts=len(walk.prompts),
        n_train=walk.n_train,
        n_test=walk.n_test,
    )


def read_records(path: str | Path, limits: FeedbackLimits | None = None) -> Iterator[FeedbackRecord]:
    """The normal-form records of a (validated) file, streamed in file order.

    `limits` defaults to `READ_LIMITS` (generous: the file was validated with the server's limits,
    which may be above `FeedbackLimits()`'s). Raises FeedbackValidationError at the first problem;
    a file that passed `validate_file` has none."""
    walk = _Walk(path, limits or READ_LIMITS)
    for record, errors, _fatal in walk:
        if errors:  # stop at the first problem: the list is not complete
            raise FeedbackValidationError(errors[:1], truncated=True, records_checked=walk.records_checked)
        yield record
    if walk.family is None:
        raise FeedbackValidationError(
            [RecordError(index=0, line=None, field="", code="empty_file", message="the file holds no records")],
            records_checked=walk.records_checked,
        )

"""A compiled fast path for validating *valid* JSONL feedback files (msgspec), with the detailed
scanner (`reader.validate_file`'s `_Walk`) as the authority.

`scan_segment` decodes whole chunks of lines with a typed msgspec decoder (one per format) and
returns a partial result, or None when it cannot *prove* the segment valid; `merge` combines the
segments of a file into the `FeedbackSummary` the detailed scanner would return, or None. None
never means "invalid": the caller then runs the detailed scanner, which produces the summary or
the record-level report. So the fast path may be conservative (a valid file it does not handle,
e.g. records with fields outside their format, only costs time) but must never accept a file the
detailed scanner rejects, nor summarise one differently. What stands for each check:

- one record per non-empty line: each line is decoded on its own (trailing data is an error);
  blank or whitespace-only lines, a byte-order mark, or anything but `{` first ⇒ None;
- record size: chunks hold at most `max_record_bytes` bytes and end at a newline, so no line is
  longer; a longer line ⇒ None;
- JSON syntax, strict UTF-8, unpaired surrogate escapes, NaN/Infinity: msgspec refuses them;
- nesting depth: records may hold only their format's fields (below), whose depth is at most 5;
  `max_depth` < 5 ⇒ None;
- duplicate keys (msgspec keeps the last one): the records are re-encoded (only the fields that
  were present) and the number of `:` must equal the input's. Every key is followed by one `:`,
  and the decoded strings hold the same colons on both sides (the input may not spell `:` as
  `\\u003a`), so a duplicate or an unknown field (dropped by the decoder) makes the input count
  larger;
- field types, roles, labels 0/1, finite rewards, splits: the typed structs below mirror
  `formats.parse_record`, accepting a subset of what it accepts (e.g. a label 1.0 ⇒ None);
- the format: detected on the file's first record with `formats.detect`; the structs refuse the
  keys that would make `detect` pick another format for a later record;
- prompts: records sharing a `prompt_id` must share the prompt and the split. Explicit ids are
  compared by the hash of the prompt as written (a str and an equal one-turn list compare
  unequal ⇒ None, never a wrong accept); records without an id get `formats.derived_prompt_id`,
  exactly as the detailed scanner does. `n_prompts` counts distinct ids.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, eq
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from .formats import HALOS_TYPES, ROLES, derived_prompt_id, detect
from .records import FeedbackLimits, FeedbackSummary, Turn

MAX_CHUNK = 8 << 20
SCHEMA_DEPTH = 5  # record > list of turns > turn > list of content parts > part

Role = Literal.__getitem__(tuple(sorted(ROLES)))  # type: ignore[attr-defined]  # a Literal built from ROLES
NonEmpty = Annotated[str, Meta(min_length=1)]
Finite = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]


class _Part(Struct, frozen=True):
    type: Literal["text"]
    text: str


class _Turn(Struct, frozen=True):
    role: Role
    content: str | tuple[_Part, ...]


Turns = Union[str, Annotated[tuple[_Turn, ...], Meta(min_length=1)]]
OptId = Union[NonEmpty, int, None, UnsetType]
OptSplit = Union[Literal["train", "test"], None, UnsetType]
OptReward = Union[Finite, None, UnsetType]
Absent = UnsetType  # a key that must not be there (it would make `detect` pick another format)


class _Record(Struct, frozen=True, omit_defaults=True):
    pass


class HalosBinary(_Record):
    type: Literal["binary_feedback"]
    prompt: Turns
    output: Turns
    label: Literal[0, 1]
    prompt_id: OptId = UNSET
    reward: OptReward = UNSET
    split: OptSplit = UNSET


class HalosPairwise(_Record):
    type: Literal["pairwise_feedback"]
    prompt: Turns
    output_A: Turns
    output_B: Turns
    label: Literal[0, 1]
    prompt_id: OptId = UNSET
    reward_A: OptReward = UNSET
    reward_B: OptReward = UNSET
    split: OptSplit = UNSET


class HalosScalar(_Record):
    type: Literal["scalar_feedback"]
    prompt: Turns
    output: Turns
    reward: Finite
    prompt_id: OptId = UNSET
    split: OptSplit = UNSET


class HalosSampled(_Record):
    prompt_id: NonEmpty | int
    sample_id: NonEmpty | int
    output: Turns
    type: Literal["sample"] | UnsetType = UNSET
    prompt: Turns | UnsetType = UNSET
    instruction: Turns | UnsetType = UNSET
    dataset: str | None | UnsetType = UNSET
    split: OptSplit = UNSET
    preferred_output: Absent = UNSET
    non_preferred_output: Absent = UNSET
    chosen: Absent = UNSET
    rejected: Absent = UNSET
    completion: Absent = UNSET


class TrlPreference(_Record):
    prompt: Turns
    chosen: Turns
    rejected: Turns
    prompt_id: OptId = UNSET
    score_chosen: OptReward = UNSET
    score_rejected: OptReward = UNSET
    split: OptSplit = UNSET
    type: Absent = UNSET
    preferred_output: Absent = UNSET
    non_preferred_output: Absent = UNSET


class TrlUnpaired(_Record):
    prompt: Turns
    completion: Turns
    label: bool | Literal[0, 1]
    prompt_id: OptId = UNSET
    split: OptSplit = UNSET
    type: Absent = UNSET
    preferred_output: Absent = UNSET
    non_preferred_output: Absent = UNSET
    chosen: Absent = UNSET
    rejected: Absent = UNSET


class _OpenAIInput(Struct, frozen=True):
    messages: Turns


class OpenAIPreference(_Record):
    input: _OpenAIInput
    preferred_output: Turns
    non_preferred_output: Turns
    prompt_id: OptId = UNSET
    split: OptSplit = UNSET
    type: Absent = UNSET


SCHEMAS: dict[tuple[str, str], type[_Record]] = {
    ("halos", "binary"): HalosBinary,
    ("halos", "pairwise"): HalosPairwise,
    ("halos", "scalar"): HalosScalar,
    ("halos_sampled", "sampled"): HalosSampled,
    ("trl_preference", "pairwise"): TrlPreference,
    ("trl_unpaired", "binary"): TrlUnpaired,
    ("openai_preference", "pairwise"): OpenAIPreference,
}
assert set(HALOS_TYPES.values()) == {k for f, k in SCHEMAS if f == "halos"}

_DECODERS = {key: msgspec.json.Decoder(schema) for key, schema in SCHEMAS.items()}
_ENCODER = msgspec.json.Encoder()
_get_split = attrgetter("split")
_get_id = attrgetter("prompt_id")


def _sampled_prompt(record: HalosSampled) -> Any:
    return record.instruction if record.prompt is UNSET else record.prompt


_PROMPT_OF: dict[type, Any] = {schema: attrgetter("prompt") for schema in SCHEMAS.values()}
_PROMPT_OF[OpenAIPreference] = attrgetter("input.messages")
_PROMPT_OF[HalosSampled] = _sampled_prompt


def _normal_turns(prompt: Any, default_role: str = "user") -> list[Turn]:
    if isinstance(prompt, str):
        return [Turn.model_construct(role=default_role, content=prompt)]
    return [
        Turn.model_construct(
            role=t.role, content=t.content if isinstance(t.content, str) else "".join(p.text for p in t.content)
        )
        for t in prompt
    ]


def hash_fingerprint() -> int:
    """Differs between interpreters with different hash secrets: segments are comparable only when
    they were hashed by processes that share it (forked from one parent, e.g. a forkserver pool)."""
    return hash("halos-feedback-fast-path")


@dataclass
class Segment:
    """What one byte range of a file contributes (picklable; the table as packed int64 arrays)."""

    family: str
    kind: str
    fingerprint: int = field(default_factory=hash_fingerprint)
    n: int = 0
    n_test: int = 0
    derived: bool = False  # some record had no prompt_id
    explicit_h: bool = False  # some explicit prompt_id looks like a derived one ("h-…")
    keys: bytes = b""
    values: bytes = b""
    _table: dict[int, int] = field(default_factory=dict, repr=False)

    def pack(self) -> Segment:
        self.keys = array("q", self._table.keys()).tobytes()
        self.values = array("q", self._table.values()).tobytes()
        self._table = {}
        return self

    def table(self) -> dict[int, int]:
        return dict(zip(array("q", self.keys), array("q", self.values)))


def first_record_format(path: str | Path) -> tuple[str, str] | None:
    """(family, kind) of the file's first line, when the file is JSONL that starts with `{`."""
    with open(path, "rb") as fh:
        line = fh.readline(MAX_CHUNK)
    if not line.startswith(b"{") or not line.endswith(b"\n"):
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # the detailed scanner says what is wrong
        return None
    return detect(obj) if isinstance(obj, dict) else None


def _chunks(fh: Any, start: int, end: int, limit: int) -> Any:
    """Pieces of [start, end) that end at a newline and hold at most `limit` bytes; None when a
    line is longer than that."""
    fh.seek(start)
    pos = start
    carry = b""
    while pos < end or carry:
        block = fh.read(min(limit, end - pos)) if pos < end else b""
        pos += len(block)
        buf = carry + block if carry else block
        if not block:
            if buf:
                yield buf + b"\n" if not buf.endswith(b"\n") else buf
            return
        cut = buf.rfind(b"\n", 0, limit)
        if cut < 0:
            yield None
            return
        yield buf[: cut + 1]
        carry = buf[cut + 1 :]
        if len(carry) > limit:
            yield None
            return


def scan_segment(
    path: str | Path, start: int, end: int, family: str, kind: str, limits: FeedbackLimits
) -> Segment | None:
    """Prove the lines of [start, end) valid records of (family, kind); None when it cannot."""
    if limits.max_depth < SCHEMA_DEPTH:
        return None
    decode = _DECODERS[(family, kind)].decode
    encode = _ENCODER.encode
    seg = Segment(family, kind)
    table = seg._table
    limit = min(limits.max_record_bytes + 1, MAX_CHUNK)
    with open(path, "rb") as fh:
        for chunk in _chunks(fh, start, end, limit):
            if chunk is None or b"\\u003" in chunk:  # `\u003a`: a colon the count below cannot see
                return None
            try:
                records = [decode(line) for line in chunk.split(b"\n") if line]
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                return None
            if encode(records).count(b":") != chunk.count(b":"):
                return None  # a duplicate key, or a field outside the format
            if not _track(seg, table, records):
                return None
            seg.n += len(records)
            if seg.n > limits.max_records:
                return None
    return seg.pack()


def _track(seg: Segment, table: dict[int, int], records: list[Any]) -> bool:
    """Add the records' (prompt_id -> prompt, split) to `table`; False on any conflict."""
    ids = list(map(_get_id, records))
    is_test = list(map(eq, map(_get_split, records), repeat("test")))  # missing / null / "train": train
    seg.n_test += is_test.count(True)
    prompts = list(map(_PROMPT_OF[type(records[0])], records)) if records else []
    if UNSET in prompts:
        return False  # a sampled output with neither prompt nor instruction
    kinds = set(map(type, ids))
    if kinds <= {str}:
        seg.explicit_h = seg.explicit_h or "\nh-" in "\n" + "\n".join(ids)
        keys = list(map(hash, ids))
        values = list(map(hash, zip(prompts, is_test)))
    else:
        keys, values = [], []
        for pid, prompt, test in zip(ids, prompts, is_test):
            if pid is None or pid is UNSET:  # the detailed scanner's derived id: the prompt itself is the key
                seg.derived = True
                keys.append(hash(derived_prompt_id(_normal_turns(prompt))))
                values.append(hash((None, test)))
                continue
            pid = str(pid)
            seg.explicit_h = seg.explicit_h or pid.startswith("h-")
            keys.append(hash(pid))
            values.append(hash((prompt, test)))
    chunk_table = dict(zip(keys, values))
    if len(set(zip(keys, values))) != len(chunk_table):
        return False  # one id with two prompts or splits inside this chunk
    for key in filter(table.__contains__, chunk_table):  # iterate the small side
        if table[key] != chunk_table[key]:
            return False
    table.update(chunk_table)
    return True


def merge(segments: list[Segment | None], limits: FeedbackLimits) -> FeedbackSummary | None:
    """The summary of a file from its segments in order, or None (run the detailed scanner)."""
    if not segments or any(s is None for s in segments):
        return None
    first = segments[0]
    assert first is not None
    if any(
        (s.family, s.kind, s.fingerprint) != (first.family, first.kind, first.fingerprint)
        for s in segments
        if s is not None
    ):
        return None
    table: dict[int, int] = {}
    n = n_test = 0
    derived = explicit_h = False
    for seg in segments:
        assert seg is not None
        part = seg.table() if table else None
        if part is None:
            table = seg.table()
        else:
            small, big = (part, table) if len(part) < len(table) else (table, part)
            for key in filter(big.__contains__, small):
                if table[key] != part[key]:
                    return None
            table.update(part)
        n += seg.n
        n_test += seg.n_test
        derived = derived or seg.derived
        explicit_h = explicit_h or seg.explicit_h
    if n == 0 or n > limits.max_records or (derived and explicit_h):
        return None  # empty / too many: the detailed report; an explicit "h-…" id might equal a derived one
    fmt = "halos_jsonl" if first.family == "halos" else first.family
    return FeedbackSummary(
        kind=first.kind, format=fmt, n_records=n, n_prompts=len(table), n_train=n - n_test, n_test=n_test
    )


def split_points(path: str | Path, parts: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about equal size that begin at line starts."""
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as fh:
        for i in range(1, parts):
            target = max(bounds[-1], size * i // parts)
            fh.seek(target)
            fh.readline()  # to the start of the next line
            pos = fh.tell()
            if pos >= size:
                break
            if pos > bounds[-1]:
                bounds.append(pos)
    bounds.append(size)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def plan(path: str | Path, parts: int) -> tuple[tuple[str, str], list[tuple[int, int]]] | None:
    """The file's format and its segments, or None when the fast path does not apply."""
    fmt = first_record_format(path)
    if fmt is None or fmt not in SCHEMAS:
        return None
    return fmt, split_points(path, parts)


def fast_summary(path: str | Path, limits: FeedbackLimits) -> FeedbackSummary | None:
    """The whole file in this process: the summary, or None (run the detailed scanner)."""
    fmt = first_record_format(path)
    if fmt is None or fmt not in SCHEMAS:
        return None
    return merge([scan_segment(path, 0, os.path.getsize(path), *fmt, limits)], limits)

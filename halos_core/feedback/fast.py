"""A compiled fast path for validating *valid* JSONL feedback files (msgspec), with the detailed
scanner (`reader.validate_file`'s `_Walk`) as the authority.

`scan_segment` decodes whole chunks of lines with a typed msgspec decoder (one per format) and
returns a partial result, or None when it cannot *prove* the segment valid; `merge` combines the
segments of a file into the `FeedbackSummary` the detailed scanner would return and the findings
`quality.find` would return, or None. None
never means "invalid": the caller then runs the detailed scanner, which produces the summary or
the record-level report. So the fast path may be conservative (a valid file it does not handle,
e.g. records with fields outside their format, only costs time) but must never accept a file the
detailed scanner rejects, nor summarise one differently. What stands for each check:

- one record per non-empty line: each line is decoded on its own (trailing data is an error);
  empty lines are skipped (and counted for the findings' line numbers); whitespace-only lines, a
  byte-order mark, or anything but `{` first ⇒ None;
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

The same pass finds the data-quality findings (`quality.find`'s, identical: same counts, same
first examples with the same index, line and message) on the decoded structs, normalised the way
`formats.parse_record` normalises (a string prompt/output is one turn, content parts are joined,
ids are strings, a missing split is "train", a missing reward null):

- identical_outputs: the two outputs' normal forms are equal; empty_output: every turn's content
  is blank (`str.strip`); string_prompt: the prompt (sampled: the instruction when there is no
  prompt; OpenAI: input.messages) was a string;
- duplicate_record: records with equal normal forms, compared by a 64-bit hash of the normal form
  (`hash` of a tuple of its values; -0.0 and 0.0 rewards kept apart, as `json.dumps` keeps them);
  the detailed pass compares 128-bit digests. A segment keeps one table entry per distinct record;
  `merge` finds the duplicates across segments and keeps the first example of each code in file
  order.
- a chunk without string turns or content parts is in normal form already and is checked with
  whole-list operations; other chunks are normalised record by record.
"""

from __future__ import annotations

import json
import math
import os
import sys
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, eq
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec
import numpy as np
from msgspec import UNSET, Meta, Struct, UnsetType

from .formats import HALOS_TYPES, ROLES, derived_prompt_id, detect
from .quality import MAX_EXAMPLES, Findings, finding
from .records import FeedbackLimits, FeedbackSummary, Turn

MAX_CHUNK = 8 << 20
SCHEMA_DEPTH = 5  # record > list of turns > turn > list of content parts > part

Role = Literal.__getitem__(tuple(sorted(ROLES)))  # type: ignore[attr-defined]  # a Literal built from ROLES
NonEmpty = Annotated[str, Meta(min_length=1)]
Finite = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]


class _Part(Struct, frozen=True, gc=False):
    type: Literal["text"]
    text: str


class _Turn(Struct, frozen=True, gc=False):
    role: Role
    content: str | tuple[_Part, ...]


Turns = Union[str, Annotated[tuple[_Turn, ...], Meta(min_length=1)]]
OptId = Union[NonEmpty, int, None, UnsetType]
OptSplit = Union[Literal["train", "test"], None, UnsetType]
OptReward = Union[Finite, None, UnsetType]
Absent = UnsetType  # a key that must not be there (it would make `detect` pick another format)


class _Record(Struct, frozen=True, omit_defaults=True, gc=False):
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


class _OpenAIInput(Struct, frozen=True, gc=False):
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


def _norm(turns: Any, role: str) -> Any:
    """A prompt/output as written -> its normal form as a tuple of `_Turn`s with string content
    (equal and hash-equal to a decoded tuple of such turns)."""
    if type(turns) is str:
        return (_Turn(role, turns),)  # type: ignore[arg-type]  # a role of ROLES
    for t in turns:
        if type(t.content) is not str:
            return tuple(
                t if type(t.content) is str else _Turn(t.role, "".join(p.text for p in t.content)) for t in turns
            )
    return turns


_NEG_ZERO = ("-0.0",)  # json.dumps writes -0.0 apart from 0.0, but they are equal (and hash equal)


def _opt(values: list[Any]) -> list[Any]:
    """An optional number: missing (UNSET) and null are both None in the normal form."""
    if UNSET in values:
        values = [None if v is UNSET else v for v in values]
    return _floats(values)


def _floats(values: list[Any]) -> list[Any]:
    if 0.0 in values:
        values = [_NEG_ZERO if v == 0.0 and type(v) is float and math.copysign(1.0, v) < 0 else v for v in values]
    return values


def _as_is(values: list[Any]) -> list[Any]:
    return values


def _str_id(values: list[Any]) -> list[Any]:
    return [v if type(v) is str else str(v) for v in values]


def _dataset(values: list[Any]) -> list[Any]:
    return [v if type(v) is str else "" for v in values]  # missing / null: ""


@dataclass(frozen=True)
class _Shape:
    """Where a format's records keep what the data-quality checks and the normal form need."""

    prompt: Callable[[Any], Any]  # the prompt as written
    outputs: tuple[tuple[str, str], ...]  # (attribute, the normal form's field name, used in findings)
    extras: tuple[tuple[str, Callable[[list[Any]], list[Any]]], ...]  # the normal form's other fields
    turn_keys: tuple[str, ...]  # attributes that hold turns (prompt included)

    @property
    def pair(self) -> bool:
        return len(self.outputs) == 2

    @property
    def string_turns(self) -> tuple[bytes, ...]:
        return tuple(b'"%s":"' % k.encode() for k in self.turn_keys)


_P = attrgetter("prompt")
_SHAPES: dict[type, _Shape] = {
    HalosBinary: _Shape(_P, (("output", "output"),), (("label", _as_is), ("reward", _opt)), ("prompt", "output")),
    HalosPairwise: _Shape(
        _P,
        (("output_A", "output_A"), ("output_B", "output_B")),
        (("label", _as_is), ("reward_A", _opt), ("reward_B", _opt)),
        ("prompt", "output_A", "output_B"),
    ),
    HalosScalar: _Shape(_P, (("output", "output"),), (("reward", _floats),), ("prompt", "output")),
    HalosSampled: _Shape(
        _sampled_prompt,
        (("output", "output"),),
        (("sample_id", _str_id), ("dataset", _dataset)),
        ("prompt", "instruction", "output"),
    ),
    TrlPreference: _Shape(
        _P,
        (("chosen", "output_A"), ("rejected", "output_B")),
        (("score_chosen", _opt), ("score_rejected", _opt)),  # label: always 1
        ("prompt", "chosen", "rejected"),
    ),
    TrlUnpaired: _Shape(
        _P, (("completion", "output"),), (("label", _as_is),), ("prompt", "completion")
    ),  # true == 1 and hash(true) == hash(1): the normal form's int label
    OpenAIPreference: _Shape(
        attrgetter("input.messages"),
        (("preferred_output", "output_A"), ("non_preferred_output", "output_B")),
        (),
        ("messages", "preferred_output", "non_preferred_output"),
    ),
}
assert set(_SHAPES) == set(SCHEMAS.values())

# the order of one record's findings in quality.find
_RANK_IDENTICAL, _RANK_EMPTY, _RANK_STRING_PROMPT, _RANK_DUPLICATE = 0, 1, 3, 4


def hash_fingerprint() -> int:
    """Differs between interpreters with different hash secrets: segments are comparable only when
    they were hashed by processes that share it (forked from one parent, e.g. a forkserver pool)."""
    return hash("halos-feedback-fast-path")


@dataclass
class Segment:
    """What one byte range of a file contributes (picklable; the tables as packed int64 arrays).

    Indices and lines are the segment's own (0-based records, 1-based lines); `merge` shifts them."""

    family: str
    kind: str
    fingerprint: int = field(default_factory=hash_fingerprint)
    n: int = 0
    n_test: int = 0
    derived: bool = False  # some record had no prompt_id
    explicit_h: bool = False  # some explicit prompt_id looks like a derived one ("h-…")
    keys: bytes = b""
    values: bytes = b""
    # data-quality findings: counts and the first examples within the segment, as
    # (index, rank in its record, code, field, first index of a duplicate or -1, record hash);
    # one (record hash -> first index) entry per distinct record; blank lines as (first record
    # index after them, blank lines before that record) and in all
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int, int, str, str, int, int]] = field(default_factory=list)
    record_keys: bytes = b""
    record_firsts: bytes = b""
    blanks: list[tuple[int, int]] = field(default_factory=list)
    n_blank: int = 0
    _table: dict[int, int] = field(default_factory=dict, repr=False)
    _records: dict[int, int] = field(default_factory=dict, repr=False)
    # after `spill`: the four packed tables live in this file, one after the other (n_prompts and
    # n_distinct entries), and the process that merges reads them from there
    tables_path: str | None = None
    n_prompts: int = 0
    n_distinct: int = 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to the pool's caller) with the tables packed: 16 bytes an entry, not ~100."""
        state = dict(self.__dict__)
        table, records = state.pop("_table"), state.pop("_records")
        if table or records:
            state["keys"] = array("q", table.keys()).tobytes()
            state["values"] = array("q", table.values()).tobytes()
            state["record_keys"] = array("q", records.keys()).tobytes()
            state["record_firsts"] = array("q", records.values()).tobytes()
        state["_table"], state["_records"] = {}, {}
        return state

    def spill(self, path: str | Path) -> None:
        """Move the tables to a file at `path` (the caller removes it): what is sent back to the
        process that collects the segments is then a few counters and examples, not ~32 bytes a
        record; the merge reads the tables from the file."""
        p_keys, p_values = self.prompt_arrays()
        r_keys, r_firsts = self.record_arrays()
        with open(path, "wb") as fh:
            for table in (p_keys, p_values, r_keys, r_firsts):
                fh.write(table.tobytes())
        self.tables_path, self.n_prompts, self.n_distinct = str(path), len(p_keys), len(r_keys)
        self._table, self._records = {}, {}
        self.keys = self.values = self.record_keys = self.record_firsts = b""

    def _spilled(self, first: int, count: int) -> np.ndarray:
        assert self.tables_path is not None
        return np.fromfile(self.tables_path, dtype=np.int64, count=count, offset=first * 8)

    def prompt_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_id hashes, prompt-and-split hashes) as int64 arrays (views of the packed table)."""
        if self.tables_path is not None:
            n = self.n_prompts
            return self._spilled(0, n), self._spilled(n, n)
        if self._table:
            n = len(self._table)
            return np.fromiter(self._table.keys(), np.int64, n), np.fromiter(self._table.values(), np.int64, n)
        return np.frombuffer(self.keys, np.int64), np.frombuffer(self.values, np.int64)

    def record_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(record hashes, the index of each one's first copy in this segment) as int64 arrays."""
        if self.tables_path is not None:
            n, m = self.n_prompts, self.n_distinct
            return self._spilled(2 * n, m), self._spilled(2 * n + m, m)
        if self._records:
            n = len(self._records)
            return np.fromiter(self._records.keys(), np.int64, n), np.fromiter(self._records.values(), np.int64, n)
        return np.frombuffer(self.record_keys, np.int64), np.frombuffer(self.record_firsts, np.int64)

    def line(self, index: int) -> int:
        """The 1-based line (within the segment) of record `index`."""
        at = bisect_right(self.blanks, (index, sys.maxsize)) - 1
        return index + 1 + (self.blanks[at][1] if at >= 0 else 0)

    def note(self, index: int, rank: int, code: str, field_: str, first: int = -1, key: int = 0) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((index, rank, code, field_, first, key))


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
    """Pieces of [start, end) that end at a newline and hold at most `limit` bytes (the last one
    gets a newline if the file lacks it); None when a line is longer than that."""
    fh.seek(start)
    pos = start
    carry = b""
    while True:
        block = fh.read(min(limit - len(carry), end - pos)) if pos < end else b""
        pos += len(block)
        buf = carry + block if carry else block
        if pos >= end or not block:  # the last piece (or the file got shorter)
            if buf:
                if not buf.endswith(b"\n"):
                    if len(buf) - buf.rfind(b"\n") - 1 >= limit:
                        yield None
                        return
                    buf += b"\n"
                yield buf
            return
        cut = buf.rfind(b"\n")  # buf holds `limit` bytes here: without a newline, one line is longer
        if cut < 0:
            yield None
            return
        yield buf[: cut + 1]
        carry = buf[cut + 1 :]


def scan_segment(
    path: str | Path, start: int, end: int, family: str, kind: str, limits: FeedbackLimits
) -> Segment | None:
    """Prove the lines of [start, end) valid records of (family, kind) and find their data-quality
    findings; None when it cannot."""
    if limits.max_depth < SCHEMA_DEPTH:
        return None
    decode = _DECODERS[(family, kind)].decode
    encode = _ENCODER.encode
    shape = _SHAPES[SCHEMAS[(family, kind)]]
    seg = Segment(family, kind)
    limit = min(limits.max_record_bytes + 1, MAX_CHUNK)
    with open(path, "rb") as fh:
        for chunk in _chunks(fh, start, end, limit):
            if chunk is None or b"\\u003" in chunk:  # `\u003a`: a colon the count below cannot see
                return None
            lines = chunk.split(b"\n")
            try:
                records = [decode(line) for line in lines if line]
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                return None
            encoded = encode(records)
            if encoded.count(b":") != chunk.count(b":"):
                return None  # a duplicate key, or a field outside the format
            _count_blank_lines(seg, lines, len(records))
            normal = _normal_form(shape, records)
            if normal is None or not _track(seg, normal):
                return None
            _quality(seg, shape, normal)
            seg.n += len(records)
            if seg.n > limits.max_records:
                return None
    return seg


def _count_blank_lines(seg: Segment, lines: list[bytes], n_records: int) -> None:
    """Blank lines are not records but count as lines (the findings' `line`)."""
    recorded = seg.blanks[-1][1] if seg.blanks else 0
    if n_records == len(lines) - 1:  # none in this chunk (the chunk ends with a newline: one empty piece)
        if seg.n_blank != recorded and n_records:  # the previous chunk ended with some
            seg.blanks.append((seg.n, seg.n_blank))
        return
    index, blank = seg.n, seg.n_blank
    for line in lines[:-1]:
        if not line:
            blank += 1
            continue
        if blank != recorded:
            seg.blanks.append((index, blank))
            recorded = blank
        index += 1
    seg.n_blank = blank


@dataclass
class _Normal:
    """One chunk's records in normal form, column by column."""

    ids: list[Any]  # str; None for a missing id (the derived id is a function of the prompt)
    prompts: list[Any]  # tuples of `_Turn`s with string content
    outputs: list[list[Any]]
    contents: list[list[str]]  # per output column, the content of every turn
    extras: list[list[Any]]
    is_test: list[bool]
    string_prompts: list[int]  # indices in the chunk of the records whose prompt was a string


def _normal_form(shape: _Shape, records: list[Any]) -> _Normal | None:
    ids = list(map(_get_id, records))
    if not set(map(type, ids)) <= {str}:
        ids = [None if v is None or v is UNSET else v if type(v) is str else str(v) for v in ids]
    prompts = list(map(shape.prompt, records))
    if UNSET in prompts:
        return None  # a sampled output with neither prompt nor instruction
    outputs = [list(map(attrgetter(a), records)) for a, _ in shape.outputs]
    string_prompts: list[int] = []
    contents = [[t.content for turns in col for t in turns] for col in outputs] if _all_turns(prompts, outputs) else []
    if not contents or any(set(map(type, c)) - {str} for c in contents):  # string turns or content parts
        string_prompts = [i for i, p in enumerate(prompts) if type(p) is str]
        prompts = [_norm(p, "user") for p in prompts]
        outputs = [[_norm(o, "assistant") for o in col] for col in outputs]
        contents = [[t.content for turns in col for t in turns] for col in outputs]
    return _Normal(
        ids=ids,
        prompts=prompts,
        outputs=outputs,
        contents=contents,
        extras=[norm(list(map(attrgetter(a), records))) for a, norm in shape.extras],
        is_test=list(map(eq, map(_get_split, records), repeat("test"))),  # missing / null / "train": train
        string_prompts=string_prompts,
    )


def _all_turns(prompts: list[Any], outputs: list[list[Any]]) -> bool:
    """No prompt or output given as a string, and no prompt turn with content parts."""
    if any(str in set(map(type, col)) for col in (prompts, *outputs)):
        return False
    return set(map(type, [t.content for turns in prompts for t in turns])) <= {str}


def _track(seg: Segment, normal: _Normal) -> bool:
    """Add the records' (prompt_id -> prompt, split) to the segment's table; False on any conflict."""
    table = seg._table
    ids, prompts, is_test = normal.ids, normal.prompts, normal.is_test
    seg.n_test += is_test.count(True)
    if None not in ids:
        seg.explicit_h = seg.explicit_h or "\nh-" in "\n" + "\n".join(ids)
        keys = list(map(hash, ids))
        values = list(map(hash, zip(prompts, is_test)))
    else:
        keys, values = [], []
        for pid, prompt, test in zip(ids, prompts, is_test):
            if pid is None:  # the detailed scanner's derived id: the prompt itself is the key
                seg.derived = True
                keys.append(hash(derived_prompt_id(_normal_turns(prompt))))
                values.append(hash((None, test)))
                continue
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


def _quality(seg: Segment, shape: _Shape, normal: _Normal) -> None:
    """The chunk's data-quality findings, in quality.find's order (by record, then by check)."""
    base = seg.n
    found: list[tuple[int, int, str, str, int, int]] = []  # as Segment.examples
    outputs = normal.outputs
    if shape.pair:
        same = list(map(eq, outputs[0], outputs[1]))
        if True in same:
            found += [
                (base + i, _RANK_IDENTICAL, "identical_outputs", "output_B", -1, 0) for i, s in enumerate(same) if s
            ]
    for pos, ((_, name), column, contents) in enumerate(zip(shape.outputs, outputs, normal.contents)):
        if "" in contents or any(map(str.isspace, contents)):
            found += [
                (base + i, _RANK_EMPTY + pos, "empty_output", name, -1, 0)
                for i, turns in enumerate(column)
                if all(not t.content.strip() for t in turns)
            ]
    found += [(base + i, _RANK_STRING_PROMPT, "string_prompt", "prompt", -1, 0) for i in normal.string_prompts]
    keys = list(map(hash, zip(normal.ids, normal.prompts, *outputs, *normal.extras, normal.is_test)))
    table = seg._records
    firsts = dict(zip(reversed(keys), range(base + len(keys) - 1, base - 1, -1)))  # key -> its first index here
    if len(firsts) != len(keys) or any(map(table.__contains__, firsts)):
        for i, key in enumerate(keys):
            first = table.setdefault(key, base + i)
            if first != base + i:
                found.append((base + i, _RANK_DUPLICATE, "duplicate_record", "", first, key))
    else:
        table.update(firsts)
    for item in sorted(found):  # the checks ran one after the other: note them in record order
        seg.note(*item)


def merge(segments: list[Segment | None], limits: FeedbackLimits) -> tuple[FeedbackSummary, Findings] | None:
    """The summary and the data-quality findings of a file from its segments in order, or None
    (run the detailed scanner).

    The segments' tables stay packed: prompts are checked and counted, and duplicates found across
    segments, by sorting int64 arrays (16-24 bytes an entry) rather than building a Python dict or
    set of every distinct prompt and record (~100 bytes an entry, ~40 MiB for 200k records)."""
    if not segments or any(s is None for s in segments):
        return None
    segs = [s for s in segments if s is not None]
    first = segs[0]
    if any((s.family, s.kind, s.fingerprint) != (first.family, first.kind, first.fingerprint) for s in segs):
        return None
    n = sum(s.n for s in segs)
    n_test = sum(s.n_test for s in segs)
    derived = any(s.derived for s in segs)
    explicit_h = any(s.explicit_h for s in segs)
    if n == 0 or n > limits.max_records or (derived and explicit_h):
        return None  # empty / too many: the detailed report; an explicit "h-…" id might equal a derived one
    n_prompts = _distinct_prompts([s.prompt_arrays() for s in segs])
    if n_prompts is None:
        return None
    fmt = "halos_jsonl" if first.family == "halos" else first.family
    summary = FeedbackSummary(
        kind=first.kind, format=fmt, n_records=n, n_prompts=n_prompts, n_train=n - n_test, n_test=n_test
    )
    return summary, _merge_findings(segs)


def _distinct_prompts(tables: list[tuple[np.ndarray, np.ndarray]]) -> int | None:
    """How many distinct prompt_ids the segments hold, or None when one id has two (prompt, split)
    values in different segments (within a segment `_track` already refused that)."""
    keys = np.concatenate([k for k, _ in tables])
    values = np.concatenate([v for _, v in tables])
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    del order
    same = keys[1:] == keys[:-1]
    if bool(np.any(values[1:][same] != values[:-1][same])):
        return None
    return len(keys) - int(np.count_nonzero(same))


def _merge_findings(segments: list[Segment]) -> Findings:
    tables = [s.record_arrays() for s in segments]
    keys = np.concatenate([k for k, _ in tables])  # every segment's distinct records, in segment order
    firsts = np.concatenate([f for _, f in tables])
    seg_of = np.repeat(np.arange(len(segments)), [len(k) for k, _ in tables])
    del tables
    order = np.argsort(keys, kind="stable")  # equal hashes stay in segment order: the file's first copy leads
    sorted_keys = keys[order]
    later = np.zeros(len(order), dtype=bool)
    later[1:] = sorted_keys[1:] == sorted_keys[:-1]
    again = order[later]  # records first seen in their segment, but not first in the file
    again_per_seg = np.bincount(seg_of[again], minlength=len(segments))
    offsets = np.cumsum([0] + [s.n for s in segments])

    def file_first(key: int) -> tuple[int, int]:
        """(segment, file index) of the first copy of record hash `key` in the file."""
        i = int(order[np.searchsorted(sorted_keys, key)])
        return int(seg_of[i]), int(offsets[seg_of[i]] + firsts[i])

    counts: dict[str, int] = {}
    examples: list[tuple[int, int, int, str, str, int]] = []  # (index, rank, line, code, field, first)
    line_offset = 0
    for k, seg in enumerate(segments):
        for code, count in seg.counts.items():
            counts[code] = counts.get(code, 0) + count
        if again_per_seg[k]:
            counts["duplicate_record"] = counts.get("duplicate_record", 0) + int(again_per_seg[k])
        if len(examples) < MAX_EXAMPLES:
            found = list(seg.examples)
            if again_per_seg[k]:
                mine = again[seg_of[again] == k]
                mine = mine[np.argsort(firsts[mine], kind="stable")[:MAX_EXAMPLES]]  # only the first can be shown
                found += [
                    (int(firsts[i]), _RANK_DUPLICATE, "duplicate_record", "", int(firsts[i]), int(keys[i]))
                    for i in mine
                ]
            for i, rank, code, f, first, key in sorted(found)[: MAX_EXAMPLES - len(examples)]:
                # a duplicate's first copy: in an earlier segment when there is one, else in this one
                if first < 0:
                    dup_of = -1
                else:
                    seg0, index0 = file_first(key)
                    dup_of = index0 if seg0 < k else int(offsets[k]) + first
                examples.append((int(offsets[k]) + i, rank, line_offset + seg.line(i), code, f, dup_of))
        line_offset += seg.n + seg.n_blank
    return Findings(counts=counts, examples=[finding(c, i, line, f, first) for i, _, line, c, f, first in examples])


def split_points(path: str | Path, parts: int, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """[a, b) byte ranges of about equal size covering [start, end) (default: the whole file) that
    begin at line starts (`start` must be one)."""
    end = os.path.getsize(path) if end is None else end
    bounds = [start]
    with open(path, "rb") as fh:
        for i in range(1, parts):
            target = max(bounds[-1], start + (end - start) * i // parts)
            fh.seek(target)
            fh.readline()  # to the start of the next line
            pos = fh.tell()
            if pos >= end:
                break
            if pos > bounds[-1]:
                bounds.append(pos)
    bounds.append(end)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def plan(path: str | Path, parts: int) -> tuple[tuple[str, str], list[tuple[int, int]]] | None:
    """The file's format and its segments, or None when the fast path does not apply."""
    fmt = first_record_format(path)
    if fmt is None or fmt not in SCHEMAS:
        return None
    return fmt, split_points(path, parts)


def scan_range(path: str | Path, start: int, end: int, limits: FeedbackLimits) -> Segment | None:
    """`scan_segment` of [start, end) in the format of the file's first record (for segments cut
    while the file is still being written: its first line is complete by then)."""
    fmt = first_record_format(path)
    if fmt is None or fmt not in SCHEMAS:
        return None
    return scan_segment(path, start, end, *fmt, limits)


def fast_check(path: str | Path, limits: FeedbackLimits) -> tuple[FeedbackSummary, Findings] | None:
    """The whole file in this process: the summary and the data-quality findings, or None (run the
    detailed scanner and `quality.find`)."""
    fmt = first_record_format(path)
    if fmt is None or fmt not in SCHEMAS:
        return None
    return merge([scan_segment(path, 0, os.path.getsize(path), *fmt, limits)], limits)


def fast_summary(path: str | Path, limits: FeedbackLimits) -> FeedbackSummary | None:
    """The whole file in this process: the summary, or None (run the detailed scanner)."""
    checked = fast_check(path, limits)
    return None if checked is None else checked[0]

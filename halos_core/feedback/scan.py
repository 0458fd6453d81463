"""Streaming split of a feedback file into raw records (bytes -> parsed JSON values).

A file is either a JSON array (first non-blank byte `[`) or JSON Lines (first non-blank byte `{`).
Neither is ever loaded whole:

- JSONL is read line by line with a bounded `readline`; a line over `max_record_bytes` is
  skipped in bounded chunks and reported as `record_too_large`.
- A JSON array is cut into its elements by a small byte-level scanner that tracks strings,
  escapes and bracket depth (no recursion, so 20,000-deep nesting is just a counter). Only the
  current element is buffered, and only up to `max_record_bytes`.

Each record is checked for nesting depth *before* it is handed to `json.loads` (so the C decoder
never recurses deeper than `max_depth`), decoded as strict UTF-8 and parsed with duplicate-key
detection. Problems become `RecordError`s; structural damage that makes the rest of a JSON array
unreadable (mismatched brackets, a truncated file, trailing garbage) is reported once as fatal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .records import FeedbackLimits, RecordError

CHUNK = 1 << 20
_WS = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_STRUCT_TOP = re.compile(rb'["\[\]{},]')  # at depth 1 (inside the top-level array) commas separate records
_STRUCT_IN = re.compile(rb'["\[\]{}]')  # deeper, only strings and brackets matter
_BACKSLASH = 0x5C
_OPEN = {0x5B: 0x5D, 0x7B: 0x7D}  # [ -> ], { -> }
_CLOSERS = (0x5D, 0x7D)

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

_JSONL_HINT = "JSON Lines needs one complete record per line; a pretty-printed file must be a JSON array of records"


@dataclass
class RawItem:
    index: int
    line: int | None
    value: Any = None
    error: RecordError | None = None
    fatal: bool = False  # nothing after this item can be read


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _err(
    index: int, line: int | None, code: str, message: str, hint: str | None = None, field: str = ""
) -> RecordError:
    return RecordError(index=index, line=line, field=field, code=code, message=message, hint=hint)


def depth_exceeds(data: bytes, max_depth: int) -> bool:
    """True when the JSON text `data` nests deeper than `max_depth` (strings are skipped)."""
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False  # cannot be deeper than the number of openers
    depth = 0
    pos = 0
    n = len(data)
    search = _STRUCT_IN.search
    while pos < n:
        m = search(data, pos)
        if m is None:
            return False
        k = m.start()
        c = data[k]
        if c == 0x22:  # skip the string
            pos = _string_end(data, k + 1)
            if pos < 0:
                return False  # unterminated: json.loads reports it
            continue
        if c in _OPEN:
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
        pos = k + 1
    return False


def _string_end(data: bytes, pos: int) -> int:
    """Index just past the closing quote of a string whose content starts at `pos`, or -1."""
    while True:
        i = data.find(b'"', pos)
        if i < 0:
            return -1
        if data[i - 1] != _BACKSLASH:
            return i + 1
        seg = data[pos:i]
        run = len(seg) - len(seg.rstrip(b"\\"))
        if run % 2 == 0:
            return i + 1
        pos = i + 1


def parse_value(raw: bytes, index: int, line: int | None, limits: FeedbackLimits, depth_checked: bool) -> RawItem:
    """Decode and parse one record's bytes (already known to be within the size limit)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawItem(
            index,
            line,
            error=_err(
                index,
                line,
                "invalid_utf8",
                f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start} of the record)",
                "save the file as UTF-8 (JSON files must be UTF-8)",
            ),
        )
    if not depth_checked and depth_exceeds(raw, limits.max_depth):
        return RawItem(index, line, error=_too_deep(index, line, limits))
    try:
        value = json.loads(text, object_pairs_hook=_object_pairs)
    except _DuplicateKey as exc:
        return RawItem(
            index,
            line,
            error=_err(
                index,
                line,
                "duplicate_key",
                f"key {exc.key[:100]!r} appears twice in one object",
                "keep one value per key (JSON parsers disagree on which duplicate wins)",
                field=exc.key[:100],
            ),
        )
    except json.JSONDecodeError as exc:
        where = f"column {exc.colno}" if line is not None else f"character {exc.pos} of the record"
        hint = _JSONL_HINT if line is not None else "check for a missing comma, quote or bracket"
        return RawItem(index, line, error=_err(index, line, "invalid_json", f"{exc.msg} ({where})", hint))
    except RecursionError:  # unreachable after the depth check; kept as a guard
        return RawItem(index, line, error=_too_deep(index, line, limits))
    except ValueError as exc:  # e.g. an integer with more than 4300 digits
        return RawItem(index, line, error=_err(index, line, "invalid_json", str(exc)))
    if _SURROGATE_ESCAPE.search(raw):  # "\ud83d\ude00" pairs are fine, a lone "\ud800" is not Unicode
        path = _lone_surrogate(value, "")
        if path is not None:
            return RawItem(
                index,
                line,
                error=_err(
                    index,
                    line,
                    "invalid_utf8",
                    "string has an unpaired surrogate escape (\\ud800-\\udfff), which is not valid Unicode",
                    "fix the encoder that wrote the file (emoji must be escaped as surrogate pairs)",
                    field=path,
                ),
            )
    return RawItem(index, line, value=value)


def _lone_surrogate(value: Any, path: str) -> str | None:
    """Path of the first string (or key) that cannot be encoded as UTF-8, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key[:100]}" if path else key[:100]
            found = _lone_surrogate(key, sub)
            if found is None:
                found = _lone_surrogate(item, sub)
            if found is not None:
                return found
    elif isinstance(value, list):
        for j, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{j}]")
            if found is not None:
                return found
    return None


def _too_deep(index: int, line: int | None, limits: FeedbackLimits) -> RecordError:
    return _err(
        index,
        line,
        "too_deep",
        f"record nests deeper than {limits.max_depth} levels",
        "a feedback record needs only a few levels (record > list of turns > turn)",
    )


def _too_large(index: int, line: int | None, size: int, limits: FeedbackLimits) -> RecordError:
    return _err(
        index,
        line,
        "record_too_large",
        f"record is {size:,} bytes, over the limit of {limits.max_record_bytes:,} bytes",
        "split very long conversations or outputs, or check that records are separated by newlines",
    )


# --------------------------------------------------------------------------- the reader


class RawReader:
    """Iterate over the raw records of a file; `container` is "json" or "jsonl" once opened."""

    def __init__(self, path: str | Path, limits: FeedbackLimits):
        self.path = Path(path)
        self.limits = limits
        self.container: str | None = None

    def __iter__(self) -> Iterator[RawItem]:
        with open(self.path, "rb") as fh:
            head = fh.read(max(CHUNK, 4))
            if head.startswith((b"\xff\xfe", b"\xfe\xff")):
                yield RawItem(
                    0,
                    1,
                    fatal=True,
                    error=_err(0, 1, "invalid_utf8", "file is UTF-16 encoded", "save the file as UTF-8"),
                )
                return
            start = 3 if head.startswith(_BOM) else 0
            # find the first non-blank byte (reading on through leading blank space)
            skipped_lines = 0
            while True:
                stripped = head[start:].lstrip(_WS)
                if stripped or not head:
                    break
                skipped_lines += head.count(b"\n", start)
                head, start = fh.read(CHUNK), 0
            if not head:
                self.container = "jsonl"
                return  # no records: the caller reports empty_file
            first_pos = len(head) - len(stripped)
            first = head[first_pos]
            if first == 0x5B:  # [
                self.container = "json"
                yield from self._array(fh, head, first_pos)
            elif first == 0x7B:  # {
                self.container = "jsonl"
                fh.seek(0)
                yield from self._jsonl(fh)
            else:
                line = skipped_lines + head.count(b"\n", 0, first_pos) + 1
                shown = chr(first) if 0x20 < first < 0x7F else f"byte 0x{first:02x}"
                yield RawItem(
                    0,
                    line,
                    fatal=True,
                    error=_err(
                        0,
                        line,
                        "unknown_format",
                        f"file is neither a JSON array nor JSON Lines (it starts with {shown!r})",
                        "upload a JSON array of records ([{...}, {...}]) or JSON Lines (one {...} record per line)",
                    ),
                )

    # ----------------------------------------------------------------------- JSONL

    def _jsonl(self, fh: BinaryIO) -> Iterator[RawItem]:
        limit = self.limits.max_record_bytes
        line_no = 0
        index = 0
        while True:
            chunk = fh.readline(limit + 2)
            if not chunk:
                return
            line_no += 1
            if line_no == 1 and chunk.startswith(_BOM):
                chunk = chunk[3:]
            if not chunk.endswith(b"\n") and len(chunk) >= limit + 2:
                size = len(chunk)
                while True:  # skip the rest of the line in bounded pieces
                    rest = fh.readline(CHUNK)
                    size += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                size -= 1 if rest.endswith(b"\n") else 0
                yield RawItem(index, line_no, error=_too_large(index, line_no, size, self.limits))
                index += 1
                continue
            content = chunk[:-1] if chunk.endswith(b"\n") else chunk
            if content.endswith(b"\r"):
                content = content[:-1]
            if not content.strip(_WS):
                continue  # blank lines are not records
            if len(content) > limit:
                yield RawItem(index, line_no, error=_too_large(index, line_no, len(content), self.limits))
            else:
                yield parse_value(content, index, line_no, self.limits, depth_checked=False)
            index += 1

    # ----------------------------------------------------------------------- JSON array

    def _array(self, fh: BinaryIO, buf: bytes, open_pos: int) -> Iterator[RawItem]:
        limits = self.limits
        max_bytes = limits.max_record_bytes
        stack_cap = limits.max_depth + 2  # the top-level '[' + max_depth levels + 1 to notice "too deep"
        pos = open_pos + 1
        depth = 1
        stack = bytearray(b"[")
        in_str = False
        bs_run = 0  # backslashes at the end of the previous chunk while inside a string
        index = 0
        # the current element
        parts: list[bytes] = []
        size = 0
        oversized = False
        too_deep = False
        elem_start = pos
        commas = 0

        def finish(end: int) -> RawItem | None:
            nonlocal parts, size, oversized, too_deep
            item: RawItem | None
            if oversized:
                item = RawItem(index, None, error=_too_large(index, None, size + (end - elem_start), limits))
            else:
                raw = (b"".join(parts) + buf[elem_start:end]).strip(_WS)
                if len(raw) > max_bytes:
                    item = RawItem(index, None, error=_too_large(index, None, len(raw), limits))
                elif not raw:
                    item = None  # caller decides: empty array or stray comma
                elif too_deep:
                    item = RawItem(index, None, error=_too_deep(index, None, limits))
                else:
                    item = parse_value(raw, index, None, limits, depth_checked=True)
            parts, size, oversized, too_deep = [], 0, False, False
            return item

        while True:
            n = len(buf)
            while pos < n:
                if in_str:
                    i = buf.find(b'"', pos)
                    if i < 0:
                        seg = buf[pos:]
                        run = len(seg) - len(seg.rstrip(b"\\"))
                        bs_run = bs_run + run if run == len(seg) else run
                        pos = n
                        break
                    if i == pos:
                        run = bs_run
                    elif buf[i - 1] != _BACKSLASH:
                        run = 0
                    else:
                        seg = buf[pos:i]
                        run = len(seg) - len(seg.rstrip(b"\\"))
                        if run == len(seg):
                            run += bs_run
                    bs_run = 0
                    pos = i + 1
                    if run % 2 == 0:
                        in_str = False
                    continue
                m = (_STRUCT_TOP if depth == 1 else _STRUCT_IN).search(buf, pos)
                if m is None:
                    pos = n
                    break
                k = m.start()
                c = buf[k]
                pos = k + 1
                if c == 0x22:
                    in_str = True
                    bs_run = 0
                elif c in _OPEN:
                    depth += 1
                    if depth <= stack_cap:
                        stack.append(c)
                    if depth - 1 > limits.max_depth:
                        too_deep = True
                elif c in _CLOSERS:
                    if depth <= stack_cap:
                        opener = stack.pop()
                        if _OPEN[opener] != c:
                            yield RawItem(
                                index,
                                None,
                                fatal=True,
                                error=_err(
                                    index,
                                    None,
                                    "invalid_json",
                                    f"mismatched brackets: {chr(opener)!r} closed by {chr(c)!r}",
                                    "check the record for a missing or extra bracket",
                                ),
                            )
                            return
                    depth -= 1
                    if depth == 0:  # the top-level array is closed
                        item = finish(k)
                        if item is not None:
                            yield item
                        elif commas:
                            yield RawItem(
                                index,
                                None,
                                error=_err(
                                    index,
                                    None,
                                    "invalid_json",
                                    "trailing comma before ']'",
                                    "remove the comma after the last record",
                                ),
                            )
                        yield from self._trailing(fh, buf, pos, index + (item is not None or commas > 0))
                        return
                else:  # a comma between two records
                    commas += 1
                    item = finish(k)
                    yield (
                        item
                        if item is not None
                        else RawItem(
                            index,
                            None,
                            error=_err(
                                index,
                                None,
                                "invalid_json",
                                "empty record (two commas in a row or a comma after '[')",
                                "remove the extra comma",
                            ),
                        )
                    )
                    index += 1
                    elem_start = pos
            # end of this chunk: keep the current element's bytes (up to the limit)
            if not oversized:
                tail = buf[elem_start:]
                if not parts:
                    tail = tail.lstrip(_WS)  # blank space before the record does not count
                if tail:
                    size += len(tail)
                    if size > max_bytes:
                        oversized = True
                        parts = []
                    else:
                        parts.append(tail)
            else:
                size += n - elem_start
            buf = fh.read(CHUNK)
            pos = 0
            elem_start = 0
            if not buf:
                yield RawItem(
                    index,
                    None,
                    fatal=True,
                    error=_err(
                        index,
                        None,
                        "invalid_json",
                        "unexpected end of file inside the JSON array" + (" (inside a string)" if in_str else ""),
                        "the file looks truncated: check that the upload completed and the array ends with ']'",
                    ),
                )
                return

    def _trailing(self, fh: BinaryIO, buf: bytes, pos: int, index: int) -> Iterator[RawItem]:
        while True:
            rest = buf[pos:].strip(_WS)
            if rest:
                yield RawItem(
                    index,
                    None,
                    fatal=True,
                    error=_err(
                        index,
                        None,
                        "invalid_json",
                        "unexpected data after the closing ']' of the array",
                        "a JSON file must hold exactly one array; for one record per line use JSON Lines",
                    ),
                )
                return
            buf, pos = fh.read(CHUNK), 0
            if not buf:
                return

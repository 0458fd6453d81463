"""Validation that starts while an upload arrives (server/services/validation_pool.Pipeline): a real
pool of worker processes, fed by the real upload writer (storage.receive_raw / receive_multipart),
with the segment and flush sizes made small so that a small file is cut into many segments.

The property: the segments started during the upload plus the rest give exactly what the
detailed pass gives — the summary and the data-quality findings of a valid file, the record-level
report of an invalid one — and the pipeline did start segments before the upload ended."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from halos_core.feedback import FeedbackLimits, FeedbackValidationError, validate_file
from halos_core.feedback.quality import find
from halos_core.synthetic import pairwise_records
from server import storage
from server.services import validation_pool
from server.services.validation_pool import ValidationPool

LIMITS = FeedbackLimits()


@pytest.fixture(scope="module")
def pool() -> Iterator[ValidationPool]:
    p = ValidationPool(2)
    yield p
    p.shutdown()


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "_FLUSH_BYTES", 4096)
    monkeypatch.setattr(validation_pool, "SEGMENT_BYTES", 20_000)


async def _body(data: bytes, size: int = 1500) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def records() -> list[dict]:
    recs = pairwise_records(400, seed=5, test_fraction=0.1)
    recs[7] = {**recs[7], "output_B": recs[7]["output_A"]}  # identical outputs
    recs[300] = {**recs[300], "prompt": "plain"}  # a string prompt, late in the file
    return recs + recs[:30]  # duplicates of records in the first segment


def upload(tmp_path: Path, pool: ValidationPool, data: bytes, multipart: bool = False):
    pipeline = pool.pipeline(LIMITS)
    if multipart:
        body = (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n' + data + b"\r\n--b--\r\n"
        )
        coro = storage.receive_multipart(
            _body(body), "multipart/form-data; boundary=b", tmp_dir=tmp_path, max_bytes=10**8, on_flush=pipeline.flushed
        )
    else:
        coro = storage.receive_raw(_body(data), tmp_dir=tmp_path, max_bytes=10**8, on_flush=pipeline.flushed)
    staged = asyncio.run(coro)
    started = len(pipeline.futures)
    return staged, pipeline, started


@pytest.mark.parametrize("multipart", [False, True])
def test_a_valid_upload_checked_while_it_arrives(tmp_path: Path, pool: ValidationPool, multipart: bool) -> None:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records())
    staged, pipeline, started = upload(tmp_path, pool, data, multipart)
    assert staged.path.read_bytes() == data
    assert started >= 5  # most of the file was cut into segments during the upload
    summary, found = pool.check(staged.path, LIMITS, pipeline)
    assert summary == validate_file(staged.path, LIMITS, fast=False)
    assert found.to_json() == find(staged.path).to_json()
    assert found.counts == {"identical_outputs": 2, "string_prompt": 1, "duplicate_record": 30}  # (record 7 twice)
    # the API process got each segment's counters and examples; its tables went to a file beside
    # the upload (read by the merging worker), removed when the check ended
    segments = [f.result() for f in pipeline.futures]
    assert all(s.tables_path and not (s.keys or s.record_keys or s._table or s._records) for s in segments)
    assert _leftovers(tmp_path, staged.path) == []


def _leftovers(tmp_path: Path, staged: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p != staged)


def test_a_cancelled_upload_leaves_no_table_files(tmp_path: Path, pool: ValidationPool) -> None:
    """The upload failed (or was a replay) after segments started: those still running remove
    their tables once written; none is left beside the upload."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records())
    staged, pipeline, started = upload(tmp_path, pool, data)
    assert started >= 5
    pipeline.cancel()
    for future in pipeline.futures:
        if not future.cancelled():
            future.exception(timeout=60)
    deadline = time.monotonic() + 10  # a future's done-callbacks run just after its waiters wake
    while _leftovers(tmp_path, staged.path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftovers(tmp_path, staged.path) == []


def test_an_invalid_upload_gets_the_detailed_report(tmp_path: Path, pool: ValidationPool) -> None:
    recs = records()
    recs[350] = {**recs[350], "label": 2}  # in a segment cut during the upload
    recs.append({**recs[3], "prompt": "another prompt"})  # conflicts with record 3, in the tail
    data = b"".join(json.dumps(r).encode() + b"\n" for r in recs)
    staged, pipeline, started = upload(tmp_path, pool, data)
    assert started >= 5
    with pytest.raises(FeedbackValidationError) as want:
        validate_file(staged.path, LIMITS, fast=False)
    with pytest.raises(FeedbackValidationError) as got:
        pool.check(staged.path, LIMITS, pipeline)
    assert got.value.errors == want.value.errors
    assert {e.code for e in got.value.errors} == {"invalid_label", "conflicting_prompt"}
    assert _leftovers(tmp_path, staged.path) == []


def test_a_json_array_is_not_pipelined(tmp_path: Path, pool: ValidationPool) -> None:
    data = json.dumps(records()).encode()
    staged, pipeline, started = upload(tmp_path, pool, data)
    assert started == 0 and not pipeline.active
    summary, found = pool.check(staged.path, LIMITS, pipeline)
    assert summary.format == "halos_json" and found.counts["duplicate_record"] == 30

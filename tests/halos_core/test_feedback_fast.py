"""The compiled fast path (halos_core/feedback/fast.py) against the detailed scanner.

The property: on every file, the fast path either declines (None: the detailed scanner decides)
or returns exactly the summary the detailed scanner returns; it never accepts a file the detailed
scanner rejects. And it does take the common valid files (else it would be a slow no-op).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from halos_core.feedback import FeedbackLimits, FeedbackValidationError, validate_file
from halos_core.feedback.fast import fast_check, fast_summary, merge, scan_segment, split_points
from halos_core.feedback.quality import find
from halos_core.synthetic import binary_records, pairwise_records, scalar_records

LIMITS = FeedbackLimits()


def detailed(path: Path, limits: FeedbackLimits = LIMITS):
    try:
        return validate_file(path, limits, fast=False)
    except FeedbackValidationError as exc:
        return exc


def write(tmp_path: Path, lines: list[str | bytes], name: str = "f.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def dumps(records: list[dict], **kw) -> list[str]:
    return [json.dumps(r, **kw) for r in records]


def check(path: Path, limits: FeedbackLimits = LIMITS, *, expect_fast: bool | None = None) -> None:
    want = detailed(path, limits)
    checked = fast_check(path, limits)
    got = None if checked is None else checked[0]
    if isinstance(want, FeedbackValidationError):
        assert got is None, f"fast path accepted an invalid file: {want}"
    else:
        assert got is None or got == want, (got, want)
        if checked is not None:  # and the same data-quality findings
            assert checked[1].to_json() == find(path).to_json()
    if expect_fast is not None:
        assert (got is not None) == expect_fast, (got, want)


PAIR = pairwise_records(6, seed=3, test_fraction=0.5)


def test_takes_common_valid_files(tmp_path: Path) -> None:
    check(write(tmp_path, dumps(PAIR)), expect_fast=True)
    check(write(tmp_path, dumps(binary_records(6, seed=1))), expect_fast=True)
    check(write(tmp_path, dumps(scalar_records(3, outputs_per_prompt=3))), expect_fast=True)
    trl = [
        {"prompt": "hi", "chosen": "good", "rejected": "bad"},
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
        {
            "prompt": [{"role": "user", "content": "x"}],
            "chosen": [{"role": "assistant", "content": "y"}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "z"}]}],
            "split": "test",
        },
    ]
    check(write(tmp_path, dumps(trl)), expect_fast=True)
    unpaired = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "d", "label": 0}]
    check(write(tmp_path, dumps(unpaired)), expect_fast=True)
    openai = [
        {
            "input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": "a",
            "non_preferred_output": [{"role": "assistant", "content": "b"}],
        }
    ]
    check(write(tmp_path, dumps(openai)), expect_fast=True)
    sampled = [
        {"prompt_id": 1, "sample_id": 0, "prompt": "p", "output": "o", "dataset": "d"},
        {"type": "sample", "prompt_id": "1", "sample_id": 1, "instruction": "p", "output": "o2"},
    ]
    check(write(tmp_path, dumps(sampled)), expect_fast=True)
    # non-ASCII written raw or escaped, CRLF line ends, escaped quotes and colons in text
    texts = [dict(PAIR[0], prompt='caf\u00e9 \U0001f600 "q": a:b', prompt_id="u1")]
    check(write(tmp_path, dumps(texts) + dumps(texts, ensure_ascii=False)), expect_fast=True)
    check(write(tmp_path, [x + "\r" for x in dumps(PAIR)]), expect_fast=True)


def test_a_summary_across_segments_equals_the_whole(tmp_path: Path) -> None:
    records = pairwise_records(300, seed=7, test_fraction=0.2) + pairwise_records(300, seed=8, id_prefix="p")
    path = write(tmp_path, dumps(records))  # ids repeat across the two halves, with different prompts
    want = detailed(path)
    assert isinstance(want, FeedbackValidationError) and want.errors[0].code == "conflicting_prompt"
    for parts in (1, 2, 3, 7):
        segments = [scan_segment(path, a, b, "halos", "pairwise", LIMITS) for a, b in split_points(path, parts)]
        assert merge(segments, LIMITS) is None
    ok = write(tmp_path, dumps(pairwise_records(300, seed=7, test_fraction=0.2) * 2), "ok.jsonl")  # exact repeats
    want = detailed(ok)
    for parts in (1, 2, 3, 7):
        ranges = split_points(ok, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == ok.stat().st_size
        segments = [scan_segment(ok, a, b, "halos", "pairwise", LIMITS) for a, b in ranges]
        merged = merge(segments, LIMITS)
        assert merged is not None and merged[0] == want and want.n_prompts == 300 and want.n_records == 600
        assert merged[1].to_json() == find(ok).to_json() and merged[1].counts["duplicate_record"] == 300


def rec(**changes) -> dict:
    base = dict(PAIR[0])
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()

INVALID_OR_TRICKY: dict[str, list[str | bytes]] = {
    "duplicate top-level key": [
        '{"type": "pairwise_feedback", "label": 1, "label": 0, "prompt": "p", "output_A": "a", "output_B": "b"}'
    ],
    "duplicate key in a turn": [
        '{"type": "pairwise_feedback", "label": 1, "prompt": [{"role": "user", '
        '"content": "x", "content": "y"}], "output_A": "a", "output_B": "b"}'
    ],
    "duplicate key spelled with an escape": [
        '{"type": "pairwise_feedback", "label": 1, "lab\\u0065l": 0, "prompt": "p", "output_A": "a", "output_B": "b"}'
    ],
    "duplicate key + escaped colon in text": [
        '{"type": "pairwise_feedback", "label": 1, "label": 0, "prompt": "x\\u003a", "output_A": "a", "output_B": "b"}'
    ],
    "unknown extra field": [json.dumps(rec(source="web"))],
    "extra field nested deep": [
        json.dumps(rec(meta=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]))
    ],
    "invalid utf-8 in an extra field": [
        b'{"type": "pairwise_feedback", "label": 1, "prompt": "p", "output_A": "a", "output_B": "b", "x": "\xff"}'
    ],
    "invalid utf-8 in text": [
        b'{"type": "pairwise_feedback", "label": 1, "prompt": "\xc3\x28", "output_A": "a", "output_B": "b"}'
    ],
    "lone surrogate": [
        '{"type": "pairwise_feedback", "label": 1, "prompt": "\\ud800", "output_A": "a", "output_B": "b"}'
    ],
    "two records on one line": [json.dumps(PAIR[0]) + " " + json.dumps(PAIR[1])],
    "record spanning lines": [json.dumps(PAIR[0])[:-1], "}"],
    "blank and whitespace lines": [json.dumps(PAIR[0]), "", "   ", json.dumps(PAIR[1])],
    "byte order mark": [b"\xef\xbb\xbf" + json.dumps(PAIR[0]).encode()],
    "JSON array": [json.dumps(PAIR)],
    "label 1.0": [json.dumps(rec(label=1.0))],
    "label true": [json.dumps(rec(label=True))],
    "label 2": [json.dumps(rec(label=2))],
    "NaN reward": [json.dumps(rec(reward_A=float("nan")))],
    "huge reward": [
        '{"type": "pairwise_feedback", "label": 1, "prompt": "p", "output_A": "a", "output_B": "b", "reward_A": 1e400}'
    ],
    "string reward": [json.dumps(rec(reward_A="1"))],
    "unknown role": [json.dumps(rec(prompt=[{"role": "human", "content": "x"}]))],
    "empty turn list": [json.dumps(rec(output_A=[]))],
    "bad content part": [json.dumps(rec(prompt=[{"role": "user", "content": [{"type": "image", "url": "x"}]}]))],
    "empty prompt_id": [json.dumps(rec(prompt_id=""))],
    "bool prompt_id": [json.dumps(rec(prompt_id=True))],
    "bad split": [json.dumps(rec(split="dev"))],
    "missing field": [json.dumps(rec(output_B=DROP))],
    "mixed kinds": [json.dumps(PAIR[0]), json.dumps(binary_records(1)[0])],
    "mixed formats": [json.dumps(PAIR[0]), json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})],
    "TRL record with a type": [
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "type": None}),
    ],
    "conflicting prompt": [json.dumps(rec(prompt_id="x", prompt="a")), json.dumps(rec(prompt_id="x", prompt="b"))],
    "conflicting split": [json.dumps(rec(prompt_id="x", split="test")), json.dumps(rec(prompt_id="x", split=DROP))],
    "split missing vs train": [
        json.dumps(rec(prompt_id="x", split="train")),
        json.dumps(rec(prompt_id="x", split=DROP)),
    ],
    "same prompt as str and as turns": [
        json.dumps(rec(prompt_id="x", prompt="hi")),
        json.dumps(rec(prompt_id="x", prompt=[{"role": "user", "content": "hi"}])),
    ],
    "derived ids, str and turns forms": [
        json.dumps(rec(prompt_id=DROP, prompt="hi")),
        json.dumps(rec(prompt_id=DROP, prompt=[{"role": "user", "content": "hi"}])),
        json.dumps(
            rec(
                prompt_id=DROP,
                prompt=[{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}],
            )
        ),
    ],
    "int and str ids": [json.dumps(rec(prompt_id=5, prompt="a")), json.dumps(rec(prompt_id="5", prompt="b"))],
    "explicit id equal to a derived one": [
        json.dumps(rec(prompt_id=DROP, prompt="hi")),
        json.dumps(rec(prompt_id="h-" + "0" * 24, prompt="other")),
    ],
    "sampled without prompt": [json.dumps({"prompt_id": 1, "sample_id": 0, "output": "o"})],
    "sampled with a chosen key": [
        json.dumps({"prompt_id": 1, "sample_id": 0, "prompt": "p", "output": "o", "chosen": "x"})
    ],
    "not an object": ['{"type": "pairwise_feedback"}', "[1, 2]"],
}


@pytest.mark.parametrize("name", sorted(INVALID_OR_TRICKY))
def test_never_accepts_what_the_detailed_scanner_rejects(tmp_path: Path, name: str) -> None:
    check(write(tmp_path, INVALID_OR_TRICKY[name]))


def test_derived_prompt_ids_count_like_the_detailed_scanner(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": "same", "chosen": f"a{i}", "rejected": f"b{i}"}) for i in range(5)]
    lines += [json.dumps({"prompt": f"other {i}", "chosen": "a", "rejected": "b"}) for i in range(3)]
    path = write(tmp_path, lines)
    got = fast_summary(path, LIMITS)
    assert got is not None and got == detailed(path) and got.n_prompts == 4


def test_limits(tmp_path: Path) -> None:
    path = write(tmp_path, dumps(PAIR))
    check(path, FeedbackLimits(max_records=5), expect_fast=False)  # too_many_records
    longest = max(len(x) for x in dumps(PAIR))
    check(path, FeedbackLimits(max_record_bytes=longest - 1), expect_fast=False)  # record_too_large
    check(path, FeedbackLimits(max_record_bytes=longest), expect_fast=True)
    check(path, FeedbackLimits(max_depth=3), expect_fast=False)  # shallower than the schema: detailed only


def test_random_byte_mutations(tmp_path: Path) -> None:
    """Seeded fuzzing: flip, insert or delete bytes of a valid file (keys, quotes, brackets, escapes
    included); the property must hold on every mutant."""
    import random

    rng = random.Random(1234)
    base = (
        "\n".join(
            dumps(
                pairwise_records(3, seed=2)
                + [dict(PAIR[1], prompt_id=DROP_ID, prompt="same") for DROP_ID in ("q1", "q2")]
            )
        ).encode()
        + b"\n"
    )
    alphabet = b'{}[]":,\\u0123456789abcdefnrt label prompt_id split test train \n\r\t\xff\xc3'
    accepted = 0
    for i in range(400):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[pos] = rng.choice(alphabet)
            elif op < 0.7:
                data.insert(pos, rng.choice(alphabet))
            elif op < 0.85:
                del data[pos]
            else:  # duplicate a slice (often a whole key/value pair)
                end = min(len(data), pos + rng.randint(2, 40))
                data[pos:pos] = data[pos:end]
        path = tmp_path / f"m{i}.jsonl"
        path.write_bytes(bytes(data))
        check(path)
        accepted += fast_summary(path, LIMITS) is not None
    assert accepted > 0  # some mutants stay valid (inside text) and the fast path takes them

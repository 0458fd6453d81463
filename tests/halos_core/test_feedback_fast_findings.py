"""The data-quality findings of the compiled fast path (`fast.fast_check`, `quality.check`) against
the detailed pass (`validate_file(fast=False)` + `quality.find`).

The property: on every valid file the fast path takes, it returns exactly what the detailed pass
returns — the summary, and the findings' counts and first examples (index, line, field, message:
the same pairs left out of training) — whether the file is scanned whole or cut into segments;
on invalid files `quality.check` raises the detailed scanner's record-level report. Each file below
holds every finding, in forms that differ as written but are equal in the normal form (a string
prompt and its one-turn list, content parts and their joined string, an int id and its string,
a missing split and "train", a missing reward and null), and near misses that are not findings
(-0.0 vs 0.0, whitespace in a non-empty turn), more than `MAX_EXAMPLES` findings, and blank lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from halos_core.feedback import FeedbackLimits, FeedbackValidationError, validate_file
from halos_core.feedback.fast import fast_check, merge, plan, scan_segment
from halos_core.feedback.quality import MAX_EXAMPLES, check, find

LIMITS = FeedbackLimits()


def turns(text: str, role: str = "assistant") -> list[dict[str, Any]]:
    return [{"role": role, "content": text}]


def parts(text: str, role: str = "assistant") -> list[dict[str, Any]]:
    half = len(text) // 2
    return [{"role": role, "content": [{"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]}]


def pairwise_family(make) -> list[dict[str, Any]]:
    """Records of a paired format; `make(prompt, a, b, **extra)` builds one."""
    out = []
    for i in range(30):
        out.append(make(turns(f"question {i}", "user"), turns(f"good {i}"), turns(f"bad {i}"), prompt_id=f"q{i}"))
    out += [
        make(turns("same?", "user"), turns("twin"), turns("twin"), prompt_id="s1"),  # identical, as written
        make(turns("same?", "user"), "twin", turns("twin"), prompt_id="s1"),  # identical in normal form
        make(turns("same?", "user"), parts("twin"), "twin", prompt_id="s1"),  # parts joined
        make(turns("same?", "user"), turns("twin", "user"), turns("twin"), prompt_id="s1"),  # roles differ: not
        make(turns("e?", "user"), turns(""), turns("x"), prompt_id="e1"),  # empty A
        make(turns("e?", "user"), turns("x"), [{"role": "assistant", "content": " \n\t"}], prompt_id="e1"),  # blank B
        make(turns("e?", "user"), turns("\u3000"), turns(""), prompt_id="e1"),  # both (unicode space)
        make(turns("e?", "user"), turns(" a "), turns("x"), prompt_id="e1"),  # not empty
        make(
            turns("e?", "user"),
            [{"role": "assistant", "content": ""}, {"role": "assistant", "content": "y"}],
            turns("x"),
            prompt_id="e1",
        ),  # one empty turn of two: not empty
        make("a plain prompt", turns("p1"), turns("p2"), prompt_id="plain"),  # string prompt
        make(turns("a plain prompt", "user"), turns("p1"), turns("p2"), prompt_id="plain"),  # duplicate of it
        make(turns("no id", "user"), turns("d1"), turns("d2")),  # derived ids
        make("no id", turns("d1"), turns("d2"), prompt_id=None),  # duplicate (derived id, string prompt)
        make(turns("no id", "user"), turns("d1"), turns("d3")),
    ]
    out += [out[3]] * 12  # exact duplicates: more findings than MAX_EXAMPLES in all
    return out


def halos_pairwise(prompt, a, b, prompt_id=..., **extra) -> dict[str, Any]:
    rec = {"type": "pairwise_feedback", "prompt": prompt, "output_A": a, "output_B": b, "label": 1}
    if prompt_id is not ...:
        rec["prompt_id"] = prompt_id
    return {**rec, **extra}


def pairwise_records() -> list[dict[str, Any]]:
    recs = pairwise_family(halos_pairwise)
    base = dict(recs[5])
    recs += [
        {**base, "reward_A": 1, "reward_B": None},  # = reward_A 1.0, no reward_B: a duplicate of the next
        {**base, "reward_A": 1.0},
        {**base, "reward_A": 0.0, "split": "train"},
        {**base, "reward_A": -0.0},  # not a duplicate of 0.0 (json.dumps writes -0.0)
        {**base, "reward_A": -0.0, "split": None},  # is one of the line above
        dict(reversed(list(base.items()))),  # keys in another order: a duplicate
        {**base, "label": 0},  # not one
        {**base, "prompt_id": 7, "prompt": "seven"},
        {**base, "prompt_id": "7", "prompt": turns("seven", "user")},  # int id 7 == "7": a duplicate
        {**base, "prompt_id": "t", "split": "test"},
        {**base, "prompt_id": "t", "split": "test", "reward_B": 2},
    ]
    return recs


def trl_preference_records() -> list[dict[str, Any]]:
    def make(prompt, a, b, prompt_id=..., **extra):
        rec = {"prompt": prompt, "chosen": a, "rejected": b}
        if prompt_id is not ...:
            rec["prompt_id"] = prompt_id
        return {**rec, **extra}

    recs = pairwise_family(make)
    recs += [{**recs[0], "score_chosen": 0.5}, {**recs[0], "score_chosen": 0.5, "score_rejected": None}]
    return recs


def openai_records() -> list[dict[str, Any]]:
    def make(prompt, a, b, prompt_id=..., **extra):
        rec = {"input": {"messages": prompt}, "preferred_output": a, "non_preferred_output": b}
        if prompt_id is not ...:
            rec["prompt_id"] = prompt_id
        return {**rec, **extra}

    return pairwise_family(make)


def single_family(make) -> list[dict[str, Any]]:
    """Records of a one-output format; `make(prompt, output, i, **extra)` builds one."""
    out = [make(turns(f"question {i}", "user"), turns(f"answer {i}"), i, prompt_id=f"q{i}") for i in range(30)]
    out += [
        make(turns("e?", "user"), turns(""), 1, prompt_id="e1"),
        make(turns("e?", "user"), turns("  "), 2, prompt_id="e1"),
        make(turns("e?", "user"), parts(" \u2003"), 3, prompt_id="e1"),  # blank once joined
        make(turns("e?", "user"), "x", 4, prompt_id="e1"),
        make("plain", turns("o"), 5, prompt_id="plain"),
        make(turns("plain", "user"), "o", 5, prompt_id="plain"),  # duplicate in normal form
        make(turns("plain", "user"), "o", 6, prompt_id="plain"),
    ]
    out += [out[2]] * 20
    return out


def binary_records() -> list[dict[str, Any]]:
    def make(prompt, output, i, prompt_id=..., **extra):
        rec = {"type": "binary_feedback", "prompt": prompt, "output": output, "label": i % 2}
        if prompt_id is not ...:
            rec["prompt_id"] = prompt_id
        return {**rec, **extra}

    recs = single_family(make)
    return recs + [{**recs[0], "reward": 0.5}, {**recs[0], "reward": 0.5, "split": "train"}]


def scalar_records() -> list[dict[str, Any]]:
    def make(prompt, output, i, prompt_id=..., **extra):
        rec = {"type": "scalar_feedback", "prompt": prompt, "output": output, "reward": i % 3}
        if prompt_id is not ...:
            rec["prompt_id"] = prompt_id
        return {**rec, **extra}

    recs = single_family(make)
    return recs + [{**recs[0], "reward": 0}, {**recs[0], "reward": -0.0}, {**recs[0], "reward": 0.0}]


def trl_unpaired_records() -> list[dict[str, Any]]:
    def make(prompt, output, i, prompt_id=..., **extra):
        rec = {"prompt": prompt, "completion": output, "label": bool(i % 2)}
        if prompt_id is not ...:
            rec["prompt_id"] = prompt_id
        return {**rec, **extra}

    recs = single_family(make)
    return recs + [{**recs[1], "label": 1}, {**recs[1], "label": 0}]  # true == 1: a duplicate; 0: not


def sampled_records() -> list[dict[str, Any]]:
    def make(prompt, output, i, prompt_id=..., **extra):
        return {"prompt_id": "x" if prompt_id is ... else prompt_id, "sample_id": i, "prompt": prompt, "output": output}

    recs = single_family(make)
    inst = {"prompt_id": "inst", "sample_id": 0, "instruction": "do it", "output": "done", "type": "sample"}
    return recs + [
        inst,  # string prompt (the instruction)
        {**inst, "sample_id": "0"},  # duplicate: sample ids are strings in the normal form
        {**inst, "dataset": None},  # duplicate: no dataset is ""
        {**inst, "dataset": "d"},
        {**recs[0], "dataset": ""},  # duplicate of records[0]
    ]


FORMATS = {
    "halos_pairwise": pairwise_records,
    "halos_binary": binary_records,
    "halos_scalar": scalar_records,
    "halos_sampled": sampled_records,
    "trl_preference": trl_preference_records,
    "trl_unpaired": trl_unpaired_records,
    "openai_preference": openai_records,
}


def write(tmp_path: Path, records: list[dict[str, Any]], blank_every: int = 0) -> Path:
    lines = []
    for i, rec in enumerate(records):
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("")  # blank lines are not records but count in `line`
        lines.append(json.dumps(rec))
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def detailed(path: Path):
    return validate_file(path, LIMITS, fast=False), find(path)


def same(got, want) -> None:
    (s1, f1), (s2, f2) = got, want
    assert s1 == s2
    assert f1.counts == f2.counts
    assert f1.examples == f2.examples
    assert f1.to_json() == f2.to_json()


@pytest.mark.parametrize("blank_every", [0, 7])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_fast_findings_equal_the_detailed_pass(tmp_path: Path, name: str, blank_every: int) -> None:
    path = write(tmp_path, FORMATS[name](), blank_every)
    want = detailed(path)
    found = want[1]
    assert set(found.counts) == {"identical_outputs", "empty_output", "string_prompt", "duplicate_record"} - (
        set() if name in ("halos_pairwise", "trl_preference", "openai_preference") else {"identical_outputs"}
    )
    assert found.total > MAX_EXAMPLES  # the examples are a prefix: which ones are kept matters
    got = fast_check(path, LIMITS)
    assert got is not None, "the fast path declined a valid file"
    same(got, want)
    same(check(path, LIMITS), want)
    planned = plan(path, 1)
    assert planned is not None
    fmt = planned[0]
    for n in (2, 3, 5, 11):  # segments cut across duplicates and findings
        _, ranges = plan(path, n) or (None, [])
        segments = [scan_segment(path, a, b, *fmt, LIMITS) for a, b in ranges]
        merged = merge(segments, LIMITS)
        assert merged is not None
        same(merged, want)


def test_findings_across_segments_of_a_big_file(tmp_path: Path) -> None:
    """Duplicates whose first copy is in another segment, the first examples spread over several
    segments, several chunks a segment (a small max_record_bytes makes the chunks small)."""
    base = pairwise_records()
    records = [dict(r, prompt_id=f"{r.get('prompt_id')}-{k}") if k % 3 else r for k in range(40) for r in base[:45]]
    records += base  # everything again at the end: duplicates of records in the first segment
    path = write(tmp_path, records, blank_every=101)
    limits = FeedbackLimits(max_record_bytes=4096)
    want = validate_file(path, limits, fast=False), find(path)
    assert want[1].counts["duplicate_record"] > 100
    fmt = ("halos", "pairwise")
    for n in (1, 4, 9):
        _, ranges = plan(path, n) or (None, [])
        merged = merge([scan_segment(path, a, b, *fmt, limits) for a, b in ranges], limits)
        assert merged is not None
        same(merged, want)


INVALID = {
    "conflicting prompt after findings": pairwise_records()[:40]
    + [halos_pairwise("other", turns("a"), turns("b"), prompt_id="q1")],
    "bad role": [halos_pairwise(turns("x", "human"), turns("a"), turns("b"))],
    "mixed formats": [pairwise_records()[0], {"prompt": "p", "chosen": "a", "rejected": "b"}],
    "label 2": [{**pairwise_records()[0], "label": 2}] * 3,
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_files_get_the_detailed_report(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, INVALID[name])
    assert fast_check(path, LIMITS) is None
    with pytest.raises(FeedbackValidationError) as want:
        validate_file(path, LIMITS, fast=False)
    with pytest.raises(FeedbackValidationError) as got:
        check(path, LIMITS)
    assert got.value.errors == want.value.errors and got.value.records_checked == want.value.records_checked

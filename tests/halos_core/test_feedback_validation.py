"""Bad feedback files: every error code, several bad records at once, limits, hostile inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from halos_core.feedback import (
    ERROR_CODES,
    FeedbackLimits,
    FeedbackValidationError,
    PairwiseRecord,
    read_records,
    scan,
    validate_file,
)


def pair(i: int = 0, **over) -> dict:
    rec = {
        "type": "pairwise_feedback",
        "prompt_id": f"p{i}",
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "output_A": [{"role": "assistant", "content": "a"}],
        "output_B": [{"role": "assistant", "content": "b"}],
        "label": 1,
        "reward_A": 1.0,
        "reward_B": 0.0,
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not DROP}


def binary(i: int = 0, **over) -> dict:
    rec = {
        "type": "binary_feedback",
        "prompt_id": f"b{i}",
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "output": [{"role": "assistant", "content": "a"}],
        "label": 1,
        "reward": 0.5,
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not DROP}


def scalar(i: int = 0, **over) -> dict:
    rec = {
        "type": "scalar_feedback",
        "prompt_id": f"s{i}",
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "output": [{"role": "assistant", "content": "a"}],
        "reward": 0.5,
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not DROP}


DROP = object()


def jl(*records) -> bytes:
    """JSONL bytes; a bytes item is written as a raw line."""
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def arr(*records) -> bytes:
    return b"[" + b",\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in records) + b"]"


def errors_of(tmp_path: Path, data: bytes, name: str = "f.jsonl", **limits) -> FeedbackValidationError:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(FeedbackValidationError) as info:
        validate_file(path, FeedbackLimits(**limits))
    return info.value


def where(e: FeedbackValidationError) -> list[tuple]:
    return [(x.index, x.line, x.field, x.code) for x in e.errors]


# (data, file name, limits, expected [(index, line, field, code)])
SINGLE = {
    "missing_field": (jl(pair(0), pair(1, label=DROP)), "f.jsonl", {}, [(1, 2, "label", "missing_field")]),
    "missing_field_turn_role": (
        jl(pair(0, prompt=[{"content": "x"}])),
        "f.jsonl",
        {},
        [(0, 1, "prompt[0].role", "missing_field")],
    ),
    "missing_field_type": (jl(pair(0), pair(1, type=DROP)), "f.jsonl", {}, [(1, 2, "type", "missing_field")]),
    "missing_field_openai_input": (
        jl(
            {
                "input": {"messages": [{"role": "user", "content": "x"}]},
                "preferred_output": "a",
                "non_preferred_output": "b",
            },
            {"preferred_output": "a", "non_preferred_output": "b"},
        ),
        "f.jsonl",
        {},
        [(1, 2, "input", "missing_field")],
    ),
    "missing_field_openai_messages": (
        jl({"input": {"msgs": []}, "preferred_output": "a", "non_preferred_output": "b"}),
        "f.jsonl",
        {},
        [(0, 1, "input.messages", "missing_field")],
    ),
    "missing_field_sample_id": (
        jl({"type": "sample", "prompt_id": 1, "prompt": "x", "output": "y"}),
        "f.jsonl",
        {},
        [(0, 1, "sample_id", "missing_field")],
    ),
    "missing_field_trl_implicit_prompt": (
        jl(
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
            }
        ),
        "f.jsonl",
        {},
        [(0, 1, "prompt", "missing_field")],
    ),
    "wrong_type_output": (jl(pair(0, output_B=5)), "f.jsonl", {}, [(0, 1, "output_B", "wrong_type")]),
    "wrong_type_content": (
        jl(pair(0, output_A=[{"role": "assistant", "content": "x"}, {"role": "assistant", "content": None}])),
        "f.jsonl",
        {},
        [(0, 1, "output_A[1].content", "wrong_type")],
    ),
    "wrong_type_turn": (jl(pair(0, prompt=["hi"])), "f.jsonl", {}, [(0, 1, "prompt[0]", "wrong_type")]),
    "wrong_type_record": (jl(pair(0), b"[1, 2]"), "f.jsonl", {}, [(1, 2, "", "wrong_type")]),
    "wrong_type_reward": (jl(pair(0, reward_A="0.9")), "f.jsonl", {}, [(0, 1, "reward_A", "wrong_type")]),
    "wrong_type_reward_bool": (jl(scalar(0, reward=True)), "f.jsonl", {}, [(0, 1, "reward", "wrong_type")]),
    "wrong_type_prompt_id": (jl(pair(0, prompt_id=1.5)), "f.jsonl", {}, [(0, 1, "prompt_id", "wrong_type")]),
    "empty_value": (jl(binary(0, output=[])), "f.jsonl", {}, [(0, 1, "output", "empty_value")]),
    "invalid_role": (
        jl(pair(0, prompt=[{"role": "human", "content": "x"}])),
        "f.jsonl",
        {},
        [(0, 1, "prompt[0].role", "invalid_role")],
    ),
    "invalid_label_2": (jl(pair(0, label=2)), "f.jsonl", {}, [(0, 1, "label", "invalid_label")]),
    "invalid_label_string": (jl(binary(0, label="1")), "f.jsonl", {}, [(0, 1, "label", "invalid_label")]),
    "invalid_label_bool_in_halos": (jl(binary(0, label=True)), "f.jsonl", {}, [(0, 1, "label", "invalid_label")]),
    "invalid_label_null": (jl(pair(0, label=None)), "f.jsonl", {}, [(0, 1, "label", "invalid_label")]),
    "invalid_label_0_5": (jl(pair(0, label=0.5)), "f.jsonl", {}, [(0, 1, "label", "invalid_label")]),
    "invalid_label_trl": (
        jl({"prompt": "q", "completion": "a", "label": "yes"}),
        "f.jsonl",
        {},
        [(0, 1, "label", "invalid_label")],
    ),
    "invalid_reward_nan": (
        jl(b'{"type": "scalar_feedback", "prompt": "q", "output": "a", "reward": NaN}'),
        "f.jsonl",
        {},
        [(0, 1, "reward", "invalid_reward")],
    ),
    "invalid_reward_inf": (
        jl(b'{"type": "binary_feedback", "prompt": "q", "output": "a", "label": 1, "reward": -Infinity}'),
        "f.jsonl",
        {},
        [(0, 1, "reward", "invalid_reward")],
    ),
    "invalid_reward_overflow": (
        jl(b'{"type": "scalar_feedback", "prompt": "q", "output": "a", "reward": 1e400}'),
        "f.jsonl",
        {},
        [(0, 1, "reward", "invalid_reward")],
    ),
    "invalid_split": (jl(pair(0, split="validation")), "f.jsonl", {}, [(0, 1, "split", "invalid_split")]),
    "invalid_json": (
        jl(pair(0), b'{"type": "pairwise_feedback", "label": 1', pair(2)),
        "f.jsonl",
        {},
        [(1, 2, "", "invalid_json")],
    ),
    "invalid_json_in_array": (
        arr(pair(0), b'{"label": 1 "x": 2}', pair(2)),
        "f.json",
        {},
        [(1, None, "", "invalid_json")],
    ),
    "invalid_json_trailing_comma": (arr(pair(0))[:-1] + b",]", "f.json", {}, [(1, None, "", "invalid_json")]),
    "invalid_json_double_comma": (
        b"[" + json.dumps(pair(0)).encode() + b",," + json.dumps(pair(1)).encode() + b"]",
        "f.json",
        {},
        [(1, None, "", "invalid_json")],
    ),
    "invalid_json_truncated_array": (arr(pair(0), pair(1))[:-30], "f.json", {}, [(1, None, "", "invalid_json")]),
    "invalid_json_mismatched": (arr(pair(0), b'{"a": [1}]'), "f.json", {}, [(1, None, "", "invalid_json")]),
    "invalid_json_trailing_data": (arr(pair(0)) + b"\n[]", "f.json", {}, [(1, None, "", "invalid_json")]),
    "invalid_utf8": (
        jl(pair(0), json.dumps(pair(1)).encode().replace(b'"a"', b'"\xff\xfe"')),
        "f.jsonl",
        {},
        [(1, 2, "", "invalid_utf8")],
    ),
    "invalid_utf8_in_array": (
        arr(pair(0), json.dumps(pair(1)).encode().replace(b'"b"', b'"\xc3("')),
        "f.json",
        {},
        [(1, None, "", "invalid_utf8")],
    ),
    "invalid_utf8_lone_surrogate": (
        jl(
            pair(0),
            json.dumps(pair(1, output_B=[{"role": "assistant", "content": "x"}]))
            .encode()
            .replace(b'"x"', b'"ok \\ud83d\\ude00 bad \\udc80"'),
        ),
        "f.jsonl",
        {},
        [(1, 2, "output_B[0].content", "invalid_utf8")],
    ),
    "invalid_utf8_utf16_file": (json.dumps([pair(0)]).encode("utf-16"), "f.json", {}, [(0, 1, "", "invalid_utf8")]),
    "too_deep": (jl(pair(0), pair(1, extra=json.loads("[" * 40 + "]" * 40))), "f.jsonl", {}, [(1, 2, "", "too_deep")]),
    "too_deep_small_limit": (jl(pair(0)), "f.jsonl", {"max_depth": 2}, [(0, 1, "", "too_deep")]),
    "record_too_large": (
        jl(pair(0), pair(1, output_A="x" * 5000)),
        "f.jsonl",
        {"max_record_bytes": 1000},
        [(1, 2, "", "record_too_large")],
    ),
    "duplicate_key": (
        jl(b'{"type": "binary_feedback", "prompt": "q", "output": "a", "label": 1, "label": 0}'),
        "f.jsonl",
        {},
        [(0, 1, "label", "duplicate_key")],
    ),
    "mixed_kinds": (jl(pair(0), binary(1), pair(2)), "f.jsonl", {}, [(1, 2, "type", "mixed_kinds")]),
    "mixed_kinds_trl": (
        jl({"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "completion": "a", "label": True}),
        "f.jsonl",
        {},
        [(1, 2, "", "mixed_kinds")],
    ),
    "mixed_formats": (
        jl(pair(0), {"prompt": "q", "chosen": "a", "rejected": "b"}),
        "f.jsonl",
        {},
        [(1, 2, "", "mixed_formats")],
    ),
    "unknown_format": (jl({"question": "q", "answer": "a"}), "f.jsonl", {}, [(0, 1, "", "unknown_format")]),
    "unknown_format_type": (jl(pair(0, type="preference")), "f.jsonl", {}, [(0, 1, "type", "unknown_format")]),
    "unknown_format_not_json": (b"\n\nPAR1\x00\x15\x04", "f.jsonl", {}, [(0, 3, "", "unknown_format")]),
    "empty_file": (b"", "f.jsonl", {}, [(0, None, "", "empty_file")]),
    "empty_file_blank_lines": (b"\xef\xbb\xbf\n  \r\n\n", "f.jsonl", {}, [(0, None, "", "empty_file")]),
    "empty_file_empty_array": (b" [ \n ] \n", "f.json", {}, [(0, None, "", "empty_file")]),
    "too_many_records": (
        jl(*[pair(i) for i in range(5)]),
        "f.jsonl",
        {"max_records": 3},
        [(3, 4, "", "too_many_records")],
    ),
    "too_many_records_array": (
        arr(*[pair(i) for i in range(5)]),
        "f.json",
        {"max_records": 3},
        [(3, None, "", "too_many_records")],
    ),
    "conflicting_prompt": (
        jl(pair(0), pair(1), pair(0, prompt="something else")),
        "f.jsonl",
        {},
        [(2, 3, "prompt", "conflicting_prompt")],
    ),
    "conflicting_split": (jl(pair(0), pair(0, split="test")), "f.jsonl", {}, [(1, 2, "split", "conflicting_split")]),
}


@pytest.mark.parametrize("case", sorted(SINGLE))
def test_each_bad_file_gives_its_error(tmp_path, case):
    data, name, limits, expected = SINGLE[case]
    e = errors_of(tmp_path, data, name, **limits)
    assert where(e) == expected
    for error in e.errors:
        assert error.code in ERROR_CODES
        assert error.message and error.hint
    assert e.truncated is False


def test_every_error_code_is_exercised():
    produced = {code for *_, expected in SINGLE.values() for *_x, code in expected}
    assert produced == set(ERROR_CODES)


def test_every_bad_record_is_listed_with_line_and_field(tmp_path):
    lines = [
        pair(0),
        pair(1, output_A=[{"role": "assistant", "content": "ok"}, {"role": "assistant", "content": 3}]),
        pair(2),
        b"",  # blank line: not a record, but it counts for line numbers
        pair(3, label=2),
        b"{not json",
        pair(5, prompt=[{"role": "user", "content": "q"}, {"role": "bot", "content": "x"}], reward_B=float("inf")),
        pair(6),
        binary(7),
    ]
    data = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    e = errors_of(tmp_path, data)
    assert where(e) == [
        (1, 2, "output_A[1].content", "wrong_type"),
        (3, 5, "label", "invalid_label"),
        (4, 6, "", "invalid_json"),
        (5, 7, "prompt[1].role", "invalid_role"),
        (5, 7, "reward_B", "invalid_reward"),
        (7, 9, "type", "mixed_kinds"),
    ]
    assert e.records_checked == 8
    assert not e.truncated
    assert "record 1 (line 2) output_A[1].content: [wrong_type]" in str(e)


def test_bad_records_in_a_json_array_have_indices_and_no_line(tmp_path):
    data = arr(pair(0), pair(1, label="1"), pair(2), pair(3, output_B=[]), b"42")
    e = errors_of(tmp_path, data, "f.json")
    assert where(e) == [
        (1, None, "label", "invalid_label"),
        (3, None, "output_B", "empty_value"),
        (4, None, "", "wrong_type"),
    ]
    assert e.records_checked == 5


def test_unknown_first_records_then_detection(tmp_path):
    e = errors_of(
        tmp_path,
        jl(
            {"foo": 1},
            pair(1, output_A=DROP, output_B=DROP, label=DROP, type=DROP, output="x", reward=1),
            pair(2),
            pair(3, label=5),
        ),
    )
    assert where(e) == [(0, 1, "", "unknown_format"), (1, 2, "", "unknown_format"), (3, 4, "label", "invalid_label")]
    assert "scalar_feedback" in e.errors[1].hint  # it guesses the missing type


def test_errors_are_capped_at_max_errors(tmp_path):
    data = jl(*[pair(i, label=9) for i in range(250)])
    e = errors_of(tmp_path, data, max_errors=100)
    assert len(e.errors) == 100
    assert e.truncated is True
    assert e.records_checked == 101
    assert [x.line for x in e.errors] == list(range(1, 101))
    e = errors_of(tmp_path, data, max_errors=7)
    assert (len(e.errors), e.truncated) == (7, True)
    e = errors_of(tmp_path, data, max_errors=250)
    assert (len(e.errors), e.truncated, e.records_checked) == (250, False, 250)


def test_nested_20000_deep_is_a_clear_error(tmp_path):
    deep = b"[" * 20_000 + b"]" * 20_000
    rec = json.dumps(pair(1)).encode()
    e = errors_of(tmp_path, b'{"type": "pairwise_feedback", "x": ' + deep + b"}\n" + rec + b"\n")
    assert where(e) == [(0, 1, "", "too_deep")]
    e = errors_of(tmp_path, b"[" + rec + b"," + deep + b"," + rec.replace(b"p1", b"p2") + b"]", "f.json")
    assert where(e) == [(1, None, "", "too_deep")]
    e = errors_of(tmp_path, b"[" + rec + b',{"a":' + b'{"a":' * 20_000 + b"1" + b"}" * 20_001 + b"]", "f.json")
    assert where(e) == [(1, None, "", "too_deep")]
    e = errors_of(tmp_path, b"[" * 20_000, "f.json")  # and never closed
    assert where(e) == [(0, None, "", "invalid_json")]
    e = errors_of(tmp_path, b"{" * 20_000)
    assert where(e) == [(0, 1, "", "too_deep")]


def test_ten_megabyte_single_line_is_over_the_record_limit(tmp_path):
    huge = b'{"type": "pairwise_feedback", "prompt": "' + b"x" * 10_000_000 + b'"}'
    e = errors_of(tmp_path, jl(pair(0), huge, pair(2)))
    assert where(e) == [(1, 2, "", "record_too_large")]
    assert "10,000,0" in e.errors[0].message and "1,000,000" in e.errors[0].message
    e = errors_of(tmp_path, arr(pair(0), huge, pair(2)), "f.json")
    assert where(e) == [(1, None, "", "record_too_large")]
    # no newline at all: one giant line (e.g. a JSON object the size of the file)
    e = errors_of(tmp_path, huge)
    assert where(e) == [(0, 1, "", "record_too_large")]


def test_record_size_limit_is_exact(tmp_path):
    rec = json.dumps(pair(0)).encode()
    path = tmp_path / "f.jsonl"
    path.write_bytes(rec + b"\n")
    validate_file(path, FeedbackLimits(max_record_bytes=len(rec)))
    with pytest.raises(FeedbackValidationError):
        validate_file(path, FeedbackLimits(max_record_bytes=len(rec) - 1))
    path = tmp_path / "f.json"
    path.write_bytes(b"[\n  " + rec + b"\n]")
    validate_file(path, FeedbackLimits(max_record_bytes=len(rec)))
    with pytest.raises(FeedbackValidationError):
        validate_file(path, FeedbackLimits(max_record_bytes=len(rec) - 1))


def test_depth_limit_is_exact(tmp_path):
    # the record object is depth 1, its prompt list 2, a turn 3
    path = tmp_path / "f.jsonl"
    path.write_bytes(jl(pair(0)))
    validate_file(path, FeedbackLimits(max_depth=3))
    with pytest.raises(FeedbackValidationError):
        validate_file(path, FeedbackLimits(max_depth=2))
    path = tmp_path / "f.json"
    path.write_bytes(arr(pair(0)))
    validate_file(path, FeedbackLimits(max_depth=3))
    with pytest.raises(FeedbackValidationError):
        validate_file(path, FeedbackLimits(max_depth=2))


def test_brackets_and_quotes_inside_strings_do_not_count(tmp_path):
    tricky = '[[[[{{{{ "\\" ]]]] }}} \\\\'
    rec = pair(0, output_A=[{"role": "assistant", "content": tricky * 20}])
    for data, name in ((jl(rec), "f.jsonl"), (arr(rec, pair(1)), "f.json")):
        path = tmp_path / name
        path.write_bytes(data)
        validate_file(path, FeedbackLimits(max_depth=3))
        assert next(iter(read_records(path, FeedbackLimits(max_depth=3)))).output_A[0].content == tricky * 20


def _random_string(rng: random.Random) -> str:
    alphabet = ['"', "\\", "[", "]", "{", "}", ",", " ", "\n", "a", "é", "𝄞", "\u2028", "\\\\", '\\"']
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_array_scanner_is_independent_of_chunk_boundaries(tmp_path, monkeypatch, chunk):
    rng = random.Random(chunk)
    records = [
        pair(
            i,
            output_A=[{"role": "assistant", "content": _random_string(rng)}],
            output_B=_random_string(rng),
            prompt=_random_string(rng) + str(i),
        )
        for i in range(30)
    ]
    path = tmp_path / "f.json"
    path.write_text(json.dumps(records, indent=rng.choice([None, 1, 2]), ensure_ascii=rng.random() < 0.5))
    monkeypatch.setattr(scan, "CHUNK", chunk)
    assert validate_file(path).n_records == 30
    got = list(read_records(path))
    assert [r.output_A[0].content for r in got] == [r["output_A"][0]["content"] for r in records]
    assert [r.output_B[0].content for r in got] == [r["output_B"] for r in records]
    assert [r.prompt[0].content for r in got] == [r["prompt"] for r in records]


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_array_errors_are_independent_of_chunk_boundaries(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(scan, "CHUNK", chunk)
    data = arr(pair(0), pair(1, label=3), b'{"x": "' + b"\\\\" * 150 + b'"}', pair(3), b'{"s": "\\"]"}')
    assert len(json.dumps(pair(1, label=3))) < 250
    e = errors_of(tmp_path, data, "f.json", max_record_bytes=250)
    assert where(e) == [
        (1, None, "label", "invalid_label"),
        (2, None, "", "record_too_large"),
        (4, None, "", "unknown_format"),
    ]
    e = errors_of(tmp_path, data, "f.json")
    assert where(e) == [
        (1, None, "label", "invalid_label"),
        (2, None, "", "unknown_format"),
        (4, None, "", "unknown_format"),
    ]


def test_read_records_streams_and_raises_on_a_bad_file(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(jl(pair(0), pair(1), pair(2, label=7)))
    it = read_records(path)
    assert isinstance(next(it), PairwiseRecord)
    assert isinstance(next(it), PairwiseRecord)
    with pytest.raises(FeedbackValidationError) as info:
        next(it)
    assert where(info.value) == [(2, 3, "label", "invalid_label")]
    path.write_bytes(b"")
    with pytest.raises(FeedbackValidationError):
        list(read_records(path))


def test_limits_are_checked():
    with pytest.raises(ValueError):
        FeedbackLimits(max_errors=0)
    with pytest.raises(ValueError):
        FeedbackLimits(max_depth=-1)


def test_surrogate_pairs_are_fine_and_messages_stay_short(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(jl(pair(0, output_A="emoji \U0001f600")))  # json.dumps writes a \ud83d\ude00 pair
    assert b"\\ud83d\\ude00" in path.read_bytes()
    assert next(iter(read_records(path))).output_A[0].content == "emoji \U0001f600"
    e = errors_of(tmp_path, jl({"k" * 100_000: 1}, pair(1, prompt=[{"role": "r" * 100_000, "content": "x"}])))
    assert [x.code for x in e.errors] == ["unknown_format", "invalid_role"]
    assert all(len(x.message) < 400 and len(x.field) < 200 for x in e.errors)


@pytest.mark.parametrize("name", ["f.json", "f.jsonl"])
def test_mutated_files_never_crash(tmp_path, monkeypatch, name):
    """Random byte damage gives a summary or a FeedbackValidationError, never another exception."""
    monkeypatch.setattr(scan, "CHUNK", 16)
    good = (arr if name == "f.json" else jl)(*[pair(i, output_B='q\\"[{' + str(i)) for i in range(6)])
    rng = random.Random(name)
    path = tmp_path / name
    junk = [b"[", b"]", b"{", b"}", b'"', b"\\", b",", b"\n", b"\xff", b"\xc3", b" ", b"0", b"\x00"]
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            k = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[k : k + 1] = rng.choice(junk)
            elif op == 1:
                del data[k : k + rng.randrange(1, 20)]
            else:
                data[k:k] = rng.choice(junk)
        path.write_bytes(bytes(data))
        try:
            summary = validate_file(path, FeedbackLimits(max_depth=4))
        except FeedbackValidationError as exc:
            assert exc.errors and all(e.code in ERROR_CODES for e in exc.errors)
        else:
            assert summary.n_records == len(list(read_records(path, FeedbackLimits(max_depth=4))))


def test_read_records_accepts_what_validation_with_raised_limits_accepted(tmp_path):
    path = tmp_path / "f.jsonl"
    big = pair(0, output_A="x" * 1_020_000)  # under the server's 1 MiB, over FeedbackLimits()'s 1,000,000
    path.write_bytes(jl(big, pair(1)))
    with pytest.raises(FeedbackValidationError):
        validate_file(path)
    validate_file(path, FeedbackLimits(max_record_bytes=1 << 20))
    assert len(list(read_records(path))) == 2
    with pytest.raises(FeedbackValidationError):
        list(read_records(path, FeedbackLimits()))


def test_validation_error_pickles(tmp_path):
    import pickle

    e = errors_of(tmp_path, jl(pair(0, label=2), pair(1, label=3)), max_errors=1)
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.errors, e2.truncated, e2.records_checked, str(e2)) == (e.errors, True, 2, str(e))

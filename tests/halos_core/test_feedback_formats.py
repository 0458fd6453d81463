"""Every accepted feedback format, as a JSON array and as JSONL, read into the normal form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from halos_core.feedback import (
    BinaryRecord,
    PairwiseRecord,
    SampledRecord,
    ScalarRecord,
    Turn,
    read_records,
    validate_file,
)
from halos_core.feedback.formats import derived_prompt_id


def write(tmp_path: Path, records: list, container: str, name: str = "f") -> Path:
    path = tmp_path / f"{name}.{container}"
    if container == "json":
        path.write_text(json.dumps(records, indent=2))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


U = lambda text: Turn(role="user", content=text)
A = lambda text: Turn(role="assistant", content=text)

HALOS_PAIRWISE = [
    {
        "type": "pairwise_feedback",
        "prompt_id": "p1",
        "prompt": [{"role": "user", "content": "hi"}],
        "output_A": [{"role": "assistant", "content": "hello"}],
        "output_B": [{"role": "assistant", "content": "go"}],
        "label": 1,
        "reward_A": 0.9,
        "reward_B": 0.1,
        "reward_difference": 0.8,
        "split": "train",
    },
    {
        "type": "pairwise_feedback",
        "prompt_id": 7,
        "prompt": "plain prompt",
        "output_A": "a",
        "output_B": "b",
        "label": 0,
        "split": "test",
    },
]
HALOS_PAIRWISE_NORMAL = [
    PairwiseRecord(
        prompt_id="p1",
        prompt=[U("hi")],
        output_A=[A("hello")],
        output_B=[A("go")],
        label=1,
        reward_A=0.9,
        reward_B=0.1,
        split="train",
    ),
    PairwiseRecord(
        prompt_id="7", prompt=[U("plain prompt")], output_A=[A("a")], output_B=[A("b")], label=0, split="test"
    ),
]

HALOS_BINARY = [
    {
        "type": "binary_feedback",
        "prompt_id": "b1",
        "prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q"}],
        "output": [{"role": "assistant", "content": "yes"}],
        "label": 1,
        "reward": 3,
    },
    {
        "type": "binary_feedback",
        "prompt_id": "b1",
        "prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q"}],
        "output": "no",
        "label": 0.0,
        "reward": None,
    },
]
HALOS_BINARY_NORMAL = [
    BinaryRecord(
        prompt_id="b1", prompt=[Turn(role="system", content="be nice"), U("q")], output=[A("yes")], label=1, reward=3.0
    ),
    BinaryRecord(
        prompt_id="b1", prompt=[Turn(role="system", content="be nice"), U("q")], output=[A("no")], label=0, reward=None
    ),
]

HALOS_SCALAR = [
    {
        "type": "scalar_feedback",
        "prompt_id": "s1",
        "prompt": [{"role": "user", "content": "x"}],
        "output": [{"role": "assistant", "content": "y"}],
        "reward": -1.5,
        "generator": "m",
        "sample_id": 0,
    },
    {
        "type": "scalar_feedback",
        "prompt": [{"role": "user", "content": "z"}],
        "output": [{"role": "assistant", "content": "w"}],
        "reward": 2,
    },
]
HALOS_SCALAR_NORMAL = [
    ScalarRecord(prompt_id="s1", prompt=[U("x")], output=[A("y")], reward=-1.5),
    ScalarRecord(prompt_id=derived_prompt_id([U("z")]), prompt=[U("z")], output=[A("w")], reward=2.0),
]

SAMPLED = [  # as HALOs train.sample writes them (with and without the newer "type": "sample")
    {
        "output": "four",
        "generator": "m",
        "dataset": "hh_test",
        "prompt_id": 0,
        "sample_id": 0,
        "type": "sample",
        "prompt": [{"role": "user", "content": "2+2?"}],
        "split": "test",
    },
    {
        "output": "4",
        "generator": "m",
        "dataset": "hh_test",
        "prompt_id": 0,
        "sample_id": 1,
        "type": "sample",
        "prompt": [{"role": "user", "content": "2+2?"}],
        "split": "test",
    },
]
SAMPLED_NORMAL = [
    SampledRecord(
        prompt_id="0", sample_id="0", prompt=[U("2+2?")], output=[A("four")], dataset="hh_test", split="test"
    ),
    SampledRecord(prompt_id="0", sample_id="1", prompt=[U("2+2?")], output=[A("4")], dataset="hh_test", split="test"),
]
SAMPLED_OLD = [{"prompt_id": 3, "sample_id": 0, "instruction": "Name a color.", "output": "blue"}]
SAMPLED_OLD_NORMAL = [SampledRecord(prompt_id="3", sample_id="0", prompt=[U("Name a color.")], output=[A("blue")])]

TRL_PREF_STANDARD = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "The sky is", "chosen": " blue!", "rejected": " red.", "score_chosen": 8, "score_rejected": 2.5},
]
TRL_PREF_STANDARD_NORMAL = [
    PairwiseRecord(
        prompt_id=derived_prompt_id([U("The sky is")]),
        prompt=[U("The sky is")],
        output_A=[A(" blue.")],
        output_B=[A(" green.")],
        label=1,
    ),
    PairwiseRecord(
        prompt_id=derived_prompt_id([U("The sky is")]),
        prompt=[U("The sky is")],
        output_A=[A(" blue!")],
        output_B=[A(" red.")],
        label=1,
        reward_A=8.0,
        reward_B=2.5,
    ),
]
TRL_PREF_CONV = [
    {
        "prompt": [{"role": "user", "content": "What color is the sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
        "prompt_id": "abc",
    },
]
TRL_PREF_CONV_NORMAL = [
    PairwiseRecord(
        prompt_id="abc",
        prompt=[U("What color is the sky?")],
        output_A=[A("It is blue.")],
        output_B=[A("It is green.")],
        label=1,
    ),
]
TRL_UNPAIRED = [
    {
        "prompt": [{"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "good"}],
        "label": True,
    },
    {"prompt": "Q2", "completion": "bad", "label": False},
    {"prompt": "Q3", "completion": "fine", "label": 1},
]
TRL_UNPAIRED_NORMAL = [
    BinaryRecord(prompt_id=derived_prompt_id([U("Q")]), prompt=[U("Q")], output=[A("good")], label=1),
    BinaryRecord(prompt_id=derived_prompt_id([U("Q2")]), prompt=[U("Q2")], output=[A("bad")], label=0),
    BinaryRecord(prompt_id=derived_prompt_id([U("Q3")]), prompt=[U("Q3")], output=[A("fine")], label=1),
]
OPENAI = [
    {
        "input": {
            "messages": [{"role": "user", "content": "Hello, how cold is San Francisco today?"}],
            "tools": [],
            "parallel_tool_calls": True,
        },
        "preferred_output": [{"role": "assistant", "content": "Not very cold."}],
        "non_preferred_output": [{"role": "assistant", "content": "It is cold."}],
    },
    {
        "input": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ]
        },
        "preferred_output": [{"role": "assistant", "content": "Hi."}],
        "non_preferred_output": [{"role": "assistant", "content": "Hello, how can I help you today?"}],
    },
]
OPENAI_NORMAL = [
    PairwiseRecord(
        prompt_id=derived_prompt_id([U("Hello, how cold is San Francisco today?")]),
        prompt=[U("Hello, how cold is San Francisco today?")],
        output_A=[A("Not very cold.")],
        output_B=[A("It is cold.")],
        label=1,
    ),
    PairwiseRecord(
        prompt_id=derived_prompt_id([Turn(role="system", content="Be brief."), U("Hi there")]),
        prompt=[Turn(role="system", content="Be brief."), U("Hi there")],
        output_A=[A("Hi.")],
        output_B=[A("Hello, how can I help you today?")],
        label=1,
    ),
]

CASES = {
    # name: (records, expected normal form, kind, format for json, format for jsonl, n_prompts)
    "halos_pairwise": (HALOS_PAIRWISE, HALOS_PAIRWISE_NORMAL, "pairwise", "halos_json", "halos_jsonl", 2),
    "halos_binary": (HALOS_BINARY, HALOS_BINARY_NORMAL, "binary", "halos_json", "halos_jsonl", 1),
    "halos_scalar": (HALOS_SCALAR, HALOS_SCALAR_NORMAL, "scalar", "halos_json", "halos_jsonl", 2),
    "halos_sampled": (SAMPLED, SAMPLED_NORMAL, "sampled", "halos_sampled", "halos_sampled", 1),
    "halos_sampled_alpacaeval": (SAMPLED_OLD, SAMPLED_OLD_NORMAL, "sampled", "halos_sampled", "halos_sampled", 1),
    "trl_preference_standard": (
        TRL_PREF_STANDARD,
        TRL_PREF_STANDARD_NORMAL,
        "pairwise",
        "trl_preference",
        "trl_preference",
        1,
    ),
    "trl_preference_conversational": (
        TRL_PREF_CONV,
        TRL_PREF_CONV_NORMAL,
        "pairwise",
        "trl_preference",
        "trl_preference",
        1,
    ),
    "trl_unpaired": (TRL_UNPAIRED, TRL_UNPAIRED_NORMAL, "binary", "trl_unpaired", "trl_unpaired", 3),
    "openai_preference": (OPENAI, OPENAI_NORMAL, "pairwise", "openai_preference", "openai_preference", 2),
}


@pytest.mark.parametrize("container", ["json", "jsonl"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_format_round_trips_into_normal_form(tmp_path, name, container):
    records, normal, kind, fmt_json, fmt_jsonl, n_prompts = CASES[name]
    path = write(tmp_path, records, container)
    summary = validate_file(path)
    assert summary.kind == kind
    assert summary.format == (fmt_json if container == "json" else fmt_jsonl)
    assert summary.n_records == len(records)
    assert summary.n_prompts == n_prompts
    assert summary.n_test == sum(1 for r in records if r.get("split") == "test")
    assert summary.n_train == summary.n_records - summary.n_test
    got = list(read_records(path))
    assert got == normal
    for record in got:
        assert record.kind == kind
        # the normal form is a valid pydantic model (read_records builds it without re-validation)
        assert type(record).model_validate(record.model_dump()) == record
        assert type(record).model_validate_json(record.model_dump_json()) == record


def test_pairwise_chosen_and_rejected_follow_the_label():
    r1, r0 = HALOS_PAIRWISE_NORMAL
    assert (r1.chosen, r1.rejected, r1.chosen_reward, r1.rejected_reward) == ([A("hello")], [A("go")], 0.9, 0.1)
    assert (r0.chosen, r0.rejected) == ([A("b")], [A("a")])


def test_derived_prompt_ids_group_equal_prompts_and_separate_different_ones():
    assert derived_prompt_id([U("a")]) == derived_prompt_id([U("a")])
    assert derived_prompt_id([U("a")]) != derived_prompt_id([A("a")])
    assert derived_prompt_id([U("ab")]) != derived_prompt_id([U("a"), U("b")])


def test_normal_form_is_frozen_and_strict():
    r = HALOS_BINARY_NORMAL[0]
    with pytest.raises(ValidationError):
        r.label = 0  # type: ignore[misc]  # the point: a frozen record refuses it
    with pytest.raises(ValidationError):
        BinaryRecord(prompt_id="x", prompt=[U("q")], output=[A("a")], label=2)
    with pytest.raises(ValidationError):
        BinaryRecord(prompt_id="x", prompt=[U("q")], output=[A("a")], label=1, reward=float("nan"))
    with pytest.raises(ValidationError):
        PairwiseRecord(prompt_id="x", prompt=[U("q")], output_A=[], output_B=[A("b")], label=1)
    with pytest.raises(ValidationError):
        ScalarRecord(prompt_id="x", prompt=[U("q")], output=[A("a")], reward="1.5")


def test_jsonl_with_bom_crlf_and_blank_lines(tmp_path):
    lines = [json.dumps(r) for r in HALOS_PAIRWISE]
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ("\r\n\r\n".join(lines) + "\r\n\n").encode())
    assert validate_file(path).n_records == 2
    assert list(read_records(path)) == HALOS_PAIRWISE_NORMAL


def test_json_array_with_bom_and_unicode(tmp_path):
    records = [dict(HALOS_PAIRWISE[0], output_A=[{"role": "assistant", "content": 'héllo ✓ \u2028 "q" \\ 𝄞'}])]
    path = tmp_path / "f.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, ensure_ascii=False).encode())
    (record,) = read_records(path)
    assert record.output_A[0].content == 'héllo ✓ \u2028 "q" \\ 𝄞'


def test_package_is_torch_and_server_free():
    code = (
        "import sys, halos_core.feedback as f; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'fastapi', 'sqlmodel', 'sqlalchemy', 'celery', 'server', 'worker')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

"""Prompt-set uploads (`POST /v1/prompts`): the record-level 422 report with nothing stored, the
plain-string finding (a warning by default, refused with strict=true), the prompt part of a
feedback file, and other projects' ids ⇒ 404."""

from __future__ import annotations

from halos_core.synthetic import pairwise_records
from tests.loop.conftest import post_file

GOOD = [
    {"prompt_id": "a", "prompt": [{"role": "user", "content": "Tell me about the apple."}]},
    {"prompt_id": "b", "prompt": [{"role": "user", "content": "Tell me about the river."}], "split": "test"},
]


def test_bad_prompt_set_is_refused_record_by_record_and_nothing_is_stored(api) -> None:
    client, _ = api
    bad = [
        *GOOD,
        {"prompt_id": "c", "prompt": [{"role": "wizard", "content": "hi"}]},  # unknown role
        {"prompt_id": "d"},  # no prompt
        {"prompt_id": "a", "prompt": [{"role": "user", "content": "Another prompt under id a."}]},
    ]
    resp = post_file(client, "/v1/prompts", bad)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_prompts" and "nothing was stored" in err["message"]
    by_index = {e["index"]: e for e in err["details"]["errors"]}
    assert set(by_index) == {2, 3, 4}
    assert by_index[2]["line"] == 3 and by_index[3]["line"] == 4
    assert by_index[4]["code"] == "conflicting_prompt"
    assert client.get("/v1/prompts").json()["items"] == []
    empty = client.post("/v1/prompts", content=b"", headers={"Content-Type": "application/x-ndjson"})
    assert empty.status_code == 422 and empty.json()["error"]["details"]["errors"][0]["code"] == "empty_file"
    assert client.get("/v1/prompts").json()["items"] == []


def test_plain_string_prompt_is_a_finding_and_strict_refuses_it(api) -> None:
    client, _ = api
    records = [*GOOD, {"prompt_id": "s", "prompt": "Tell me about the stone."}]
    resp = post_file(client, "/v1/prompts", records)
    assert resp.status_code == 201, resp.text
    ps = resp.json()
    assert ps["n_prompts"] == 3 and ps["n_test"] == 1
    assert ps["findings"]["counts"] == {"string_prompt": 1}
    [example] = ps["findings"]["examples"]
    assert example["index"] == 2 and example["line"] == 3
    assert example["code"] == "string_prompt" and "user turn" in example["message"], example
    before = client.get("/v1/prompts").json()["items"]
    strict = post_file(client, "/v1/prompts", records, strict="true")
    assert strict.status_code == 422 and strict.json()["error"]["code"] == "invalid_prompts"
    assert [e["index"] for e in strict.json()["error"]["details"]["errors"]] == [2]
    assert client.get("/v1/prompts").json()["items"] == before  # nothing stored
    clean = post_file(client, "/v1/prompts", GOOD, strict="true")
    assert clean.status_code == 201 and clean.json()["findings"] is None


def test_feedback_file_as_prompt_set_and_foreign_ids(api) -> None:
    client, other = api
    pairs = pairwise_records(5, seed=2)
    ps = post_file(client, "/v1/prompts", pairs).json()
    assert ps["format"] == "halos", ps  # the feedback format whose prompt part was taken
    assert ps["n_prompts"] == 5
    assert other.get(f"/v1/prompts/{ps['id']}").status_code == 404
    assert other.get(f"/v1/prompts/{ps['id']}/content").status_code == 404
    assert other.delete(f"/v1/prompts/{ps['id']}").status_code == 404
    assert client.get(f"/v1/prompts/{ps['id']}").status_code == 200  # still there

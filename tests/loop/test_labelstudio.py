"""Label Studio and Argilla round trips, against objects made by the real tools.

tests/fixtures/labelstudio/ was recorded from a real Label Studio 1.23.2 server driven by
scripts/labelstudio_roundtrip.py (label-studio-sdk 2.1.2): the tasks this server exports were
imported into projects with the shipped configs, annotated through the SDK (one annotation then
updated, another deleted); the webhook deliveries Label Studio sent and its JSON export are
replayed here against the API. Argilla deliveries are signed with the `standardwebhooks` library
(the scheme Argilla v2 uses) in the shape of Argilla's response events."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

from standardwebhooks.webhooks import Webhook

from tests.loop.conftest import post_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "labelstudio"


def _load(name: str):
    return json.loads((FIXTURES / name).read_text())


def _samples() -> list[dict]:
    return [
        {
            "type": "sample",
            "prompt_id": f"q{p}",
            "sample_id": str(j),
            "prompt": [{"role": "user", "content": f"Tell me about the topic {p}."}],
            "output": [{"role": "assistant", "content": f"Answer {j} about topic {p}."}],
            **({"split": "test"} if p == 2 else {}),
        }
        for p in range(3)
        for j in range(4)
    ]


def _lines(client, fb_id: str) -> list[dict]:
    return [json.loads(x) for x in client.get(f"/v1/feedback/{fb_id}/content").content.splitlines()]


def test_tasks_export_and_export_import(api) -> None:
    client, other = api
    samples = post_file(client, "/v1/feedback", _samples()).json()
    for config in ("pairwise", "rating"):
        tasks = client.get(f"/v1/feedback/{samples['id']}/labelstudio-tasks", params={"config": config})
        assert tasks.status_code == 200 and tasks.json() == _load(f"tasks_{config}.json")  # what Label Studio got
        assert "<Pairwise" in client.get("/v1/labelstudio/configs/pairwise").text
    assert other.get(f"/v1/feedback/{samples['id']}/labelstudio-tasks").status_code == 404
    pairs = post_file(
        client,
        "/v1/feedback",
        [{"type": "pairwise_feedback", "prompt": "x", "output_A": "a", "output_B": "b", "label": 1}],
    ).json()
    assert client.get(f"/v1/feedback/{pairs['id']}/labelstudio-tasks").json()["error"]["code"] == "not_samples"

    export = _load("export_pairwise.json")
    resp = client.post("/v1/labelstudio/imports", json=export)
    assert resp.status_code == 201, resp.text
    fb = resp.json()
    assert fb["kind"] == "pairwise" and fb["source"] == "label_studio" and fb["n_records"] == 5  # one was deleted
    records = _lines(client, fb["id"])
    by_answer = {(r["prompt_id"], r["output_A"][0]["content"]): r["label"] for r in records}
    # the first annotation was updated from "left" to "right" in Label Studio: output_B won
    assert by_answer[("q0", "Answer 0 about topic 0.")] == 0
    assert all(r["output_A"] != r["output_B"] for r in records) and fb["findings"] is None
    rating = client.post("/v1/labelstudio/imports", json=_load("export_rating.json")).json()
    assert rating["kind"] == "scalar" and rating["n_records"] == 11
    assert {r["reward"] for r in _lines(client, rating["id"])} <= {1.0, 2.0, 3.0, 4.0, 5.0}

    # a malformed export: the record-level 422 report, nothing stored
    before = client.get("/v1/feedback").json()["items"]
    broken = json.loads(json.dumps(export))
    broken[0]["annotations"][0]["result"] = [{"type": "pairwise", "value": {"selected": "up"}}]
    del broken[2]["data"]["halos"]
    broken[3]["annotations"] = "none"
    err = client.post("/v1/labelstudio/imports", json=broken)
    assert err.status_code == 422 and err.json()["error"]["code"] == "invalid_feedback"
    assert [(e["index"], e["code"]) for e in err.json()["error"]["details"]["errors"]] == [
        (0, "invalid_label"),
        (2, "not_a_halos_task"),
        (3, "missing_field"),
    ]
    assert client.post("/v1/labelstudio/imports", json={"not": "a list"}).status_code == 422
    assert client.get("/v1/feedback").json()["items"] == before


def test_labelstudio_webhooks_draft_seal(api) -> None:
    client, other = api
    intg = client.post("/v1/integrations", json={"tool": "label_studio", "label_config": "pairwise"}).json()
    secret, hook = intg["secret"], intg["webhook_path"]
    deliveries = [d["payload"] for d in _load("webhooks_pairwise.json")]

    def send(payload: dict, key: str = secret):
        return client.post(
            hook, content=json.dumps(payload), headers={"X-Halos-Webhook-Secret": key, "Authorization": ""}
        )

    assert send(deliveries[0], "wrong-secret").status_code == 401
    assert client.post(hook, content=json.dumps(deliveries[0])).status_code == 401
    assert client.get(f"/v1/integrations/{intg['id']}").json()["draft"] == {"open": 0, "deleted": 0, "sealed": 0}
    assert other.get(f"/v1/integrations/{intg['id']}").status_code == 404
    results = [send(p).json() for p in deliveries]
    assert [r["changes"] for r in results] == [{"added": 1}] * 6 + [{"replaced": 1}, {"deleted": 1}]
    replays = [send(p).json()["changes"] for p in deliveries]  # a second delivery of each: no change
    assert replays == [{"unchanged": 1}] * 8
    assert client.get(f"/v1/integrations/{intg['id']}").json()["draft"] == {"open": 5, "deleted": 1, "sealed": 0}
    bad = dict(deliveries[0], annotation={**deliveries[0]["annotation"], "id": 999, "result": []})
    assert send(bad).status_code == 422  # nothing recorded either
    sealed = client.post(f"/v1/integrations/{intg['id']}/seal")
    assert sealed.status_code == 201, sealed.text
    fb = sealed.json()
    assert fb["kind"] == "pairwise" and fb["n_records"] == 5 and fb["source"] == "label_studio_webhook"
    imported = client.post("/v1/labelstudio/imports", json=_load("export_pairwise.json")).json()
    key = lambda r: (r["prompt_id"], r["output_A"][0]["content"], r["label"])
    assert sorted(map(key, _lines(client, fb["id"]))) == sorted(map(key, _lines(client, imported["id"])))
    assert client.post(f"/v1/integrations/{intg['id']}/seal").json()["error"]["code"] == "draft_empty"
    assert [send(p).json()["changes"] for p in deliveries[:2]] == [{"unchanged": 1}] * 2  # sealed: still a replay


def _sign(wh: Webhook, msg_id: str, payload: dict, when: datetime | None = None) -> dict[str, str]:
    body = json.dumps(payload)
    when = when or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": wh.sign(msg_id, when, body),
        "content-type": "application/json",
    }


def _response(rid: str, status: str, pref: str, updated: str) -> dict:
    return {
        "type": "response.created",
        "version": 1,
        "timestamp": updated,
        "data": {
            "id": rid,
            "status": status,
            "values": {"preference": {"value": pref}},
            "inserted_at": updated,
            "updated_at": updated,
            "user": {"id": "u1", "username": "ann"},
            "record": {
                "id": f"rec-{rid}",
                "status": "completed",
                "external_id": None,
                "metadata": {"prompt_id": "p1"},
                "fields": {
                    "prompt": "Tell me about the apple.",
                    "response_a": "The apple is a fine apple, thanks.",
                    "response_b": "A river is here",
                },
                "dataset": {"id": "d1", "name": "prefs"},
                "inserted_at": updated,
                "updated_at": updated,
            },
        },
    }


def test_argilla_webhooks(api) -> None:
    client, _ = api
    secret = "whsec_" + base64.b64encode(b"argilla-test-secret-0123456789ab").decode()
    assert client.post("/v1/integrations", json={"tool": "argilla", "label_config": "pairwise"}).status_code == 422
    intg = client.post(
        "/v1/integrations", json={"tool": "argilla", "label_config": "pairwise", "secret": secret}
    ).json()
    wh, hook = Webhook(secret), intg["webhook_path"]

    def send(msg_id: str, payload: dict, signer: Webhook = wh):
        return client.post(hook, content=json.dumps(payload), headers=_sign(signer, msg_id, payload))

    first = _response("r1", "submitted", "response_a", "2026-01-01T00:00:00")
    forged = Webhook("whsec_" + base64.b64encode(b"someone-else-secret-0123456789ab").decode())
    assert send("msg_1", first, forged).status_code == 401  # its id is not recorded: msg_1 below is new
    assert client.post(hook, content=json.dumps(first), headers={"webhook-id": "x"}).status_code == 401
    assert client.get(f"/v1/integrations/{intg['id']}").json()["draft"]["open"] == 0
    assert send("msg_1", first).json() == {"status": "ok", "changes": {"added": 1}}
    assert send("msg_1", first).json() == {"status": "duplicate", "changes": {}}  # dedup on webhook-id
    second = _response("r2", "submitted", "response_b", "2026-01-01T00:00:01")
    assert send("msg_2", second).json()["changes"] == {"added": 1}
    changed = {**_response("r1", "submitted", "response_b", "2026-01-01T00:05:00"), "type": "response.updated"}
    assert send("msg_3", changed).json()["changes"] == {"replaced": 1}
    assert send("msg_4", {"type": "response.deleted", "version": 1, "timestamp": "t", "data": {"id": "r2"}}).json()[
        "changes"
    ] == {"deleted": 1}
    assert (
        send("msg_5", {"type": "dataset.created", "version": 1, "timestamp": "t", "data": {}}).json()["changes"] == {}
    )
    fb = client.post(f"/v1/integrations/{intg['id']}/seal").json()
    assert fb["kind"] == "pairwise" and fb["n_records"] == 1 and fb["source"] == "argilla_webhook"
    [rec] = _lines(client, fb["id"])
    assert rec["label"] == 0 and rec["prompt_id"] == "p1"  # the update (response_b) replaced the first answer

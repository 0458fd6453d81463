"""Every loss declared in halos_core.loss_registry reaches the API by itself: listed by
GET /v1/losses, in the OpenAPI schema of `loss`, and accepted by POST /v1/runs."""

from __future__ import annotations

from fastapi.testclient import TestClient

from halos_core.loss_registry import LOSSES


def test_every_declared_loss_is_listed_and_accepted(client: TestClient, model: dict) -> None:
    listed = {item["name"]: item for item in client.get("/v1/losses").json()["losses"]}
    assert sorted(listed) == sorted(LOSSES)
    assert listed["kto"]["min_microbatch_size"] == 2 and listed["bradley_terry"]["head"] == "reward"
    assert listed["dpo"]["needs_reference"] is True and "arxiv.org" in listed["dpo"]["summary"]
    assert listed["dpo"]["parameters"]["properties"]["beta"]["default"] == 0.1

    mapping = client.get("/openapi.json").json()["components"]["schemas"]["RunCreate"]["properties"]["loss"]
    assert sorted(mapping["discriminator"]["mapping"]) == sorted(LOSSES)

    for name in LOSSES:
        resp = client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": name}})
        assert resp.status_code == 201, (name, resp.json())
        assert resp.json()["loss"]["name"] == name
    bad = client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "not_a_loss"}})
    assert bad.status_code == 422

"""Webhooks (docs/RELIABILITY.md S4): the API, the dispatcher against a real HTTP receiver on
127.0.0.1 (signatures verified by the Standard Webhooks reference verifier), backoff and give-up,
secret rotation, the address guard (loopback / private / link-local refused unless allowed,
checked on the resolved address, redirects not followed), tampered / stale / replayed deliveries
rejected."""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlmodel import select
from standardwebhooks import webhooks as sw
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from server.models import OutboundDelivery
from server.webhooks import addresses, dispatcher
from tests.server._receiver import Receiver


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def _hook(client, url: str, types=("feedback.stored",)) -> dict:
    resp = client.post("/v1/webhooks", json={"url": url, "event_types": list(types)})
    assert resp.status_code == 201, resp.text
    return resp.json()


def _upload(client) -> str:
    from halos_core.synthetic import pairwise_records, to_jsonl_bytes

    resp = client.post(
        "/v1/feedback",
        content=to_jsonl_bytes(pairwise_records(4, seed=len(str(client)))),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _deliveries(client, hook_id: str) -> list[dict]:
    return client.get(f"/v1/webhooks/{hook_id}/deliveries").json()["items"]


def _dispatch(settings, rounds: int = 1) -> None:
    with dispatcher.make_client(settings) as http:
        for _ in range(rounds):
            dispatcher.dispatch_once(settings, http)


def _due_now(session) -> None:
    for d in session.exec(select(OutboundDelivery)).all():
        d.next_attempt_at = datetime.now(UTC) - timedelta(seconds=1)
        session.add(d)
    session.commit()


def test_api_create_list_rotate_delete_and_validation(client, settings):
    hook = _hook(client, "https://hooks.example.com/x", ["job.finished", "feedback.stored"])
    assert hook["secret"].startswith("whsec_") and hook["event_types"] == ["feedback.stored", "job.finished"]
    listed = client.get("/v1/webhooks").json()["items"]
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    rotated = client.post(f"/v1/webhooks/{hook['id']}/rotate-secret").json()
    assert rotated["secret"] != hook["secret"] and rotated["previous_secret_expires_at"]
    bad = client.post("/v1/webhooks", json={"url": "https://x.example.com", "event_types": ["job.nope"]})
    assert bad.status_code == 422 and "event_types.0" in bad.text and "job.finished" in bad.text
    for url in (
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "http://10.1.2.3/x",
    ):
        resp = client.post("/v1/webhooks", json={"url": url, "event_types": ["*"]})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "webhook_url_not_allowed", (url, resp.text)
    assert client.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
    assert client.get(f"/v1/webhooks/{hook['id']}").status_code == 404
    assert client.get("/v1/webhooks").json()["items"] == []


def test_signed_delivery_backoff_log_and_rotation(client, session, settings, receiver):
    settings.webhook_allowed_networks = ["127.0.0.1/32"]
    settings.webhook_backoff_s = 30
    hook = _hook(client, receiver.url)
    receiver.secret = hook["secret"]
    fb = _upload(client)
    receiver.mode = "fail"
    _dispatch(settings)
    [d] = _deliveries(client, hook["id"])
    assert d["status"] == "pending" and d["attempts"] == 1 and d["last_status_code"] == 500
    due_in = (datetime.fromisoformat(d["next_attempt_at"]) - datetime.now(UTC)).total_seconds()
    assert 20 < due_in <= 33  # the first backoff (+ up to 10% jitter)
    _dispatch(settings)  # not due yet: nothing sent
    assert len(receiver.raw) == 1
    receiver.mode = "ok"
    _due_now(session)
    _dispatch(settings)
    [d] = _deliveries(client, hook["id"])
    assert d["status"] == "delivered" and [a["status_code"] for a in d["log"]] == [500, 204]
    assert [r.webhook_id for r in receiver.raw] == [d["id"], d["id"]]  # the same webhook-id on every attempt
    assert receiver.raw[0].body == receiver.raw[1].body and all(r.verified for r in receiver.raw)
    body = json.loads(receiver.accepted[d["id"]])
    assert body["type"] == "feedback.stored" and body["data"]["feedback_id"] == fb

    # rotation: both secrets sign during the grace period
    new = client.post(f"/v1/webhooks/{hook['id']}/rotate-secret").json()["secret"]
    _upload(client)
    _dispatch(settings)
    last = receiver.raw[-1]
    assert len(last.headers["webhook-signature"].split(" ")) == 2
    for secret in (hook["secret"], new):
        assert Webhook(secret).verify(last.body, last.headers)


def test_gives_up_after_max_age(client, session, settings, receiver):
    settings.webhook_allowed_networks = ["127.0.0.1/32"]
    settings.webhook_max_age_s = 1
    hook = _hook(client, receiver.url)
    receiver.secret, receiver.mode = hook["secret"], "fail"
    _upload(client)
    _dispatch(settings)
    [d] = _deliveries(client, hook["id"])
    assert d["status"] == "failed" and d["attempts"] == 1 and d["finished_at"]
    # a manual redelivery sends it again with the same webhook-id
    receiver.mode = "ok"
    again = client.post(f"/v1/webhooks/{hook['id']}/deliveries/{d['id']}/redeliver").json()
    assert again["status"] == "pending"
    _dispatch(settings)
    assert _deliveries(client, hook["id"])[0]["status"] == "delivered"
    assert [r.webhook_id for r in receiver.raw] == [d["id"], d["id"]]


def test_loopback_refused_without_the_allow_list_and_redirects_not_followed(client, session, settings, receiver):
    # the allow-list admits the receiver's address to create the endpoint; then it is withdrawn
    settings.webhook_allowed_networks = ["127.0.0.1/32"]
    hook = _hook(client, receiver.url)
    receiver.secret = hook["secret"]
    settings.webhook_allowed_networks = []
    _upload(client)
    _dispatch(settings)
    [d] = _deliveries(client, hook["id"])
    assert d["status"] == "pending" and d["last_status_code"] is None
    assert "loopback" in d["last_error"] and receiver.raw == []  # never reached the receiver

    # a redirect to a forbidden address is not followed (no redirect is)
    target = Receiver().start()
    try:
        settings.webhook_allowed_networks = ["127.0.0.1/32"]
        receiver.mode, receiver.redirect_to = "redirect", target.url
        _due_now(session)
        _dispatch(settings)
        [d] = _deliveries(client, hook["id"])
        assert d["last_status_code"] == 302 and "not followed" in d["last_error"]
        assert target.raw == []
    finally:
        target.stop()


def test_the_guard_checks_resolved_addresses(monkeypatch):
    allowed: list[str] = []
    for ip in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "fc00::1",
    ):
        assert addresses.refusal(ipaddress.ip_address(ip), allowed), ip
    assert addresses.refusal(ipaddress.ip_address("93.184.216.34"), allowed) is None
    assert addresses.refusal(ipaddress.ip_address("10.0.0.1"), ["10.0.0.0/8"]) is None
    # a public-looking name that resolves to a private address is refused (DNS rebinding), and the
    # request would go to exactly the address that was checked
    monkeypatch.setattr(addresses.socket, "getaddrinfo", lambda host, port, **kw: [(2, 1, 6, "", ("10.9.9.9", port))])
    with pytest.raises(addresses.AddressRefused, match="private"):
        addresses.pinned_target("https://hooks.example.com/x", [])
    monkeypatch.setattr(
        addresses.socket,
        "getaddrinfo",
        lambda host, port, **kw: [(2, 1, 6, "", ("10.9.9.9", port)), (2, 1, 6, "", ("93.184.216.34", port))],
    )
    target = addresses.pinned_target("https://hooks.example.com:8443/x?y=1", [])
    assert str(target.url) == "https://93.184.216.34:8443/x?y=1"
    assert target.host_header == "hooks.example.com:8443" and target.extensions == {"sni_hostname": "hooks.example.com"}


def test_tampered_stale_and_replayed_deliveries_are_rejected(client, settings, receiver, monkeypatch):
    settings.webhook_allowed_networks = ["127.0.0.1/32"]
    hook = _hook(client, receiver.url)
    receiver.secret = hook["secret"]
    _upload(client)
    _dispatch(settings)
    [got] = receiver.raw
    assert got.verified
    verifier = Webhook(hook["secret"])
    with pytest.raises(WebhookVerificationError):
        verifier.verify(got.body.replace(b"feedback.stored", b"feedback.deleted"), got.headers)  # tampered body
    with pytest.raises(WebhookVerificationError):
        verifier.verify(got.body, {**got.headers, "webhook-id": "msg_other"})  # signature bound to the id
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "QUJD" * 8).verify(got.body, got.headers)  # another secret

    class Later(datetime):  # the receiver's clock 10 minutes after the delivery: stale
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(minutes=10)

    monkeypatch.setattr(sw, "datetime", Later)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier.verify(got.body, got.headers)
    monkeypatch.undo()
    # replayed verbatim within the tolerance: verifies, but the receiver's dedup on webhook-id drops it
    resp = httpx.post(receiver.url, content=got.body, headers=got.headers)
    assert resp.status_code == 204 and receiver.duplicates == [got.webhook_id] and len(receiver.accepted) == 1


def test_the_subscription_literal_names_every_event_type():
    from typing import get_args

    from halos_client.event_models import SUBSCRIPTION_ALIASES, EventType, Subscription

    assert set(get_args(Subscription)) == {t.value for t in EventType} | set(SUBSCRIPTION_ALIASES)

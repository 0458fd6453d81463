"""POST/GET /v1/feedback: accepted forms, all-or-nothing validation, size caps (U1), hostile file
names (U2), hostile JSON (U3), many bad records (U4), idempotency (U5)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from halos_core.synthetic import binary_records, pairwise_records, scalar_records
from server.app import create_app
from server.models import FeedbackFile, IdempotencyRecord
from server.settings import Settings
from tests.server.conftest import jsonl, upload


def _rows(session: Session) -> int:
    n = session.exec(select(func.count()).select_from(FeedbackFile)).one()
    session.rollback()
    return n


def _stored_files(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.feedback_dir.iterdir())


def _tmp_files(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.uploads_tmp_dir.iterdir())


def _assert_nothing_stored(session: Session, settings: Settings) -> None:
    assert _rows(session) == 0
    assert _stored_files(settings) == []
    assert _tmp_files(settings) == []


def _multipart(boundary: str, parts: list[tuple[str, bytes | None, bytes]]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = b'form-data; name="' + name.encode() + b'"'
        if filename is not None:
            disp += b'; filename="' + filename + b'"'
        out += b"--" + boundary.encode() + b"\r\nContent-Disposition: " + disp + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


# --------------------------------------------------------------------------- accepted forms


def test_multipart_upload(client: TestClient, settings: Settings) -> None:
    body = jsonl(pairwise_records(10, seed=1, test_fraction=0.3))
    resp = client.post("/v1/feedback", files={"file": ("prefs.jsonl", body, "application/x-ndjson")})
    assert resp.status_code == 201, resp.text
    fb = resp.json()
    assert fb["id"].startswith("fb_") and fb["kind"] == "pairwise" and fb["n_records"] == 10
    assert fb["n_train"] + fb["n_test"] == 10 and fb["n_prompts"] == 10
    assert fb["sha256"] == hashlib.sha256(body).hexdigest() and fb["size_bytes"] == len(body)
    assert fb["filename"] == "prefs.jsonl"
    stored = settings.feedback_dir / f"{fb['sha256']}.jsonl"
    assert stored.read_bytes() == body  # I5: readable, hash matches
    assert _tmp_files(settings) == []
    got = client.get(f"/v1/feedback/{fb['id']}")
    assert got.status_code == 200 and got.json() == fb


def test_multipart_filename_field_wins(client: TestClient) -> None:
    body = jsonl(binary_records(4))
    resp = client.post("/v1/feedback", files={"file": ("blob", body)}, data={"filename": "labels-2024.jsonl"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["filename"] == "labels-2024.jsonl" and resp.json()["kind"] == "binary"


def test_raw_json_array(client: TestClient, settings: Settings) -> None:
    body = json.dumps(scalar_records(3, outputs_per_prompt=2)).encode()
    resp = upload(client, body, "application/json", params={"filename": "scores.json"})
    assert resp.status_code == 201, resp.text
    fb = resp.json()
    assert fb["kind"] == "scalar" and fb["n_records"] == 6 and fb["n_prompts"] == 3
    assert fb["filename"] == "scores.json"
    assert (settings.feedback_dir / f"{fb['sha256']}.json").read_bytes() == body


def test_raw_jsonl_both_media_types(client: TestClient) -> None:
    for ctype in ("application/jsonl", "application/x-ndjson", "application/x-ndjson; charset=utf-8"):
        resp = upload(client, jsonl(pairwise_records(3, seed=7)), ctype)
        assert resp.status_code == 201, (ctype, resp.text)
        assert resp.json()["filename"] is None


def test_unsupported_media_type(client: TestClient, session: Session, settings: Settings) -> None:
    resp = upload(client, b"a,b\n1,2\n", "text/csv")
    assert resp.status_code == 415
    assert resp.json()["error"]["code"] == "unsupported_media_type"
    _assert_nothing_stored(session, settings)


def test_identical_content_twice_without_key_two_rows_one_blob(
    client: TestClient, session: Session, settings: Settings
) -> None:
    body = jsonl(pairwise_records(3))
    a = upload(client, body).json()
    b = upload(client, body).json()
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]
    assert _rows(session) == 2 and len(_stored_files(settings)) == 1


def test_list_pagination(client: TestClient) -> None:
    ids = [upload(client, jsonl(pairwise_records(2, seed=i))).json()["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = client.get("/v1/feedback", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200
        seen += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once
    bad = client.get("/v1/feedback", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_cursor"
    assert client.get("/v1/feedback", params={"limit": 0}).status_code == 422
    assert client.get("/v1/feedback", params={"limit": 10_000}).status_code == 422


def test_unknown_feedback_404(client: TestClient) -> None:
    for fid in ("fb_000000000000000000000000", "nope", "%00", "x" * 150):
        resp = client.get(f"/v1/feedback/{fid}")
        assert resp.status_code == 404, fid
        assert resp.json()["error"]["code"] == "feedback_not_found"


# --------------------------------------------------------------------------- U4 all-or-nothing validation


def test_many_bad_records_one_422_nothing_stored(client: TestClient, session: Session, settings: Settings) -> None:
    records = pairwise_records(12, seed=3)
    records[1]["label"] = 2
    del records[3]["output_A"]
    records[7]["prompt"] = 5
    lines = jsonl(records).splitlines()
    lines[5] = b"{not json"
    body = b"\n".join(lines) + b"\n"
    resp = upload(client, body, headers={"Idempotency-Key": "bad-file"})
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["code"] == "invalid_feedback"
    found = {(e["line"], e["field"], e["code"]) for e in err["details"]["errors"]}
    assert (2, "label", "invalid_label") in found
    assert (4, "output_A", "missing_field") in found
    assert (6, "", "invalid_json") in found
    assert any(line == 8 and field.startswith("prompt") for line, field, _ in found)
    assert err["details"]["truncated"] is False and err["details"]["records_checked"] >= 12
    for e in err["details"]["errors"]:
        assert set(e) == {"index", "line", "field", "code", "message", "hint"}
    _assert_nothing_stored(session, settings)
    # the key was not consumed by the failure: a corrected file under the same key is accepted
    ok = upload(client, jsonl(pairwise_records(3)), headers={"Idempotency-Key": "bad-file"})
    assert ok.status_code == 201


def test_error_list_is_capped(app, keys, settings: Settings, session: Session) -> None:
    capped = create_app(settings.model_copy(update={"max_validation_errors": 5}))
    records = pairwise_records(20)
    for r in records:
        r["label"] = 7
    with TestClient(capped, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:
        resp = upload(c, jsonl(records))
    assert resp.status_code == 422
    details = resp.json()["error"]["details"]
    assert len(details["errors"]) == 5 and details["truncated"] is True
    _assert_nothing_stored(session, settings)


def test_empty_file(client: TestClient, session: Session, settings: Settings) -> None:
    resp = upload(client, b"")
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_feedback"
    _assert_nothing_stored(session, settings)


# --------------------------------------------------------------------------- U1 size caps


def test_413_with_content_length(client: TestClient, session: Session, settings: Settings) -> None:
    body = b"x" * (settings.max_upload_bytes + 1)
    resp = upload(client, body)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"
    _assert_nothing_stored(session, settings)


def test_413_chunked_without_content_length(client: TestClient, session: Session, settings: Settings) -> None:
    sent = []

    def gen() -> Iterator[bytes]:
        for _ in range(settings.max_upload_bytes // 4096 + 10):
            sent.append(1)
            yield b'{"a": 1}' + b" " * 4087 + b"\n"

    resp = client.post("/v1/feedback", content=gen(), headers={"Content-Type": "application/x-ndjson"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"
    _assert_nothing_stored(session, settings)


def test_413_multipart(client: TestClient, session: Session, settings: Settings) -> None:
    body = b"x" * (settings.max_upload_bytes + 10)
    resp = client.post("/v1/feedback", files={"file": ("big.jsonl", body)})
    assert resp.status_code == 413
    _assert_nothing_stored(session, settings)


def test_file_of_exactly_the_limit_is_accepted_multipart(client: TestClient, settings: Settings) -> None:
    record = jsonl(pairwise_records(1))
    body = record + b" " * (settings.max_upload_bytes - len(record))
    assert len(body) == settings.max_upload_bytes
    resp = client.post("/v1/feedback", files={"file": ("edge.jsonl", body)})
    assert resp.status_code == 201, resp.text


# --------------------------------------------------------------------------- U2 file names


def test_hostile_filenames_stored_under_server_id(
    client: TestClient, session: Session, settings: Settings, tmp_path: Path
) -> None:
    names: list[bytes] = [
        b"../../x",
        b"/etc/passwd",
        b"a\x00b.jsonl",
        b"n" * 4096,
        "\u202etxt.exe".encode(),
        "משוב-ערבית-عربي.jsonl".encode(),
        b"..\\..\\win.ini",
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    results = []
    for i, name in enumerate(names):
        body = jsonl(pairwise_records(2, seed=100 + i))
        mp = _multipart("XyZ", [("file", name.replace(b'"', b""), body)])
        resp = client.post("/v1/feedback", content=mp, headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        assert resp.status_code == 201, (name[:40], resp.text)
        results.append(resp.json())
        # the same name as a form field and as a raw-body query parameter
        resp2 = client.post(
            "/v1/feedback", files={"file": ("f", body)}, data={"filename": name.decode("utf-8", "replace")}
        )
        assert resp2.status_code == 201, resp2.text
        results.append(resp2.json())
        resp3 = upload(client, body, params={"filename": name.decode("utf-8", "replace")[:4096]})
        assert resp3.status_code in (201, 422), resp3.text
    for fb in results:
        name = fb["filename"]
        assert name is not None and "\x00" not in name and "\u202e" not in name and len(name) <= 255
    assert any(fb["filename"] == "../../x" for fb in results)  # metadata kept, harmlessly
    assert any("\\x00" in fb["filename"] for fb in results) and any("\\u202e" in fb["filename"] for fb in results)
    assert any("عربي" in fb["filename"] for fb in results)  # RTL letters kept
    stored = _stored_files(settings)
    assert all(len(n.split(".")[0]) == 64 and n.split(".")[1] in ("json", "jsonl") for n in stored)
    assert _tmp_files(settings) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing escaped the data dir
    assert not (settings.data_dir / "x").exists() and not (settings.data_dir.parent / "x").exists()


# --------------------------------------------------------------------------- U3 hostile JSON


def test_hostile_json_is_4xx(app, keys, settings: Settings, session: Session) -> None:
    small = create_app(settings.model_copy(update={"max_record_bytes": 10_000, "max_upload_bytes": 2_000_000}))
    bodies = {
        "deep-array": b"[" * 20_000 + b"]" * 20_000,
        "deep-line": b'{"a": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n",
        "long-line": b'{"type": "binary_feedback", "prompt": "' + b"x" * 1_500_000 + b'"}\n',
        "bad-utf8": b'{"prompt": "\xff\xfe"}\n',
        "nul": b'{"prompt": "a\x00b"}\n',
        "nan": b'{"type": "scalar_feedback", "prompt_id": "p", "prompt": "x", "output": "y", "reward": NaN}\n',
        "binary": bytes(range(256)) * 10,
    }
    with TestClient(small, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:
        for name, body in bodies.items():
            for ctype in ("application/x-ndjson", "application/json"):
                resp = upload(c, body, ctype)
                assert 400 <= resp.status_code < 500, (name, ctype, resp.status_code, resp.text[:300])
                assert "error" in resp.json()
    _assert_nothing_stored(session, settings)


# --------------------------------------------------------------------------- U5 idempotency


def test_idempotency_sequential(client: TestClient, session: Session, settings: Settings) -> None:
    body = jsonl(pairwise_records(4, seed=9))
    first = upload(client, body, headers={"Idempotency-Key": "k-1"})
    second = upload(client, body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201 and second.status_code == 201
    assert second.json() == first.json()
    assert second.headers.get("Idempotent-Replayed") == "true" and "Idempotent-Replayed" not in first.headers
    assert _rows(session) == 1 and _tmp_files(settings) == []
    # the same body as multipart (another boundary) with the same name is the same request
    again = client.post("/v1/feedback", files={"file": ("f.jsonl", body)}, headers={"Idempotency-Key": "k-2"})
    again2 = client.post("/v1/feedback", files={"file": ("f.jsonl", body)}, headers={"Idempotency-Key": "k-2"})
    assert again.json()["id"] == again2.json()["id"]
    assert _rows(session) == 2


def test_idempotency_same_key_different_body_422(client: TestClient, session: Session, settings: Settings) -> None:
    upload(client, jsonl(pairwise_records(2, seed=1)), headers={"Idempotency-Key": "k"})
    resp = upload(client, jsonl(pairwise_records(2, seed=2)), headers={"Idempotency-Key": "k"})
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "idempotency_key_reused"
    assert _rows(session) == 1 and _tmp_files(settings) == [] and len(_stored_files(settings)) == 1


def test_idempotency_keys_are_per_project(client: TestClient, client_b: TestClient) -> None:
    body = jsonl(pairwise_records(2))
    a = upload(client, body, headers={"Idempotency-Key": "shared"}).json()
    b = upload(client_b, body, headers={"Idempotency-Key": "shared"})
    assert b.status_code == 201 and b.json()["id"] != a["id"]


def test_idempotency_10_concurrent(app, keys, session: Session, settings: Settings) -> None:
    body = jsonl(pairwise_records(30, seed=4))
    with TestClient(app, headers={"Authorization": f"Bearer {keys['alpha']}"}) as c:

        def post(_: int):
            return upload(c, body, headers={"Idempotency-Key": "concurrent-key"})

        with ThreadPoolExecutor(max_workers=10) as pool:
            responses = list(pool.map(post, range(10)))
    assert [r.status_code for r in responses] == [201] * 10, [r.text for r in responses if r.status_code != 201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert _rows(session) == 1
    n_records = session.exec(select(func.count()).select_from(IdempotencyRecord)).one()
    session.rollback()
    assert n_records == 1
    assert len(_stored_files(settings)) == 1 and _tmp_files(settings) == []


def test_idempotency_key_header_bounds(client: TestClient) -> None:
    body = jsonl(pairwise_records(2))
    resp = upload(client, body, headers={"Idempotency-Key": "k" * 256})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"


def test_idempotency_key_expires_after_ttl(client: TestClient, session: Session, settings: Settings) -> None:
    from datetime import timedelta

    from server.models import utcnow

    first = upload(client, jsonl(pairwise_records(2, seed=1)), headers={"Idempotency-Key": "old"}).json()
    record = session.exec(select(IdempotencyRecord)).one()
    record.created_at = utcnow() - timedelta(hours=settings.idempotency_ttl_hours - 1)
    session.add(record)
    session.commit()
    assert upload(client, jsonl(pairwise_records(2, seed=2)), headers={"Idempotency-Key": "old"}).status_code == 422
    record = session.exec(select(IdempotencyRecord)).one()
    record.created_at = utcnow() - timedelta(hours=settings.idempotency_ttl_hours + 1)
    session.add(record)
    session.commit()
    again = upload(client, jsonl(pairwise_records(2, seed=2)), headers={"Idempotency-Key": "old"})
    assert again.status_code == 201 and again.json()["id"] != first["id"] and "Idempotent-Replayed" not in again.headers
    assert _rows(session) == 2

"""server.storage: streamed staging with a byte cap, multipart streaming, content-addressed publish."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server import storage
from server.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType


async def _chunks(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _run(coro):
    return asyncio.run(coro)


def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_raw_stream_hash_size_ext(tmp_path: Path) -> None:
    body = b'  [{"a": 1}]\n'
    staged = _run(storage.receive_raw(_chunks(body), tmp_dir=tmp_path / "tmp", max_bytes=1000, filename="x.json"))
    assert staged.sha256 == hashlib.sha256(body).hexdigest()
    assert staged.size_bytes == len(body) and staged.ext == "json" and staged.filename == "x.json"
    assert staged.path.read_bytes() == body and staged.path.parent == tmp_path / "tmp"
    jsonl = _run(storage.receive_raw(_chunks(b'{"a": 1}\n'), tmp_dir=tmp_path / "tmp", max_bytes=1000))
    assert jsonl.ext == "jsonl"


def test_raw_cap_while_streaming_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(PayloadTooLarge):
        _run(storage.receive_raw(_chunks(b"x" * 101, 10), tmp_dir=tmp_path, max_bytes=100))
    assert list(tmp_path.iterdir()) == []


def test_declared_length_rejected_before_reading(tmp_path: Path) -> None:
    read = []

    async def never() -> AsyncIterator[bytes]:
        read.append(True)
        yield b"x"

    with pytest.raises(PayloadTooLarge):
        _run(storage.receive_raw(never(), tmp_dir=tmp_path, max_bytes=100, content_length=101))
    assert read == [] and list(tmp_path.iterdir()) == []


def test_stream_error_midway_removes_temp(tmp_path: Path) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"[1,"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        _run(storage.receive_raw(broken(), tmp_dir=tmp_path, max_bytes=100))
    assert list(tmp_path.iterdir()) == []


def test_multipart_streams_file_part_and_filename_field(tmp_path: Path) -> None:
    data = b'{"x": 1}\n' * 50
    body = _multipart("bnd", [("filename", None, b"mine.jsonl"), ("file", "../../etc/passwd", data)])
    staged = _run(
        storage.receive_multipart(
            _chunks(body, 13), "multipart/form-data; boundary=bnd", tmp_dir=tmp_path, max_bytes=len(data)
        )
    )
    assert staged.path.read_bytes() == data
    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    assert staged.filename == "mine.jsonl"  # the explicit metadata field wins
    staged2 = _run(
        storage.receive_multipart(
            _chunks(_multipart("b2", [("file", "a/b.json", b"[]")])),
            "multipart/form-data; boundary=b2",
            tmp_dir=tmp_path,
            max_bytes=10,
        )
    )
    assert staged2.filename == "a/b.json" and staged2.ext == "json"


def test_multipart_errors_leave_nothing(tmp_path: Path) -> None:
    ct = "multipart/form-data; boundary=bnd"
    cases = [
        (_multipart("bnd", [("other", None, b"1")]), Unprocessable, "missing_file"),
        (_multipart("bnd", [("file", "a", b"1"), ("file", "b", b"2")]), Unprocessable, "invalid_multipart"),
        (_multipart("bnd", [("file", "a", b"x" * 200)]), PayloadTooLarge, "payload_too_large"),
        (
            _multipart("bnd", [("filename", None, b"n" * (storage.MAX_FIELD_BYTES + 1)), ("file", "a", b"1")]),
            PayloadTooLarge,
            "payload_too_large",
        ),
        (
            b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
            Unprocessable,
            "invalid_multipart",
        ),
        (b"garbage without boundary", Unprocessable, None),
    ]
    for body, exc_type, code in cases:
        with pytest.raises(exc_type) as info:
            _run(storage.receive_multipart(_chunks(body), ct, tmp_dir=tmp_path, max_bytes=100))
        if code:
            assert info.value.code == code, body[:60]
        assert list(tmp_path.iterdir()) == [], body[:60]
    with pytest.raises(Unprocessable):
        _run(storage.receive_multipart(_chunks(b""), "multipart/form-data", tmp_dir=tmp_path, max_bytes=100))


def test_unsupported_media_type(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedMediaType):
        _run(storage.receive_upload(_chunks(b"x"), "text/csv", tmp_dir=tmp_path, max_bytes=10))
    with pytest.raises(UnsupportedMediaType):
        _run(storage.receive_upload(_chunks(b"x"), None, tmp_dir=tmp_path, max_bytes=10))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("../../x", "../../x"),
        ("/etc/passwd", "/etc/passwd"),
        ("a\x00b.jsonl", "a\\x00b.jsonl"),
        ("evil\u202egnp.jsonl", "evil\\u202egnp.jsonl"),  # bidi override escaped
        ("שלום.jsonl", "שלום.jsonl"),  # right-to-left letters kept
        ("", None),
        (None, None),
    ],
)
def test_sanitize_filename(raw: str | None, expected: str | None) -> None:
    assert storage.sanitize_filename(raw) == expected


def test_sanitize_filename_truncates() -> None:
    name = storage.sanitize_filename("a" * 4096)
    assert name is not None and len(name) == storage.MAX_FILENAME_CHARS


def test_publish_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    body = b'{"a": 1}\n'
    s1 = _run(storage.receive_raw(_chunks(body), tmp_dir=data_dir / "tmp", max_bytes=100, filename="../../x"))
    rel, created = storage.publish_blob(s1, data_dir)
    assert created and rel == f"feedback/{hashlib.sha256(body).hexdigest()}.jsonl"
    assert (data_dir / rel).read_bytes() == body and not s1.path.exists()
    s2 = _run(storage.receive_raw(_chunks(body), tmp_dir=data_dir / "tmp", max_bytes=100))
    rel2, created2 = storage.publish_blob(s2, data_dir)
    assert rel2 == rel and not created2 and not s2.path.exists()
    assert list((data_dir / "tmp").iterdir()) == []
    assert sorted(p.name for p in (data_dir / "feedback").iterdir()) == [Path(rel).name]


def test_blob_relpath_refuses_non_hashes() -> None:
    with pytest.raises(ValueError):
        storage.blob_relpath("../../etc/passwd", "json")
    with pytest.raises(ValueError):
        storage.blob_relpath("a" * 64, "exe")


def test_cleanup_stale_uploads(tmp_path: Path) -> None:
    old = tmp_path / "upload-old.part"
    new = tmp_path / "upload-new.part"
    other = tmp_path / "keep.txt"
    for p in (old, new, other):
        p.write_bytes(b"x")
    past = time.time() - 3 * 24 * 3600
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    assert storage.cleanup_stale_uploads(tmp_path) == 1
    assert not old.exists() and new.exists() and other.exists()

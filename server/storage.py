"""Feedback file storage: streamed, size-capped uploads; content-addressed, atomically published blobs.

An upload is written chunk by chunk into a fresh temp file under `<data>/tmp/` while its sha256
and size are computed; the byte cap is enforced while streaming (and up front when the client
declares a too-large Content-Length), so neither memory nor temp disk grows past the cap.
Only after validation succeeds is the temp file fsynced and renamed to
`<data>/feedback/<sha256>.<ext>`: the stored name comes from the content, never from the client.
Every failure path removes the temp file (`StagedFile.discard`), so an aborted or invalid upload
leaves nothing behind. The client's file name survives only as escaped, truncated metadata.

Framework-free: the HTTP layer hands in an async iterator of body chunks.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread

from server.errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

RAW_CONTENT_TYPES = frozenset({"application/json", "application/x-ndjson", "application/jsonl"})
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the small `filename` field
MAX_FIELD_BYTES = 16 * 1024  # a non-file multipart field (e.g. `filename`)
MAX_PARTS = 16
MAX_FILENAME_CHARS = 255
_FLUSH_BYTES = 1 << 20  # buffer this much before handing a write to a worker thread
_WHITESPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------- file names


def _escape_char(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def sanitize_filename(raw: str | bytes | None) -> str | None:
    """The client's file name as harmless metadata: never used in a path.

    Control characters (NUL included) and Unicode format characters (bidi overrides such as
    U+202E, zero-width characters) are escaped as `\\xNN`/`\\uNNNN` so the name cannot spoof its
    extension in a UI; right-to-left *letters* are kept. Truncated to 255 characters.
    """
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    out = []
    for ch in raw[: MAX_FILENAME_CHARS * 2]:
        cat = unicodedata.category(ch)
        out.append(_escape_char(ch) if cat in ("Cc", "Cf", "Cs", "Zl", "Zp") else ch)
    name = "".join(out).strip()
    if len(name) > MAX_FILENAME_CHARS:
        name = name[: MAX_FILENAME_CHARS - 1] + "…"
    return name or None


# --------------------------------------------------------------------------- staging


@dataclass
class StagedFile:
    """An upload written to a temp file; not visible anywhere until `publish_blob`."""

    path: Path
    sha256: str
    size_bytes: int
    ext: str  # "json" (a JSON array) or "jsonl"
    filename: str | None = None

    def discard(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


@dataclass
class _Sink:
    """Temp file + sha256 + byte counter + cap; writes are batched and run off the event loop."""

    tmp_dir: Path
    max_bytes: int
    on_flush: Callable[[Path, int, bytes], None] | None = None  # (path, offset, bytes) once written
    path: Path | None = None
    size: int = 0
    _written: int = 0
    first_byte: bytes = b""
    _fd: int = -1
    _digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    _buffer: bytearray = field(default_factory=bytearray)

    def open(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.tmp_dir)
        self._fd, self.path = fd, Path(name)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(
                f"the file is larger than the limit of {self.max_bytes} bytes",
                details={"max_bytes": self.max_bytes},
            )
        if not self.first_byte:
            stripped = data.lstrip(_WHITESPACE)
            if stripped.startswith(_BOM):
                stripped = stripped[len(_BOM) :].lstrip(_WHITESPACE)
            self.first_byte = stripped[:1]
        self._digest.update(data)
        self._buffer += data
        if len(self._buffer) >= _FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._buffer:
            chunk, self._buffer = bytes(self._buffer), bytearray()
            await anyio.to_thread.run_sync(_write_all, self._fd, chunk)
            offset, self._written = self._written, self._written + len(chunk)
            if self.on_flush is not None:
                assert self.path is not None
                self.on_flush(self.path, offset, chunk)

    async def finish(self, filename: str | None) -> StagedFile:
        await self._flush()
        await anyio.to_thread.run_sync(os.fsync, self._fd)
        self._close()
        assert self.path is not None
        ext = "json" if self.first_byte == b"[" else "jsonl"
        return StagedFile(self.path, self._digest.hexdigest(), self.size, ext, filename)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        self._close()
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _check_declared_length(content_length: int | None, limit: int) -> None:
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(
            f"Content-Length {content_length} exceeds the upload limit",
            details={"max_bytes": limit, "content_length": content_length},
        )


async def receive_raw(
    chunks: AsyncIterator[bytes],
    *,
    tmp_dir: Path,
    max_bytes: int,
    content_length: int | None = None,
    filename: str | None = None,
    on_flush: Callable[[Path, int, bytes], None] | None = None,
) -> StagedFile:
    """Stream a raw request body (the whole body is the file) into a temp file; `on_flush` sees
    each piece once it is written (e.g. to start validating the complete part of the file)."""
    _check_declared_length(content_length, max_bytes)
    sink = _Sink(tmp_dir, max_bytes, on_flush)
    sink.open()
    try:
        async for chunk in chunks:
            await sink.write(chunk)
        return await sink.finish(sanitize_filename(filename))
    except BaseException:
        sink.abort()
        raise


class _MultipartState:
    """Callbacks for python-multipart's streaming parser; file bytes are queued for the sink."""

    def __init__(self, file_field: str, filename_field: str) -> None:
        self.file_field = file_field
        self.filename_field = filename_field
        self.parts = 0
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.disposition = b""
        self.part_name: str | None = None
        self.part_is_file = False
        self.field_data = bytearray()
        self.file_seen = False
        self.file_done = False
        self.file_filename: str | None = None
        self.field_filename: str | None = None
        self.pending: list[bytes] = []

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Unprocessable(f"too many multipart parts (max {MAX_PARTS})", code="invalid_multipart")
        self.disposition = b""
        self.part_name = None
        self.part_is_file = False
        self.field_data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self.header_name).strip().lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_name = bytearray()
        self.header_value = bytearray()

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self.disposition.decode("latin-1"))
        name = options.get(b"name")
        if name is None:
            raise Unprocessable('a multipart part has no Content-Disposition "name"', code="invalid_multipart")
        self.part_name = name.decode("utf-8", errors="replace")
        if self.part_name == self.file_field:
            if self.file_seen:
                raise Unprocessable(
                    f"more than one '{self.file_field}' part; upload one file per request",
                    code="invalid_multipart",
                )
            self.file_seen = True
            self.part_is_file = True
            raw_name = options.get(b"filename")
            if raw_name is not None:
                self.file_filename = raw_name.decode("utf-8", errors="replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part_is_file:
            self.pending.append(bytes(data[start:end]))
        else:
            self.field_data += data[start:end]
            if len(self.field_data) > MAX_FIELD_BYTES:
                raise PayloadTooLarge(
                    f"multipart field '{self.part_name}' is larger than {MAX_FIELD_BYTES} bytes",
                    details={"field": self.part_name, "max_bytes": MAX_FIELD_BYTES},
                )

    def on_part_end(self) -> None:
        if self.part_is_file:
            self.file_done = True
        elif self.part_name == self.filename_field:
            self.field_filename = bytes(self.field_data).decode("utf-8", errors="replace")


async def receive_multipart(
    chunks: AsyncIterator[bytes],
    content_type: str,
    *,
    tmp_dir: Path,
    max_bytes: int,
    content_length: int | None = None,
    file_field: str = "file",
    filename_field: str = "filename",
    on_flush: Callable[[Path, int, bytes], None] | None = None,
) -> StagedFile:
    """Stream a multipart/form-data body: the `file` part goes to a temp file, nothing is spooled.

    `max_bytes` caps the file; the whole body may exceed it by `MULTIPART_OVERHEAD_BYTES`.
    The optional `filename` field (metadata) wins over the part's own Content-Disposition filename.
    """
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    body_limit = max_bytes + MULTIPART_OVERHEAD_BYTES
    _check_declared_length(content_length, body_limit)
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise Unprocessable("multipart/form-data without a valid boundary", code="invalid_multipart")

    state = _MultipartState(file_field, filename_field)
    callbacks: MultipartCallbacks = {
        "on_part_begin": state.on_part_begin,
        "on_part_data": state.on_part_data,
        "on_part_end": state.on_part_end,
        "on_header_field": state.on_header_field,
        "on_header_value": state.on_header_value,
        "on_header_end": state.on_header_end,
        "on_headers_finished": state.on_headers_finished,
    }
    sink = _Sink(tmp_dir, max_bytes, on_flush)
    sink.open()
    received = 0
    try:
        try:
            parser = MultipartParser(boundary, callbacks)
            async for chunk in chunks:
                received += len(chunk)
                if received > body_limit:
                    raise PayloadTooLarge(
                        f"the request body is larger than the limit of {body_limit} bytes",
                        details={"max_bytes": max_bytes},
                    )
                parser.write(chunk)
                for data in state.pending:
                    await sink.write(data)
                state.pending.clear()
            parser.finalize()
        except FormParserError as exc:
            raise Unprocessable(f"malformed multipart body: {exc}"[:500], code="invalid_multipart") from exc
        if not state.file_seen:
            raise Unprocessable(
                f"multipart body has no '{file_field}' part", code="missing_file", details={"field": file_field}
            )
        if not state.file_done:
            raise Unprocessable("multipart body ended inside the file part", code="invalid_multipart")
        name = state.field_filename if state.field_filename is not None else state.file_filename
        return await sink.finish(sanitize_filename(name))
    except BaseException:
        sink.abort()
        raise


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def receive_upload(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    *,
    tmp_dir: Path,
    max_bytes: int,
    content_length: int | None = None,
    filename: str | None = None,
    on_flush: Callable[[Path, int, bytes], None] | None = None,
) -> StagedFile:
    """Dispatch on the media type: multipart/form-data or a raw JSON / JSONL body."""
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        return await receive_multipart(
            chunks,
            content_type or "",
            tmp_dir=tmp_dir,
            max_bytes=max_bytes,
            content_length=content_length,
            on_flush=on_flush,
        )
    if kind in RAW_CONTENT_TYPES:
        return await receive_raw(
            chunks,
            tmp_dir=tmp_dir,
            max_bytes=max_bytes,
            content_length=content_length,
            filename=filename,
            on_flush=on_flush,
        )
    raise UnsupportedMediaType(
        f"unsupported Content-Type {kind or '(none)'!r}",
        details={"accepted": ["multipart/form-data", *sorted(RAW_CONTENT_TYPES)]},
    )


# --------------------------------------------------------------------------- blobs


def blob_relpath(sha256: str, ext: str) -> str:
    """Where a blob lives relative to the data dir (content-addressed; `ext` is json or jsonl)."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256) or ext not in ("json", "jsonl"):
        raise ValueError("not a sha256 / extension")
    return f"feedback/{sha256}.{ext}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_blob(staged: StagedFile, data_dir: Path) -> tuple[str, bool]:
    """Atomically move a staged upload to its content address. Returns (relative path, created).

    The temp file was fsynced by the sink; the rename is atomic and the directory is fsynced, so
    a reader sees the whole blob or nothing. If the blob already exists (same bytes, same hash)
    the temp file is simply dropped.
    """
    rel = blob_relpath(staged.sha256, staged.ext)
    final = data_dir / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file() and final.stat().st_size == staged.size_bytes:
        staged.discard()
        return rel, False
    os.replace(staged.path, final)
    _fsync_dir(final.parent)
    return rel, True


def cleanup_stale_uploads(tmp_dir: Path, older_than_s: float = 24 * 3600) -> int:
    """Remove temp files left by a crashed process (uploads in flight are younger than this)."""
    removed = 0
    if not tmp_dir.is_dir():
        return removed
    cutoff = time.time() - older_than_s
    for entry in tmp_dir.glob("upload-*.part"):
        try:
            if entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed += 1
        except OSError:
            continue
    return removed

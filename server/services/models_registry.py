"""Registered SFT models: a directory loadable by `from_pretrained`, checked and content-hashed.

Registration checks, before hashing anything, that the directory holds a `config.json` (a JSON
object), weights (`*.safetensors` or `pytorch_model*.bin`) and a tokenizer (`tokenizer.json`, or
`tokenizer_config.json` plus a vocabulary file), and answers 422 naming everything missing.
Then `tree_sha256` of the directory is recorded: the reference of every run on this model is
pinned to that hash.

Where: only directories under `<data_dir>/models` or one of `HALOS_MODEL_ROOTS` are registered
(`Settings.allowed_model_roots`), the directory and every file in it judged after resolving
symlinks (422 `model_path_not_allowed`), checked before anything else touches the path, so a
refused path reveals nothing about what exists there (see server/settings.py).

Cost: hashing reads the whole directory (seconds per GB; minutes for a 100 GB model), outside any
database transaction, in the request. The route is a sync `def`, so it runs in FastAPI's
threadpool, not on the event loop; to keep a few huge registrations from taking every pool
thread (sync routes and dependencies share them) at most `max_concurrent_model_hashes` hash at
once and the next gets 503 `model_registration_busy` + Retry-After; a directory with more than
`max_model_files` files is refused before any byte is read (422 `model_too_large`). A directory
registered again unchanged is not re-read: its hash is cached in this process by a manifest of
(path, size, mtime, ctime, inode) of every file, never for files changed in the last seconds
(coarse timestamps); any write changes ctime, so a changed file is always hashed again. Clients
registering large models need a long read timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from sqlmodel import Session, col

from halos_client.models import ModelCreate, ModelOut
from halos_core.run_dir import tree_sha256
from server.errors import ServiceUnavailable, Unprocessable
from server.models import Model
from server.services.common import get_owned, paginate
from server.services.keys import Principal
from server.settings import Settings, get_settings

VOCAB_FILES = ("vocab.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "merges.txt")
BUSY_RETRY_AFTER_S = 30
HASH_CACHE_SIZE = 256
RACY_WINDOW_S = 2.0  # files changed this recently are not trusted to a cached hash (timestamp granularity)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

_hash_cache: OrderedDict[str, tuple[str, str]] = OrderedDict()  # directory -> (stat manifest digest, tree sha256)
_hash_cache_lock = threading.Lock()


def to_out(model: Model) -> ModelOut:
    return ModelOut(id=model.id, name=model.name, path=model.path, sha256=model.sha256, created_at=model.created_at)


def missing_parts(directory: Path) -> list[str]:
    """What a `from_pretrained` directory lacks (empty list: it looks complete)."""
    missing: list[str] = []
    config = directory / "config.json"
    if not config.is_file():
        missing.append("config.json")
    else:
        try:
            if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
                missing.append("config.json (not a JSON object)")
        except (OSError, ValueError):
            missing.append("config.json (unreadable or not valid JSON)")
    names = {p.name for p in directory.iterdir() if p.is_file()}
    if not any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in names):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    has_tokenizer = "tokenizer.json" in names or (
        "tokenizer_config.json" in names and any(v in names for v in VOCAB_FILES)
    )
    if not has_tokenizer:
        missing.append("tokenizer (tokenizer.json, or tokenizer_config.json with a vocabulary file)")
    return missing


def _within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _not_allowed(raw: str, roots: list[Path], what: str) -> Unprocessable:
    return Unprocessable(
        f"{what} is outside the directories models may be registered from ({', '.join(map(str, roots))}: the"
        " data dir's models folder and HALOS_MODEL_ROOTS)"[:1000],
        code="model_path_not_allowed",
        details={"field": "path", "path": raw, "allowed_roots": [str(r) for r in roots]},
    )


def _stat_manifest(directory: Path, raw: str, settings: Settings, roots: list[Path]) -> tuple[str, bool]:
    """(digest of every file's path/size/mtime/ctime/inode, whether a hash of it may be cached).

    Refuses (422) more than `max_model_files` entries, and a file whose resolved target is outside
    the roots; reads no file's content."""
    lines: list[str] = []
    newest = 0
    for n, file in enumerate(directory.rglob("*"), start=1):  # what tree_sha256 walks
        if n > settings.max_model_files:
            raise Unprocessable(
                f"{raw!r} holds more than {settings.max_model_files} files and directories; a model directory"
                " has a few dozen",
                code="model_too_large",
                details={"field": "path", "path": raw, "max_files": settings.max_model_files},
            )
        if not file.is_file():
            continue
        if not _within(Path(os.path.realpath(file)), roots):
            raise _not_allowed(
                raw, roots, f"{file.relative_to(directory).as_posix()!r} in {raw!r} links to a file that"
            )
        st = file.stat()
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
        lines.append(
            f"{file.relative_to(directory).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
            f"\0{st.st_ino}\0{st.st_dev}"
        )
    digest = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    return digest, newest < (time.time() - RACY_WINDOW_S) * 1e9


def _hash_directory(
    directory: Path, manifest: str, cacheable: bool, settings: Settings, slots: threading.Semaphore | None
) -> str:
    key = str(directory)
    with _hash_cache_lock:
        cached = _hash_cache.get(key)
        if cached is not None and cached[0] == manifest:
            _hash_cache.move_to_end(key)
            return cached[1]
    if slots is not None and not slots.acquire(blocking=False):
        raise ServiceUnavailable(
            f"{settings.max_concurrent_model_hashes} model registration(s) are hashing their directories;"
            f" retry in {BUSY_RETRY_AFTER_S} s",
            code="model_registration_busy",
            details={"retry_after_s": BUSY_RETRY_AFTER_S},
            headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
        )
    try:
        sha256 = tree_sha256(directory)
    finally:
        if slots is not None:
            slots.release()
    if cacheable:
        with _hash_cache_lock:
            _hash_cache[key] = (manifest, sha256)
            _hash_cache.move_to_end(key)
            while len(_hash_cache) > HASH_CACHE_SIZE:
                _hash_cache.popitem(last=False)
    return sha256


def register_model(
    session: Session,
    principal: Principal,
    body: ModelCreate,
    settings: Settings | None = None,
    slots: threading.Semaphore | None = None,
) -> Model:
    """Check, hash and record a model directory. `slots` bounds the registrations hashing at once."""
    settings = settings or get_settings()
    raw = body.path
    if not os.path.isabs(raw):
        raise Unprocessable(
            "model path must be absolute", code="invalid_model_path", details={"field": "path", "path": raw[:4096]}
        )
    roots = [Path(os.path.realpath(r)) for r in settings.allowed_model_roots]
    try:
        directory = Path(os.path.realpath(raw))  # never raises (a symlink loop stays as given; then not a dir)
        if not _within(directory, roots):
            raise _not_allowed(raw, roots, f"{raw!r} (symlinks resolved)")
        if not directory.is_dir():
            raise Unprocessable(
                f"model directory {raw!r} does not exist or is not a directory",
                code="model_dir_not_found",
                details={"field": "path", "path": raw, "missing": ["directory"]},
            )
        manifest, cacheable = _stat_manifest(directory, raw, settings, roots)  # before any file is read
        missing = missing_parts(directory)
        if missing:
            raise Unprocessable(
                f"{raw!r} is not a loadable model directory: missing {', '.join(missing)}",
                code="invalid_model",
                details={"field": "path", "path": raw, "missing": missing},
            )
        sha256 = _hash_directory(directory, manifest, cacheable, settings, slots)
    except (OSError, ValueError) as exc:
        raise Unprocessable(
            f"cannot read model directory {raw!r}: {exc}"[:1000],
            code="model_unreadable",
            details={"field": "path", "path": raw},
        ) from exc
    model = Model(project_id=principal.project_id, name=body.name, path=str(directory), sha256=sha256)
    session.add(model)
    session.commit()
    return model


def weight_module_names(directory: Path) -> set[str] | None:
    """Names of the modules that hold tensors in the directory's `*.safetensors` files, read from
    their headers only (cheap); None when that cannot be told (no safetensors, a header unreadable)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files or len(files) > 1024:
        return None
    names: set[str] = set()
    for file in files:
        try:
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 0 < size <= MAX_SAFETENSORS_HEADER:
                    return None
                header = json.loads(fh.read(size))
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict):
            return None
        names.update(key.rsplit(".", 1)[0] for key in header if key != "__metadata__" and "." in key)
    return names


def lora_target_problem(model_path: str, target_modules: list[str]) -> str | None:
    """Why LoRA adapters on `target_modules` cannot be put on this model (PEFT refuses targets that
    match no module), or None when they can or it cannot be told cheaply."""
    modules = weight_module_names(Path(model_path))
    if not modules:
        return None
    modules.add("lm_head")  # often tied to the embeddings, and then absent from the weights files
    if any(m == t or m.endswith("." + t) for t in target_modules for m in modules):
        return None
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if not m.rsplit(".", 1)[-1].isdigit()})
    return (
        f"LoRA target_modules {target_modules} match no module of the model; its modules with weights are"
        f" named {', '.join(leaves[:40])}{', …' if len(leaves) > 40 else ''}"
    )


def get_model(session: Session, principal: Principal, model_id: str, field: str | None = None) -> Model:
    return get_owned(session, Model, model_id, principal.project_id, "model", field)


def list_models(
    session: Session, principal: Principal, limit: int, cursor: str | None
) -> tuple[list[Model], str | None]:
    return paginate(session, Model, principal.project_id, limit, cursor, col(Model.deleted_at).is_(None))

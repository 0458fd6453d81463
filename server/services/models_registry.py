"""Registered SFT models: a directory loadable by `from_pretrained`, checked and content-hashed.

Registration checks, before hashing anything, that the directory holds a `config.json` (a JSON
object), weights (`*.safetensors` or `pytorch_model*.bin`) and a tokenizer (`tokenizer.json`, or
`tokenizer_config.json` plus a vocabulary file), and answers 422 naming everything missing.
Then `tree_sha256` of the directory is recorded: the reference of every run on this model is
pinned to that hash. Hashing reads the whole directory (seconds per GB), outside any database
transaction.

Not enforced yet: an allow-list of directories a key may register (any key can make the server
read any directory it can read that looks like a model); see the report in the handover.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sqlmodel import Session

from halos_core.run_dir import tree_sha256
from server.errors import Unprocessable
from server.models import Model
from server.schemas import ModelCreate, ModelOut
from server.services.common import get_owned, paginate
from server.services.keys import Principal

VOCAB_FILES = ("vocab.json", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "merges.txt")


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


def register_model(session: Session, principal: Principal, body: ModelCreate) -> Model:
    raw = body.path
    if not os.path.isabs(raw):
        raise Unprocessable(
            "model path must be absolute", code="invalid_model_path", details={"field": "path", "path": raw[:4096]}
        )
    try:
        directory = Path(raw).resolve()
        if not directory.is_dir():
            raise Unprocessable(
                f"model directory {raw!r} does not exist or is not a directory",
                code="model_dir_not_found", details={"field": "path", "path": raw, "missing": ["directory"]},
            )
        missing = missing_parts(directory)
        if missing:
            raise Unprocessable(
                f"{raw!r} is not a loadable model directory: missing {', '.join(missing)}",
                code="invalid_model", details={"field": "path", "path": raw, "missing": missing},
            )
        sha256 = tree_sha256(directory)
    except (OSError, ValueError) as exc:
        raise Unprocessable(
            f"cannot read model directory {raw!r}: {exc}"[:1000], code="model_unreadable",
            details={"field": "path", "path": raw},
        ) from exc
    model = Model(project_id=principal.project_id, name=body.name, path=str(directory), sha256=sha256)
    session.add(model)
    session.commit()
    return model


def get_model(session: Session, principal: Principal, model_id: str, field: str | None = None) -> Model:
    return get_owned(session, Model, model_id, principal.project_id, "model", field)


def list_models(session: Session, principal: Principal, limit: int, cursor: str | None) -> tuple[list[Model], str | None]:
    return paginate(session, Model, principal.project_id, limit, cursor)

"""Prompt sets: validate a staged upload (`halos_core.feedback.prompts`), store it content-addressed,
record it — all or nothing, like feedback files (server/services/feedback.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from halos_client.models import PromptSetOut
from server import storage
from server.errors import Unprocessable
from server.models import PromptSet
from server.services import idempotency
from server.services.common import get_owned, paginate
from server.services.feedback import _record_error
from server.services.keys import Principal
from server.settings import Settings
from server.storage import StagedFile
from server.storage_lifecycle import files

ENDPOINT = "POST /v1/prompts"


def to_out(ps: PromptSet) -> PromptSetOut:
    return PromptSetOut(
        id=ps.id,
        format=ps.format,
        n_prompts=ps.n_prompts,
        n_train=ps.n_train,
        n_test=ps.n_test,
        sha256=ps.sha256,
        size_bytes=ps.size_bytes,
        filename=ps.original_filename,
        findings=ps.findings,
        created_at=ps.created_at,
        deleted_at=ps.deleted_at,
    )


def _validate(staged: StagedFile, settings: Settings, strict: bool) -> tuple[Any, dict[str, Any] | None]:
    from halos_core.feedback import FeedbackLimits, FeedbackValidationError
    from halos_core.feedback.prompts import validate_prompts

    limits = FeedbackLimits(
        max_errors=settings.max_validation_errors,
        max_depth=settings.max_json_depth,
        max_record_bytes=settings.max_record_bytes,
        max_records=settings.max_records_per_file,
    )
    try:
        summary = validate_prompts(staged.path, limits) if staged.size_bytes else None
    except FeedbackValidationError as exc:
        errors = [_record_error(e) for e in exc.errors]
        raise Unprocessable(
            f"{len(errors)} problem(s) in the prompt set; nothing was stored",
            code="invalid_prompts",
            details={"errors": errors, "truncated": bool(exc.truncated), "records_checked": int(exc.records_checked)},
        ) from exc
    if summary is None:
        raise Unprocessable(
            "the prompt file is empty; nothing was stored",
            code="invalid_prompts",
            details={
                "errors": [
                    {
                        "index": 0,
                        "line": None,
                        "field": "",
                        "code": "empty_file",
                        "message": "the file is empty",
                        "hint": None,
                    }
                ],
                "truncated": False,
                "records_checked": 0,
            },
        )
    findings = None
    if summary.string_prompts:
        if strict:
            raise Unprocessable(
                f"{summary.string_prompts} plain-string prompt(s) (strict=true); nothing was stored",
                code="invalid_prompts",
                details={
                    "errors": [_record_error(e) for e in summary.examples],
                    "truncated": summary.string_prompts > len(summary.examples),
                    "records_checked": None,
                },
            )
        findings = {
            "counts": {"string_prompt": summary.string_prompts},
            "examples": [e.model_dump() for e in summary.examples],
        }
    return summary, findings


def ingest(
    session: Session,
    settings: Settings,
    principal: Principal,
    staged: StagedFile,
    idempotency_key: str | None,
    strict: bool = False,
) -> tuple[PromptSet, bool]:
    """Validate and store a staged prompt file. Returns (prompt set, replayed); consumes `staged`."""
    try:
        req_hash = idempotency.request_hash(ENDPOINT, staged.sha256, staged.filename, strict)
        for _ in range(3):
            if idempotency_key is not None:
                record = idempotency.lookup(
                    session, principal.project_id, ENDPOINT, idempotency_key, req_hash, settings.idempotency_ttl_hours
                )
                if record is not None:
                    ps = get_owned(session, PromptSet, record.resource_id or "", principal.project_id, "prompt_set")
                    session.commit()
                    return ps, True
                session.commit()
            summary, findings = _validate(staged, settings, strict)
            ps = PromptSet(
                project_id=principal.project_id,
                format=summary.format,
                sha256=staged.sha256,
                size_bytes=staged.size_bytes,
                n_prompts=summary.n_prompts,
                n_train=summary.n_train,
                n_test=summary.n_test,
                storage_path=storage.blob_relpath(staged.sha256, staged.ext),
                original_filename=staged.filename,
                findings=findings,
            )
            session.add(ps)
            if idempotency_key is not None:
                idempotency.remember(session, principal.project_id, ENDPOINT, idempotency_key, req_hash, ps.id, 201)
            try:
                session.flush()
            except IntegrityError:
                session.rollback()
                continue
            # held to the commit: see feedback.ingest (a removal cannot unlink the blob this row adopts)
            files.lock_blob(session, ps.storage_path)
            rel, created = storage.publish_blob(staged, settings.data_dir)
            try:
                session.commit()
            except BaseException:
                session.rollback()
                if created:
                    files.remove_blob_if_unused(session, settings.data_dir, rel)
                raise
            return ps, False
        raise RuntimeError("could not store the prompt set after 3 attempts")
    finally:
        staged.discard()


def get_prompt_set(session: Session, principal: Principal, prompt_set_id: str, field: str | None = None) -> PromptSet:
    return get_owned(session, PromptSet, prompt_set_id, principal.project_id, "prompt_set", field)


def list_prompt_sets(
    session: Session, principal: Principal, limit: int, cursor: str | None
) -> tuple[list[PromptSet], str | None]:
    return paginate(session, PromptSet, principal.project_id, limit, cursor)

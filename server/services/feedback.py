"""Feedback files: validate a staged upload, store it content-addressed, record it (all or nothing).

`ingest` is called with an upload already streamed to a temp file (`server.storage`). Either the
file is valid and ends up as a blob under `feedback/<sha256>.<ext>` plus one `FeedbackFile` row
(and the idempotency record, in the same transaction), or nothing at all remains: the temp
file is removed on every failure path and no row is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from halos_client.event_models import EventType
from halos_client.models import FeedbackOut
from server import events, storage
from server.errors import Unprocessable
from server.models import FeedbackFile
from server.services import idempotency
from server.services.common import get_owned, paginate
from server.services.keys import Principal
from server.services.validation_pool import Pipeline, ValidationPool
from server.settings import Settings
from server.storage import StagedFile
from server.storage_lifecycle import files

if TYPE_CHECKING:
    from halos_core.feedback.quality import Findings

log = logging.getLogger("halos.feedback")

ENDPOINT = "POST /v1/feedback"


@dataclass
class Ingested:
    feedback: FeedbackFile
    replayed: bool  # True: an Idempotency-Key replay, nothing new was stored


def to_out(fb: FeedbackFile) -> FeedbackOut:
    return FeedbackOut(
        id=fb.id,
        kind=fb.kind,
        format=fb.format,
        n_records=fb.n_records,
        n_prompts=fb.n_prompts,
        n_train=fb.n_train,
        n_test=fb.n_test,
        sha256=fb.sha256,
        size_bytes=fb.size_bytes,
        filename=fb.original_filename,
        source=fb.source,
        job_id=fb.job_id,
        provenance=fb.provenance,
        findings=fb.findings,
        created_at=fb.created_at,
        deleted_at=fb.deleted_at,
    )


def _record_error(err: Any) -> dict[str, Any]:
    return {
        "index": getattr(err, "index", None),
        "line": getattr(err, "line", None),
        "field": getattr(err, "field", ""),
        "code": getattr(err, "code", "invalid"),
        "message": str(getattr(err, "message", err)),
        "hint": getattr(err, "hint", None),
    }


def feedback_limits(settings: Settings) -> Any:
    from halos_core.feedback import FeedbackLimits

    return FeedbackLimits(
        max_errors=settings.max_validation_errors,
        max_depth=settings.max_json_depth,
        max_record_bytes=settings.max_record_bytes,
        max_records=settings.max_records_per_file,
    )


def check_staged(
    staged: StagedFile, settings: Settings, pool: ValidationPool | None = None, pipeline: Pipeline | None = None
) -> tuple[Any, Findings]:
    """Validate the temp file and find its data-quality findings (in `pool`'s worker processes when
    given — with what `pipeline` started while the file arrived —, else in this thread: a pass over
    the whole file must not hold the API's interpreter); 422 `invalid_feedback` listing every bad
    record (capped at `max_validation_errors`) when it is not a valid feedback file."""
    from halos_core.feedback import FeedbackValidationError
    from halos_core.feedback.quality import check

    if staged.size_bytes == 0:
        raise Unprocessable(
            "the feedback file is empty; nothing was stored",
            code="invalid_feedback",
            details={
                "errors": [
                    {
                        "index": 0,
                        "line": None,
                        "field": "",
                        "code": "empty_file",
                        "message": "the file is empty",
                        "hint": "upload a JSON array or JSONL records",
                    }
                ],
                "truncated": False,
                "records_checked": 0,
            },
        )
    limits = feedback_limits(settings)
    try:
        if pool is not None:
            return pool.check(staged.path, limits, pipeline)
        return check(staged.path, limits)
    except FeedbackValidationError as exc:
        errors = [_record_error(e) for e in exc.errors]
        more = " (more not shown)" if exc.truncated else ""
        raise Unprocessable(
            f"{len(errors)} problem(s) in the feedback file{more}; nothing was stored",
            code="invalid_feedback",
            details={"errors": errors, "truncated": bool(exc.truncated), "records_checked": int(exc.records_checked)},
        ) from exc


def quality_findings(found: Findings, strict: bool) -> dict[str, Any] | None:
    """Data-quality warnings of a valid file (halos_core.feedback.quality); `strict`: refuse the file
    with the record-level 422 report instead (nothing stored)."""
    if not found.total:
        return None
    if strict:
        errors = [_record_error(e) for e in found.examples]
        raise Unprocessable(
            f"{found.total} data-quality problem(s) in the feedback file (strict=true); nothing was stored",
            code="invalid_feedback",
            details={
                "errors": errors,
                "truncated": found.total > len(errors),
                "records_checked": None,
                "counts": found.counts,
            },
        )
    return found.to_json()


def _replay(session: Session, record: Any, project_id: str) -> FeedbackFile:
    fb = session.get(FeedbackFile, record.resource_id)
    if fb is None or fb.project_id != project_id:  # cannot happen: written in one transaction
        raise RuntimeError(f"idempotency record {record.id} points at a missing feedback file")
    return fb


def ingest(
    session: Session,
    settings: Settings,
    principal: Principal,
    staged: StagedFile,
    idempotency_key: str | None,
    strict: bool = False,
    source: str = "upload",
    provenance: dict[str, Any] | None = None,
    pool: ValidationPool | None = None,
    pipeline: Pipeline | None = None,
) -> Ingested:
    """Validate and store a staged upload. Consumes `staged` (its temp file is gone afterwards)."""
    data_dir = settings.data_dir
    try:
        extra = ("strict",) if strict else ()  # (the hash of a plain upload is unchanged)
        req_hash = idempotency.request_hash(
            ENDPOINT if source == "upload" else f"{ENDPOINT} ({source})", staged.sha256, staged.filename, *extra
        )
        if idempotency_key is not None:  # cheap early replay: skip validation entirely
            record = idempotency.lookup(
                session, principal.project_id, ENDPOINT, idempotency_key, req_hash, settings.idempotency_ttl_hours
            )
            fb = _replay(session, record, principal.project_id) if record else None
            session.commit()
            if fb is not None:
                return Ingested(fb, replayed=True)

        summary, found = check_staged(staged, settings, pool, pipeline)  # no transaction is open while this runs
        findings = quality_findings(found, strict)

        for _ in range(3):
            if idempotency_key is not None:
                record = idempotency.lookup(
                    session, principal.project_id, ENDPOINT, idempotency_key, req_hash, settings.idempotency_ttl_hours
                )
                if record is not None:
                    fb = _replay(session, record, principal.project_id)
                    session.commit()
                    return Ingested(fb, replayed=True)
            fb = FeedbackFile(
                project_id=principal.project_id,
                kind=summary.kind,
                format=summary.format,
                sha256=staged.sha256,
                size_bytes=staged.size_bytes,
                n_records=summary.n_records,
                n_prompts=summary.n_prompts,
                n_train=summary.n_train,
                n_test=summary.n_test,
                storage_path=storage.blob_relpath(staged.sha256, staged.ext),
                original_filename=staged.filename,
                source=source,
                provenance=provenance,
                findings=findings,
            )
            session.add(fb)
            if idempotency_key is not None:
                idempotency.remember(session, principal.project_id, ENDPOINT, idempotency_key, req_hash, fb.id, 201)
            try:
                session.flush()  # a concurrent duplicate key fails here, before the blob is published
            except IntegrityError:
                session.rollback()
                continue  # re-read the winner's record
            events.emit(
                session,
                principal.project_id,
                EventType.feedback_stored,
                subject_id=fb.id,
                data={
                    "feedback_id": fb.id,
                    "kind": fb.kind,
                    "format": fb.format,
                    "sha256": fb.sha256,
                    "n_records": fb.n_records,
                    "n_train": fb.n_train,
                    "n_test": fb.n_test,
                },
            )
            # held to the commit: a removal of this blob (a deleted identical file's) cannot unlink
            # it between the publish (which keeps an existing blob) and the commit of this row
            files.lock_blob(session, fb.storage_path)
            rel, created = storage.publish_blob(staged, data_dir)
            try:
                session.commit()
            except BaseException:
                session.rollback()
                if created:
                    files.remove_blob_if_unused(session, data_dir, rel)
                raise
            return Ingested(fb, replayed=False)
        raise RuntimeError("could not store the feedback file after 3 attempts")
    finally:
        staged.discard()  # no-op once published


def get_feedback(session: Session, principal: Principal, feedback_id: str) -> FeedbackFile:
    return get_owned(session, FeedbackFile, feedback_id, principal.project_id, "feedback")


def list_feedback(
    session: Session, principal: Principal, limit: int, cursor: str | None
) -> tuple[list[FeedbackFile], str | None]:
    return paginate(session, FeedbackFile, principal.project_id, limit, cursor)


def content_path(settings: Settings, fb: FeedbackFile) -> Any:
    """Where the stored bytes are (a relative storage path is under the data dir; a generated
    artefact's is the absolute path in its job's run directory)."""
    return settings.data_dir / fb.storage_path

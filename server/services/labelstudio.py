"""Label Studio hand-off: a samples file as tasks, and Label Studio's JSON export as feedback
(`halos_core.feedback.labelstudio` does the mapping; webhooks: server/services/integrations.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import cast

from sqlmodel import Session

from halos_core.feedback import SampledRecord, read_records
from halos_core.feedback.labelstudio import records_from_export, tasks_from_samples
from server.errors import Unprocessable
from server.models import FeedbackFile
from server.services import feedback as feedback_service
from server.services.feedback import Ingested, _record_error
from server.services.integrations import stage_bytes
from server.services.keys import Principal
from server.settings import Settings
from server.storage import StagedFile


def tasks_json(settings: Settings, fb: FeedbackFile, config: str) -> Iterator[bytes]:
    """A JSON array of Label Studio tasks for a samples file, streamed."""
    if fb.kind != "sampled":
        raise Unprocessable(
            f"feedback {fb.id} is {fb.kind} feedback; Label Studio tasks are made from samples",
            code="not_samples",
            details={"field": "feedback_id", "kind": fb.kind},
        )
    path = feedback_service.content_path(settings, fb)

    def generate() -> Iterator[bytes]:
        yield b"["
        samples = cast(Iterator[SampledRecord], read_records(path))  # a samples file (its kind checked above)
        for i, task in enumerate(tasks_from_samples(samples, config)):
            yield (b"," if i else b"") + json.dumps(task, ensure_ascii=False).encode()
        yield b"]"

    return generate()


def import_export(
    session: Session, settings: Settings, principal: Principal, staged: StagedFile, idempotency_key: str | None
) -> Ingested:
    """Label Studio's JSON export → a pairwise (Pairwise config) or scalar (Rating config) feedback
    file. Every bad task/annotation is reported in one 422 `invalid_feedback`; nothing is stored."""
    try:
        try:
            tasks = json.loads(staged.path.read_bytes())
        except ValueError as exc:
            raise Unprocessable(
                f"not a JSON document: {exc}"[:300],
                code="invalid_feedback",
                details={
                    "errors": [
                        {
                            "index": 0,
                            "line": None,
                            "field": "",
                            "code": "invalid_json",
                            "message": str(exc)[:300],
                            "hint": "export the project as JSON",
                        }
                    ],
                    "truncated": False,
                    "records_checked": 0,
                },
            ) from exc
        records, errors = records_from_export(tasks)
        if errors or not records:
            shown = [_record_error(e) for e in errors[: settings.max_validation_errors]]
            if not errors:
                shown = [
                    {
                        "index": 0,
                        "line": None,
                        "field": "annotations",
                        "code": "empty_file",
                        "message": "the export holds no annotations",
                        "hint": "annotate some tasks first",
                    }
                ]
            raise Unprocessable(
                f"{len(errors) or 1} problem(s) in the Label Studio export; nothing was stored",
                code="invalid_feedback",
                details={
                    "errors": shown,
                    "truncated": len(errors) > len(shown),
                    "records_checked": len(tasks) if isinstance(tasks, list) else 0,
                },
            )
        kinds = {r["type"] for r in records}
        if len(kinds) > 1:
            raise Unprocessable(
                "the export mixes pairwise and rating annotations; export one project per config",
                code="invalid_feedback",
                details={"errors": [], "truncated": False, "records_checked": len(tasks)},
            )
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    finally:
        staged.discard()
    converted = stage_bytes(settings, body)
    return feedback_service.ingest(
        session,
        settings,
        principal,
        converted,
        idempotency_key,
        source="label_studio",
        provenance={"tool": "label_studio", "tasks": len(tasks), "annotations": len(records)},
    )

"""The job spec of a new round: the run's pinned SFT model, the parent checkpoint to continue from
(if any), the stored feedback files and the round's effective loss / conversion / hyperparameters /
LoRA (`halos_core.job_spec.JobSpec`, the one definition the worker and trainer read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from halos_core.config import Hyperparams, LoraSettings
from halos_core.gate import GateRule
from halos_core.job_spec import Counters, FeedbackInput, JobSpec
from server.errors import Unprocessable, validation_details
from server.models import Checkpoint, FeedbackFile, Model


def round_spec(
    *,
    model: Model,
    parent: Checkpoint | None,
    files: list[FeedbackFile],
    data_dir: Path,
    loss: Any,
    hyperparams: Hyperparams,
    conversion: Any,
    lora: LoraSettings | None,
    gate: list[GateRule] | None = None,
) -> JobSpec:
    try:
        return JobSpec(
            reference_path=model.path,
            reference_sha256=model.sha256,
            init_from=parent.path if parent else None,
            init_from_checkpoint_id=parent.id if parent else None,
            counters=Counters(step=parent.step, examples=parent.examples) if parent else Counters(),
            feedback=[FeedbackInput(path=str(data_dir / f.storage_path), kind=f.kind, file_id=f.id) for f in files],
            loss=loss,
            conversion=conversion,
            hyperparams=hyperparams,
            lora=lora,
            gate=gate or None,
        )
    except ValidationError as exc:
        raise Unprocessable(
            "the round's configuration is invalid",
            code="invalid_round_config",
            details=validation_details(exc.errors()),
        ) from exc

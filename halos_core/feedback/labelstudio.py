"""Label Studio round trip (torch-free): samples → tasks, annotations → HALOs feedback records.

Two labelling configs ship with the server (`CONFIGS`, also `GET /v1/labelstudio/configs/{name}`):

- `pairwise`: the prompt and two answers; the annotator picks one (`<Pairwise>`, result value
  `{"selected": "left" | "right"}`) → a `pairwise_feedback` record, label 1 when the left answer
  (`answer1`, output_A) won;
- `rating`: the prompt and one answer rated 1-5 stars (`<Rating>`, `{"rating": k}`) → a
  `scalar_feedback` record with reward = the rating.

A task carries our ids in `data.halos` (prompt id, sample ids, split, the prompt's turns and the
outputs' turns), so an annotation maps back to exactly what was sampled, whatever Label Studio
shows. `records_from_export` reads Label Studio's JSON export (a list of tasks with their
`annotations`); the webhook payloads (ANNOTATION_CREATED / UPDATED: `task` + `annotation`) go
through `record_from_annotation`. Problems are `RecordError`s (index = the task's position in the
export), so a malformed export gets the same record-level 422 report as a feedback file.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from .records import RecordError, SampledRecord

PAIRWISE_CONFIG = """<View>
  <Header value="Which answer is better?"/>
  <Text name="prompt" value="$prompt"/>
  <Text name="answer1" value="$answer1"/>
  <Text name="answer2" value="$answer2"/>
  <Pairwise name="comparison" toName="answer1,answer2" leftChoiceValue="left" rightChoiceValue="right"/>
</View>
"""

RATING_CONFIG = """<View>
  <Header value="Rate the answer"/>
  <Text name="prompt" value="$prompt"/>
  <Text name="answer" value="$answer"/>
  <Rating name="rating" toName="answer" maxRating="5" icon="star" required="true"/>
</View>
"""

CONFIGS = {"pairwise": PAIRWISE_CONFIG, "rating": RATING_CONFIG}


def _text(turns: Iterable[Any]) -> str:
    """What the annotator sees: the turns, one per paragraph (a single user turn is just its text)."""
    items = list(turns)
    if len(items) == 1:
        return items[0].content
    return "\n\n".join(f"[{t.role}] {t.content}" for t in items)


def _dump(turns: Iterable[Any]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


def tasks_from_samples(samples: Iterable[SampledRecord], config: str) -> Iterator[dict[str, Any]]:
    """Label Studio tasks (`{"data": ...}`) for a samples file, in file order.

    pairwise: per prompt, its samples in consecutive pairs (0 vs 1, 2 vs 3, ...; an odd one out is
    left); rating: one task per sample."""
    if config not in CONFIGS:
        raise ValueError(f"unknown Label Studio config {config!r} ({', '.join(CONFIGS)})")
    if config == "rating":
        for s in samples:
            yield {
                "data": {
                    "prompt": _text(s.prompt),
                    "answer": _text(s.output),
                    "halos": {
                        "config": "rating",
                        "prompt_id": s.prompt_id,
                        "sample_id": s.sample_id,
                        "split": s.split,
                        "prompt": _dump(s.prompt),
                        "output": _dump(s.output),
                    },
                }
            }
        return
    for prompt_id, group in itertools.groupby(samples, key=lambda s: s.prompt_id):
        items = list(group)
        for a, b in zip(items[0::2], items[1::2]):
            yield {
                "data": {
                    "prompt": _text(a.prompt),
                    "answer1": _text(a.output),
                    "answer2": _text(b.output),
                    "halos": {
                        "config": "pairwise",
                        "prompt_id": prompt_id,
                        "sample_ids": [a.sample_id, b.sample_id],
                        "split": a.split,
                        "prompt": _dump(a.prompt),
                        "output_A": _dump(a.output),
                        "output_B": _dump(b.output),
                    },
                }
            }


class AnnotationProblem(ValueError):
    def __init__(self, field: str, code: str, message: str, hint: str):
        super().__init__(message)
        self.field, self.code, self.message, self.hint = field, code, message, hint


def _halos_data(task: Any) -> dict[str, Any]:
    data = task.get("data") if isinstance(task, dict) else None
    halos = data.get("halos") if isinstance(data, dict) else None
    if not isinstance(halos, dict) or halos.get("config") not in CONFIGS:
        raise AnnotationProblem(
            "data.halos",
            "not_a_halos_task",
            "the task was not exported by this server (data.halos is missing)",
            "import tasks from GET /v1/feedback/{id}/labelstudio-tasks",
        )
    return halos


def _choice(result: list[Any], kind: str) -> Any:
    for item in result:
        if isinstance(item, dict) and item.get("type") == kind and isinstance(item.get("value"), dict):
            return item["value"]
    raise AnnotationProblem(
        "annotations.result",
        "missing_choice",
        f"the annotation has no {kind} result",
        f"use the shipped {'pairwise' if kind == 'pairwise' else 'rating'} labelling config",
    )


def record_from_annotation(task: Any, annotation: Any) -> dict[str, Any] | None:
    """The HALOs feedback record one annotation gives (None: a skipped / cancelled annotation).
    Raises AnnotationProblem when it cannot be read."""
    halos = _halos_data(task)
    if not isinstance(annotation, dict):
        raise AnnotationProblem("annotations", "wrong_type", "an annotation must be an object", "")
    if annotation.get("was_cancelled"):
        return None
    result = annotation.get("result")
    if not isinstance(result, list):
        raise AnnotationProblem("annotations.result", "wrong_type", "annotation.result must be a list", "")
    base = {
        "prompt_id": str(halos.get("prompt_id")),
        "prompt": halos.get("prompt"),
        "split": halos.get("split", "train"),
    }
    if halos["config"] == "pairwise":
        selected = _choice(result, "pairwise").get("selected")
        if selected not in ("left", "right"):
            raise AnnotationProblem(
                "annotations.result.value.selected",
                "invalid_label",
                f"selected must be 'left' or 'right', got {str(selected)[:40]!r}",
                "",
            )
        return {
            "type": "pairwise_feedback",
            **base,
            "output_A": halos.get("output_A"),
            "output_B": halos.get("output_B"),
            "label": 1 if selected == "left" else 0,
        }
    rating = _choice(result, "rating").get("rating")
    if isinstance(rating, bool) or not isinstance(rating, (int, float)):
        raise AnnotationProblem(
            "annotations.result.value.rating",
            "invalid_reward",
            f"rating must be a number, got {type(rating).__name__}",
            "",
        )
    return {"type": "scalar_feedback", **base, "output": halos.get("output"), "reward": float(rating)}


def records_from_export(tasks: Any) -> tuple[list[dict[str, Any]], list[RecordError]]:
    """HALOs records from Label Studio's JSON export: one per (non-cancelled) annotation; and the
    problems, one per bad task or annotation."""
    if not isinstance(tasks, list):
        return [], [
            RecordError(
                index=0,
                line=None,
                field="",
                code="wrong_type",
                message="a Label Studio JSON export is a list of tasks",
                hint="export the project as JSON (not JSON-MIN, CSV or TSV)",
            )
        ]
    records: list[dict[str, Any]] = []
    errors: list[RecordError] = []
    for i, task in enumerate(tasks):
        annotations = task.get("annotations") if isinstance(task, dict) else None
        if not isinstance(annotations, list):
            errors.append(
                RecordError(
                    index=i,
                    line=None,
                    field="annotations",
                    code="missing_field",
                    message="the task has no annotations list",
                    hint="export with annotations",
                )
            )
            continue
        for j, annotation in enumerate(annotations):
            try:
                record = record_from_annotation(task, annotation)
            except AnnotationProblem as exc:
                errors.append(
                    RecordError(
                        index=i,
                        line=None,
                        field=exc.field.replace("annotations", f"annotations[{j}]"),
                        code=exc.code,
                        message=exc.message,
                        hint=exc.hint or None,
                    )
                )
                continue
            if record is not None:
                records.append(record)
    return records, errors

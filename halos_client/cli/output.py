"""How the client commands print what the API returned: `-o table` for people, `-o json` for scripts.

JSON (stdout, UTF-8, 2-space indent, keys in the API's order): one object prints as the API's
JSON object, exactly the schema in the server's OpenAPI spec (`/openapi.json`; e.g. `JobOut`);
a list prints as a JSON array of those objects, all pages. Fields are only ever added, never
renamed, within `/v1`. Tables are for reading and may change.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from halos_client import models as m


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


# Ids are never folded across lines (a table piped to grep must still find them).
ID_COLUMNS = frozenset({"id", "job", "run", "model", "checkpoint", "parent", "feedback"})
PIPED_WIDTH = 250  # rich's default for a non-terminal is 80 columns, which folds every table


def stdout_console() -> Console:
    console = Console(soft_wrap=True)
    return console if console.is_terminal else Console(soft_wrap=True, width=PIPED_WIDTH)


def emit(value: BaseModel | Sequence[BaseModel] | Iterable[BaseModel], output: OutputFormat) -> None:
    """Print one API object or a list of them (an iterator is drained: every page)."""
    if output is OutputFormat.json:
        if isinstance(value, BaseModel):
            data: Any = value.model_dump(mode="json")
        else:
            data = [item.model_dump(mode="json") for item in value]
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    console = stdout_console()
    if isinstance(value, BaseModel):
        for renderable in _object_tables(value):
            console.print(renderable)
    else:
        items = list(value)
        console.print(_list_table(items) if items else "(none)")


# --------------------------------------------------------------------------- cells


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=_jsonable)
    if isinstance(value, float):
        return number(value, 6)
    return str(value)


def _jsonable(value: Any) -> Any:
    """Nested API objects (e.g. a run's head moves) inside a table cell."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _steps(job: m.JobOut) -> str:
    total = job.progress.total_steps
    return f"{job.progress.round_step}/{total}" if total else str(job.progress.round_step)


def _metric(job: m.JobOut, key: str) -> str:
    return number((job.latest_metrics or {}).get(key))


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    line = text.strip().splitlines()[-1] if text.strip() else text
    return line if len(line) <= width else line[: width - 1] + "…"


# --------------------------------------------------------------------------- columns per type

Column = tuple[str, Callable[[Any], Any]]

COLUMNS: dict[type[BaseModel], list[Column]] = {
    m.ModelOut: [
        ("id", lambda o: o.id),
        ("name", lambda o: o.name),
        ("sha256", lambda o: o.sha256[:12]),
        ("path", lambda o: o.path),
        ("created", lambda o: o.created_at),
    ],
    m.FeedbackOut: [
        ("id", lambda o: o.id),
        ("kind", lambda o: o.kind),
        ("format", lambda o: o.format),
        ("records", lambda o: o.n_records),
        ("train", lambda o: o.n_train),
        ("test", lambda o: o.n_test),
        ("filename", lambda o: o.filename),
        ("created", lambda o: o.created_at),
    ],
    m.RunSummary: [
        ("id", lambda o: o.id),
        ("name", lambda o: o.name),
        ("model", lambda o: o.model_id),
        ("loss", lambda o: o.loss.get("name")),
        ("created", lambda o: o.created_at),
    ],
    m.RoundOut: [
        ("round", lambda o: o.index),
        ("job", lambda o: o.job_id),
        ("status", lambda o: o.status),
        ("loss", lambda o: o.loss.get("name")),
        ("feedback", lambda o: ", ".join(o.feedback_ids)),
        ("parent", lambda o: o.parent_checkpoint_id),
        ("checkpoint", lambda o: o.checkpoint_id),
    ],
    m.JobOut: [
        ("id", lambda o: o.id),
        ("status", lambda o: o.status),
        ("run", lambda o: o.run_id),
        ("round", lambda o: o.round_index),
        ("step", _steps),
        ("%", lambda o: "-" if o.percent_done is None else f"{o.percent_done:.0f}"),
        ("loss", lambda o: _metric(o, "loss")),
        ("reward acc", lambda o: _metric(o, "rewards/accuracy")),
        ("elapsed", lambda o: duration(o.elapsed_s)),
        ("eta", lambda o: duration(o.eta_s)),
        ("attempt", lambda o: f"{o.attempt}/{o.max_attempts}"),
        ("error", lambda o: _short(o.error)),
    ],
    m.MetricPointOut: [
        ("step", lambda o: o.step),
        ("split", lambda o: o.split),
        ("attempt", lambda o: o.attempt),
        ("loss", lambda o: number(o.data.get("loss"))),
        ("reward acc", lambda o: number(o.data.get("rewards/accuracy"))),
        ("margin", lambda o: number(o.data.get("rewards/margin"))),
        ("lr", lambda o: number(o.data.get("lr"))),
        ("tokens/s", lambda o: number(o.data.get("tokens_per_s"), 5)),
    ],
    m.LossInfo: [
        ("name", lambda o: o.name),
        ("data", lambda o: o.data),
        ("reference", lambda o: "yes" if o.needs_reference else "no"),
        ("head", lambda o: o.head),
        (
            "parameters",
            lambda o: ", ".join(
                f"{k}={v.get('default')}" for k, v in o.parameters.get("properties", {}).items() if k != "name"
            ),
        ),
        ("what", lambda o: o.summary),
    ],
    m.LineageItem: [
        ("checkpoint", lambda o: o.checkpoint_id),
        ("round", lambda o: o.round_index),
        ("job", lambda o: o.job_id),
        ("step", lambda o: o.step),
        ("examples", lambda o: o.examples),
        ("loss", lambda o: (o.loss or {}).get("name")),
        ("feedback", lambda o: ", ".join(o.feedback_ids)),
    ],
}


def _list_table(items: Sequence[BaseModel]) -> Table:
    columns = COLUMNS.get(type(items[0]))
    if columns is None:  # a type without a column set: every top-level field
        names = list(type(items[0]).model_fields)
        columns = [(n, _attribute(n)) for n in names]
    table = Table(show_edge=False, pad_edge=False)
    for header, _ in columns:
        table.add_column(header, no_wrap=header in ID_COLUMNS, overflow="fold")
    for item in items:
        table.add_row(*(_cell(get(item)) for _, get in columns))
    return table


def _attribute(name: str) -> Callable[[Any], Any]:
    return lambda o: getattr(o, name)


def _fields_table(obj: BaseModel, skip: tuple[str, ...] = ()) -> Table:
    table = Table(show_header=False, show_edge=False, pad_edge=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name in type(obj).model_fields:
        if name in skip:
            continue
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        table.add_row(name, _cell(value))
    return table


def _object_tables(obj: BaseModel) -> list[Any]:
    if isinstance(obj, m.RunOut):
        return [_fields_table(obj, skip=("rounds",)), _list_table(obj.rounds) if obj.rounds else "(no rounds yet)"]
    if isinstance(obj, m.LineageOut):
        root = obj.model
        return [_list_table(obj.items), f"SFT model {root.id} '{root.name}' sha256 {root.sha256[:12]}… ({root.path})"]
    if isinstance(obj, m.JobOut):
        job_table = _fields_table(obj, skip=("progress", "latest_metrics"))
        job_table.add_row("step", _steps(obj) + f" (cumulative {obj.progress.step}, examples {obj.progress.examples})")
        for key, value in (obj.latest_metrics or {}).items():
            job_table.add_row(f"  {key}", _cell(value))
        return [job_table]
    return [_fields_table(obj)]

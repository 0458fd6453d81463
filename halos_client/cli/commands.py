"""The client commands of `halos` (typer): thin wrappers over `halos_client.Client`.

    halos feedback push FILE | get ID | list
    halos models register PATH [--name N] | get ID | list
    halos runs create --model ID --loss dpo [--hp lr=5e-4 ...] | get ID | list
    halos rounds create RUN --feedback ID|FILE ... [--wait] | list RUN
    halos jobs list [--status S] | get ID | logs ID [-f] | cancel ID | wait ID | metrics ID
    halos checkpoints get ID | lineage ID

Every command takes `--base-url` (HALOS_BASE_URL) and `--api-key` (HALOS_API_KEY), and every
command that prints an API object takes `-o table|json` (see `output.py` for the JSON shape).
Results go to stdout; progress, retries and errors to stderr; exit codes in `failures.py`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Annotated, Any

import typer

from halos_client import models as m
from halos_client.bodies import UNSET
from halos_client.cli.failures import exits_on_failure, stderr
from halos_client.cli.output import OutputFormat, emit
from halos_client.cli.progress import JobProgress
from halos_client.client import Client
from halos_client.errors import JobFailed

# --------------------------------------------------------------------------- shared options

BaseUrl = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        envvar="HALOS_BASE_URL",
        show_default=False,
        rich_help_panel="Connection",
        help="server root URL [default: http://127.0.0.1:8000]",
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="HALOS_API_KEY",
        show_default=False,
        rich_help_panel="Connection",
        help="API key (prefer HALOS_API_KEY: command lines are visible to other users)",
    ),
]
Output = Annotated[OutputFormat, typer.Option("--output", "-o", help="table for people, json for scripts")]
Limit = Annotated[int | None, typer.Option("--limit", min=1, help="at most this many (default: all pages)")]
Wait = Annotated[bool, typer.Option("--wait", help="wait for the job; progress on stderr; exit 1 if it fails")]
Timeout = Annotated[
    float | None,
    typer.Option("--timeout", min=0, help="with --wait: give up after this many seconds (exit 5; the job goes on)"),
]
PollInterval = Annotated[float, typer.Option("--poll-interval", min=0.1, help="seconds between status polls")]
IdempotencyKey = Annotated[
    str | None,
    typer.Option(
        "--idempotency-key",
        help="reuse a key to make a re-run of this command return the same object "
        "[default: a new key per command, reused across its own retries]",
    ),
]
HyperparamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--hp",
        metavar="KEY=VALUE",
        help="a hyperparameter (repeatable); VALUE is JSON, else a string: --hp lr=5e-4 --hp batch_size=8",
    ),
]


def _log_retries() -> None:
    """Retries and waits of the client are worth seeing on a terminal: they explain a pause."""
    logger = logging.getLogger("halos_client")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("halos: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("HALOS_CLIENT_LOG_LEVEL", "INFO").upper())
        logger.propagate = False


@contextmanager
def connect(base_url: str | None, api_key: str | None) -> Iterator[Client]:
    _log_retries()
    with exits_on_failure(), Client(base_url, api_key) as client:
        yield client


def _json_option(value: str | None, option: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None


def _loss(value: str | None) -> Any:
    """`dpo` (a loss name, its default parameters) or a JSON object `{"name": "dpo", "beta": 0.2}`."""
    if value is None:
        return None
    return _json_option(value, "--loss") if value.lstrip().startswith("{") else value


def _hyperparams(pairs: list[str] | None) -> dict[str, Any] | None:
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--hp")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _take(items: Iterator[Any], limit: int | None) -> list[Any]:
    return list(items if limit is None else islice(items, limit))


# --------------------------------------------------------------------------- feedback

feedback_app = typer.Typer(help="Feedback files: upload, inspect.", no_args_is_help=True)


@feedback_app.command("push")
def feedback_push(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="the feedback file")],
    idempotency_key: IdempotencyKey = None,
    output: Output = OutputFormat.table,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Upload a feedback file (HALOs JSON/JSONL, TRL, OpenAI preference JSONL). A bad file is
    refused whole; every bad record is listed (line, field, code, hint) and the exit code is 3."""
    with connect(base_url, api_key) as client:
        emit(client.feedback.upload(file, idempotency_key=idempotency_key), output)


@feedback_app.command("get")
def feedback_get(
    feedback_id: str, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """One feedback file's metadata."""
    with connect(base_url, api_key) as client:
        emit(client.feedback.get(feedback_id), output)


@feedback_app.command("list")
def feedback_list(
    limit: Limit = None, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """Feedback files, newest first."""
    with connect(base_url, api_key) as client:
        emit(_take(client.feedback.list(), limit), output)


# --------------------------------------------------------------------------- models

models_app = typer.Typer(help="SFT models: register, inspect.", no_args_is_help=True)


@models_app.command("register")
def models_register(
    path: Annotated[
        str,
        typer.Argument(
            help="the model directory as the SERVER sees it; a relative path is made "
            "absolute here (for a server on this machine)"
        ),
    ],
    name: Annotated[str | None, typer.Option("--name", help="default: the directory's name")] = None,
    output: Output = OutputFormat.table,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Register an SFT model directory (config, weights, tokenizer). The server hashes it: seconds per GB."""
    absolute = path if path.startswith("/") else os.path.abspath(path)
    with connect(base_url, api_key) as client:
        emit(client.models.register(name or Path(absolute).name, absolute), output)


@models_app.command("get")
def models_get(
    model_id: str, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """One registered model."""
    with connect(base_url, api_key) as client:
        emit(client.models.get(model_id), output)


@models_app.command("list")
def models_list(
    limit: Limit = None, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """Registered models, newest first."""
    with connect(base_url, api_key) as client:
        emit(_take(client.models.list(), limit), output)


# --------------------------------------------------------------------------- runs

runs_app = typer.Typer(help="Runs: a lineage of rounds on one pinned SFT reference.", no_args_is_help=True)


@runs_app.command("create")
def runs_create(
    model: Annotated[str, typer.Option("--model", help="the registered model's id (mdl_…)")],
    loss: Annotated[
        str, typer.Option("--loss", help='a loss name (dpo, kto, …) or JSON: \'{"name": "dpo", "beta": 0.2}\'')
    ],
    hp: HyperparamOpt = None,
    name: Annotated[str | None, typer.Option("--name")] = None,
    conversion: Annotated[
        str | None, typer.Option("--conversion", help='JSON, e.g. \'{"type": "pairwise_to_unpaired"}\'')
    ] = None,
    lora: Annotated[str | None, typer.Option("--lora", help="JSON, e.g. '{\"r\": 8}'")] = None,
    idempotency_key: IdempotencyKey = None,
    output: Output = OutputFormat.table,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Create a run: the loss and hyperparameters are the defaults its rounds may override."""
    with connect(base_url, api_key) as client:
        emit(
            client.runs.create(
                model,
                _loss(loss),
                name=name,
                hyperparams=_hyperparams(hp),
                conversion=_json_option(conversion, "--conversion"),
                lora=_json_option(lora, "--lora"),
                idempotency_key=idempotency_key,
            ),
            output,
        )


@runs_app.command("get")
def runs_get(
    run_id: str, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """A run with its rounds in order."""
    with connect(base_url, api_key) as client:
        emit(client.runs.get(run_id), output)


@runs_app.command("list")
def runs_list(
    limit: Limit = None, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """Runs, newest first."""
    with connect(base_url, api_key) as client:
        emit(_take(client.runs.list(), limit), output)


# --------------------------------------------------------------------------- rounds

rounds_app = typer.Typer(help="Rounds: queue training on feedback, continuing the run.", no_args_is_help=True)


def _wait_for(client: Client, job_id: str, label: str, timeout: float | None, poll_interval: float) -> m.JobOut:
    with JobProgress(label) as progress:
        return client.jobs.wait(
            job_id, timeout=timeout, poll_interval=poll_interval, on_progress=progress, raise_on_failure=False
        )


def _fail_if_unsuccessful(job: m.JobOut) -> None:
    if job.status != "succeeded":
        raise JobFailed(job)


@rounds_app.command("create")
def rounds_create(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="the run's id (run_…)")],
    feedback: Annotated[
        list[str], typer.Option("--feedback", help="a feedback id (fb_…), or a file to upload first (repeatable)")
    ],
    loss: Annotated[str | None, typer.Option("--loss", help="override the run's loss: a name or JSON")] = None,
    hp: HyperparamOpt = None,
    conversion: Annotated[
        str | None, typer.Option("--conversion", help="JSON, or 'none' for no conversion [default: the run's]")
    ] = None,
    parent: Annotated[
        str | None, typer.Option("--parent", help="start from this checkpoint [default: the run's latest round's]")
    ] = None,
    wait: Wait = False,
    timeout: Timeout = None,
    poll_interval: PollInterval = 2.0,
    idempotency_key: IdempotencyKey = None,
    output: Output = OutputFormat.table,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Queue a round. With --wait: a live progress bar on stderr, then the round as it ended;
    exit 1 with the reason when its job failed or was cancelled."""
    if conversion is None:
        conversion_value: Any = UNSET
    elif conversion.strip().lower() in ("none", "null"):
        conversion_value = None
    else:
        conversion_value = _json_option(conversion, "--conversion")
    with connect(base_url, api_key) as client:
        feedback_ids = []
        for item in feedback:
            if Path(item).is_file():
                uploaded = client.feedback.upload(item)
                stderr().print(f"uploaded {item}: {uploaded.id} ({uploaded.n_records} {uploaded.kind} records)")
                feedback_ids.append(uploaded.id)
            else:
                feedback_ids.append(item)
        rnd = client.rounds.create(
            run_id,
            feedback_ids,
            loss=_loss(loss),
            hyperparams=_hyperparams(hp),
            conversion=conversion_value,
            parent_checkpoint_id=parent,
            idempotency_key=idempotency_key,
        )
        if not wait:
            emit(rnd, output)
            return
        job = _wait_for(client, rnd.job_id, f"round {rnd.index}", timeout, poll_interval)
        final = next((r for r in client.rounds.list(run_id) if r.round_id == rnd.round_id), rnd)
        emit(final, output)
        _fail_if_unsuccessful(job)


@rounds_app.command("list")
def rounds_list(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    output: Output = OutputFormat.table,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """A run's rounds in order, with their jobs' status and checkpoints."""
    with connect(base_url, api_key) as client:
        emit(client.rounds.list(run_id), output)


# --------------------------------------------------------------------------- jobs

jobs_app = typer.Typer(help="Jobs: status, progress, metrics, logs, cancel.", no_args_is_help=True)
JobId = Annotated[str, typer.Argument(metavar="JOB", help="the job's id (job_…)")]


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option("--status", help="only jobs in this status")] = None,
    limit: Limit = None,
    output: Output = OutputFormat.table,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Jobs, newest first (every page unless --limit)."""
    with connect(base_url, api_key) as client:
        emit(_take(client.jobs.list(status=status), limit), output)


@jobs_app.command("get")
def jobs_get(
    job_id: JobId, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """Status, progress (percent, elapsed, ETA), latest metrics, error."""
    with connect(base_url, api_key) as client:
        emit(client.jobs.get(job_id), output)


@jobs_app.command("metrics")
def jobs_metrics(
    job_id: JobId,
    split: Annotated[str | None, typer.Option("--split", help="train or eval")] = None,
    output: Output = OutputFormat.table,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """The per-step metric series (every page)."""
    with connect(base_url, api_key) as client:
        emit(client.jobs.metrics(job_id, split=split), output)


@jobs_app.command("logs")
def jobs_logs(
    job_id: JobId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing until the job has finished; exit 1 if it failed")
    ] = False,
    tail_bytes: Annotated[int | None, typer.Option("--tail-bytes", min=1)] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """The training log's tail, as plain text (no -o: the log is the output)."""
    with connect(base_url, api_key) as client:
        if not follow:
            sys.stdout.write(client.jobs.logs(job_id, tail_bytes=tail_bytes))
            return
        for chunk in client.jobs.follow_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        _fail_if_unsuccessful(client.jobs.get(job_id))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: JobId, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """Cancel: a queued job at once, a running one once its training processes are gone."""
    with connect(base_url, api_key) as client:
        emit(client.jobs.cancel(job_id), output)


@jobs_app.command("wait")
def jobs_wait(
    job_id: JobId,
    timeout: Timeout = None,
    poll_interval: PollInterval = 2.0,
    output: Output = OutputFormat.table,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Wait for a job with a live progress bar on stderr; print it as it ended; exit 1 if it failed."""
    with connect(base_url, api_key) as client:
        job = _wait_for(client, job_id, job_id, timeout, poll_interval)
        emit(job, output)
        _fail_if_unsuccessful(job)


# --------------------------------------------------------------------------- checkpoints

checkpoints_app = typer.Typer(help="Checkpoints and their lineage.", no_args_is_help=True)
CheckpointId = Annotated[str, typer.Argument(metavar="CHECKPOINT", help="the checkpoint's id (ckpt_…)")]


@checkpoints_app.command("get")
def checkpoints_get(
    checkpoint_id: CheckpointId, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """One checkpoint: where it is, its manifest hash, its step."""
    with connect(base_url, api_key) as client:
        emit(client.checkpoints.get(checkpoint_id), output)


@checkpoints_app.command("lineage")
def checkpoints_lineage(
    checkpoint_id: CheckpointId, output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None
) -> None:
    """The checkpoint, its parents back to round 1, and the SFT model at the root."""
    with connect(base_url, api_key) as client:
        emit(client.checkpoints.lineage(checkpoint_id), output)


losses_app = typer.Typer(help="The losses this server trains.", no_args_is_help=True)


@losses_app.command("list")
def losses_list(output: Output = OutputFormat.table, base_url: BaseUrl = None, api_key: ApiKey = None) -> None:
    """Every loss a run or round may use, with its parameters and defaults (from the server's registry)."""
    with connect(base_url, api_key) as client:
        emit(client.losses.list(), output)


GROUPS = {
    "feedback": feedback_app,
    "models": models_app,
    "runs": runs_app,
    "rounds": rounds_app,
    "jobs": jobs_app,
    "checkpoints": checkpoints_app,
    "losses": losses_app,
}


def add_client_commands(app: typer.Typer) -> None:
    """Mount the client command groups on `halos` (the server's CLI owns the root command)."""
    for name, group in GROUPS.items():
        app.add_typer(group, name=name, rich_help_panel="Client (HTTP API)")

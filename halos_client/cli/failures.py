"""Exit codes of the client commands, and how a failure is told on stderr.

| code | meaning |
|---|---|
| 0 | done (with `--wait` / `jobs wait` / `jobs logs -f`: the job succeeded) |
| 1 | the job ended `failed` or `cancelled` (the reason is printed) |
| 2 | bad command line or local input (unknown option, missing file, invalid JSON or field) |
| 3 | the server refused the request (4xx other than 429: not found, validation, conflict, bad key, invalid feedback) |
| 4 | the server could not be reached, stayed overloaded (429/503 after the retries) or failed (5xx) |
| 5 | `--timeout` passed before the job finished (the job goes on) |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from halos_client.errors import (
    APIConnectionError,
    APIError,
    InvalidFeedbackError,
    JobFailed,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    WaitTimeout,
)


class ExitCode(IntEnum):
    OK = 0
    JOB_FAILED = 1
    USAGE = 2
    REFUSED = 3
    UNAVAILABLE = 4
    TIMEOUT = 5
    INTERRUPTED = 130


def stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def feedback_report(exc: InvalidFeedbackError) -> Table:
    """The server's record-level report: one row per bad record."""
    table = Table(title=None, show_edge=False, pad_edge=False)
    for header in ("line", "record", "field", "code", "problem", "hint"):
        table.add_column(header, overflow="fold")
    for rec in exc.records:
        table.add_row(
            "-" if rec.line is None else str(rec.line),
            str(rec.index),
            rec.field or "(record)",
            rec.code,
            rec.message,
            rec.hint or "",
        )
    return table


def report(exc: BaseException) -> ExitCode:
    """Tell `exc` on stderr, readably; return the exit code it maps to."""
    err = stderr()
    if isinstance(exc, JobFailed):
        err.print(f"[bold red]job {exc.job.id} {exc.job.status}[/]: {escape(exc.reason)}")
        return ExitCode.JOB_FAILED
    if isinstance(exc, WaitTimeout):
        err.print(f"[yellow]{escape(str(exc))}[/] (it goes on; `halos jobs wait {exc.job.id}` waits again)")
        return ExitCode.TIMEOUT
    if isinstance(exc, InvalidFeedbackError):
        err.print(f"[bold red]invalid feedback file[/]: {escape(exc.message)}")
        err.print(feedback_report(exc))
        if exc.truncated:
            err.print("(the server stopped listing after this many problems)")
        return ExitCode.REFUSED
    if isinstance(exc, APIError):
        err.print(f"[bold red]error[/] {exc.status} {escape(exc.code)}: {escape(exc.message)}")
        for item in exc.details.get("errors") or []:
            if isinstance(item, dict):
                err.print(
                    f"  {escape(str(item.get('field') or item.get('loc') or ''))}: "
                    f"{escape(str(item.get('message', '')))}"
                )
        if isinstance(exc, (RateLimitError, ServiceUnavailableError, ServerError)):
            return ExitCode.UNAVAILABLE
        return ExitCode.REFUSED
    if isinstance(exc, APIConnectionError):
        err.print(f"[bold red]cannot reach the server[/]: {escape(str(exc))} (set HALOS_BASE_URL or --base-url)")
        return ExitCode.UNAVAILABLE
    if isinstance(exc, ValidationError):
        err.print("[bold red]invalid arguments[/]:")
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()))
            err.print(f"  {escape(where)}: {escape(e.get('msg', ''))}")
        return ExitCode.USAGE
    raise exc


@contextmanager
def exits_on_failure() -> Iterator[None]:
    """Turn the client's errors into a message on stderr and the documented exit code."""
    try:
        yield
    except KeyboardInterrupt:
        stderr().print("interrupted")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except (JobFailed, WaitTimeout, APIError, APIConnectionError, ValidationError) as exc:
        raise typer.Exit(report(exc)) from None

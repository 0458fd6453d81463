"""The progress of a job being waited for, on stderr (stdout stays for the result).

On a terminal: a live bar (rich) with status, step/total, loss, reward accuracy, elapsed and the
server's ETA. Elsewhere (CI logs, a pipe): one plain line whenever the status or the step
changes, so a log shows how the job went without control characters.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from halos_client import models as m
from halos_client.cli.output import duration, number


def _summary(job: m.JobOut) -> dict[str, str]:
    metrics = job.latest_metrics or {}
    return {
        "status": job.status + (f" (attempt {job.attempt}/{job.max_attempts})" if job.attempt > 1 else ""),
        "loss": number(metrics.get("loss")),
        "acc": number(metrics.get("rewards/accuracy"), 3),
        "elapsed": duration(job.elapsed_s),
        "eta": duration(job.eta_s),
    }


class JobProgress:
    """An `on_progress` callback for `client.jobs.wait`; use as a context manager."""

    def __init__(self, label: str, console: Console | None = None) -> None:
        self.label = label
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_line: tuple[str, int, int] | None = None

    def __enter__(self) -> JobProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}[/] {task.fields[status]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "loss {task.fields[loss]}  reward acc {task.fields[acc]}  "
                    "elapsed {task.fields[elapsed]}  ETA {task.fields[eta]}"
                ),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                self.label, total=None, status="…", loss="-", acc="-", elapsed="-", eta="-"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, job: m.JobOut) -> None:
        fields: dict[str, Any] = _summary(job)  # rich types **fields against update's named arguments
        if self._progress is not None and self._task is not None:
            total = job.progress.total_steps
            done = total if job.status == "succeeded" and total else job.progress.round_step
            self._progress.update(self._task, completed=done, total=total, **fields)
            return
        key = (job.status, job.progress.round_step, job.attempt)
        if key == self._last_line:
            return
        self._last_line = key
        total = job.progress.total_steps
        step = f"step {job.progress.round_step}/{total}" if total else f"step {job.progress.round_step}"
        percent = "" if job.percent_done is None else f" ({job.percent_done:.0f}%)"
        self.console.print(
            f"{self.label} {fields['status']} {step}{percent} loss {fields['loss']} "
            f"reward acc {fields['acc']} elapsed {fields['elapsed']} ETA {fields['eta']}",
            highlight=False,
            soft_wrap=True,
        )

"""How the training subprocess's exit turns into a job outcome (docs/ARCHITECTURE.md, "Worker ↔ trainer").

| exit                                              | outcome                                   |
|---------------------------------------------------|-------------------------------------------|
| we killed it for a cancel request                 | cancelled                                 |
| 0 and result.json `status: ok` and final/ verifies | succeeded (result = result.json)          |
| 0 without a usable result.json / final/           | crashed (retried from the last checkpoint)|
| killed by a signal (negative returncode), or a    | crashed                                   |
|   rank killed by a signal as reported by the      |                                           |
|   launcher ("died with <Signals.SIGKILL: 9>",     |                                           |
|   torchrun "exitcode: -9")                        |                                           |
| > 0 after "No space left on device" (ENOSPC)      | failed, "out of disk space …" + the tail  |
| > 0 otherwise                                     | failed, error = the traceback tail        |

`accelerate launch` itself exits 1 when a rank dies from a signal (it raises CalledProcessError),
so signal deaths of ranks are recognised from the launcher's report in stdout.log.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from halos_core.artefact_spec import ArtefactResult, read_artefact_result, sha256_of
from halos_core.round_result import RoundResult
from halos_core.run_dir import CheckpointError, RunDir, read_manifest
from server.jobs import Outcome

TAIL_BYTES = 64 * 1024
_ENOSPC = "No space left on device"  # strerror(ENOSPC): Python ("[Errno 28] …") and safetensors ("… (os error 28)")
ERROR_TAIL_CHARS = 4000

_SIGNAL_PATTERNS = [
    re.compile(r"died with <Signals\.(SIG[A-Z0-9]+): (\d+)>"),
    re.compile(r"returned non-zero exit status -(\d+)"),
    re.compile(r"exitcode\s*:\s*-(\d+)"),
    re.compile(r"Signal (\d+) \((SIG[A-Z0-9]+)\) received by PID"),
]
_EXC_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)|AssertionError|KeyboardInterrupt)\b(:.*)?$"
)


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def read_tail(path: Path, limit: int = TAIL_BYTES, start: int = 0) -> str:
    """The last `limit` bytes of `path` written at or after byte `start` (this attempt's output)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(start, size - limit, 0))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def rank_signal(log_tail: str) -> str | None:
    """The signal that killed a rank, as reported by accelerate/torchrun, if any."""
    for pattern in _SIGNAL_PATTERNS:
        for match in pattern.finditer(log_tail):
            groups = match.groups()
            names = [g for g in groups if g and g.startswith("SIG")]
            if names:
                return names[0]
            nums = [g for g in groups if g and g.isdigit()]
            if nums:
                return signal_name(int(nums[0]))
    return None


def error_summary(log_tail: str) -> str:
    """The trainer's last exception line followed by the tail of the log."""
    lines = log_tail.splitlines()
    headline = None
    for line in reversed(lines):
        stripped = line.strip()
        match = _EXC_LINE.match(stripped)
        if match and "CalledProcessError" not in stripped and "ChildFailedError" not in stripped:
            headline = stripped
            break
    tail = log_tail[-ERROR_TAIL_CHARS:]
    return f"{headline}\n--- stdout.log tail ---\n{tail}" if headline else f"--- stdout.log tail ---\n{tail}"


def verify_artefact(run_dir: RunDir) -> tuple[ArtefactResult | None, str | None]:
    """(result, None) when result.json is an ArtefactResult whose output file has its sha256; else (None, why)."""
    try:
        result = read_artefact_result(run_dir.result_json)
    except (OSError, ValueError) as exc:
        return None, f"unreadable result.json: {str(exc)[:500]}"
    if result is None:
        return None, "exited 0 without writing result.json"
    try:
        actual = sha256_of(result.output_path)
    except OSError as exc:
        return None, f"output {result.output_path} is unreadable: {exc}"
    if actual != result.sha256:
        return None, f"output sha256 {actual[:12]}… != result.json {result.sha256[:12]}…"
    return result, None


def verify_result(run_dir: RunDir, kind: str = "round") -> tuple[RoundResult | ArtefactResult | None, str | None]:
    """(result, None) when result.json is a valid RoundResult whose final checkpoint verifies (an
    artefact job's: `verify_artefact`); else (None, why)."""
    if kind != "round":
        return verify_artefact(run_dir)
    try:
        result = run_dir.read_result()
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        return None, f"unreadable result.json: {str(exc)[:500]}"
    if result is None:
        return None, "exited 0 without writing result.json"
    try:
        manifest = read_manifest(result.final_dir, verify=True)
    except CheckpointError as exc:
        return None, f"final checkpoint does not verify: {exc}"
    if result.manifest_sha256 != manifest.sha256:
        return (
            None,
            f"final checkpoint manifest sha256 {manifest.sha256[:12]}… != result.json {result.manifest_sha256[:12]}…",
        )
    return result.model_copy(update={"final_dir": str(Path(result.final_dir).resolve())}), None


def classify(
    returncode: int,
    run_dir: RunDir,
    *,
    cancelled: bool = False,
    log_offset: int = 0,
    kind: str = "round",
    log: Path | None = None,
) -> Outcome:
    """`log`: the launcher's output (default stdout.log; a multi-node attempt's node r > 0 has its own)."""
    if cancelled:
        return Outcome("cancelled", error="cancelled by request")
    if returncode == 0:
        result, why = verify_result(run_dir, kind)
        if result is not None:
            return Outcome("succeeded", result=result)
        return Outcome("crashed", error=why)
    # one process runs without a launcher (worker.launch.command): its own death by a signal reads
    # the same as a rank's death reported by `accelerate launch`
    tail = read_tail(log or run_dir.stdout_log, start=log_offset) if returncode > 0 else ""
    sig = signal_name(-returncode) if returncode < 0 else rank_signal(tail)
    if sig is not None:
        hint = " (out of memory?)" if sig == "SIGKILL" else ""
        return Outcome("crashed", error=f"a training process was killed by {sig}{hint}")
    if _ENOSPC in tail:  # a save found the disk full: the earlier checkpoints are intact (I4)
        return Outcome(
            "failed",
            error=f"out of disk space on the data dir while training (free space: GET /v1/usage, runs' retention, "
            f"DELETE of runs / feedback); training exited with code {returncode}: {error_summary(tail)}",
        )
    return Outcome("failed", error=f"training exited with code {returncode}: {error_summary(tail)}")

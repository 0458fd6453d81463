"""`halos` command line (typer): the server's commands, and the client's mounted beside them.

    halos serve [--host H] [--port P] [--workers N] [--no-worker] [--no-sweeper] [--no-migrate] [--concurrency N]
        Migrates the database, then runs the HTTP API (uvicorn) in this process — or, with
        --workers N > 1, in N uvicorn worker processes sharing the port — the sweeper in a thread,
        and — unless --no-worker — one `halos worker --no-sweeper` child process.
        With nothing configured everything lives under HALOS_DATA_DIR (SQLite + embedded broker).
        Ctrl-C / SIGTERM stops the API, then the worker child (warm shutdown: running jobs are
        released and resume later), then the sweeper.
    halos worker [--concurrency N] [--no-sweeper] [--migrate] [--loglevel L]
        A Celery worker consuming queue `halos` (solo pool for N=1, threads for N>1) plus its
        own sweeper thread. With N>1 (and not HALOS_USE_CPU) every concurrent job gets its own
        HALOS_NUM_PROCESSES GPUs (worker/slots.py); too few visible GPUs: exits with status 2.
    halos migrate
        `alembic upgrade head` on HALOS_DATABASE_URL.
    halos check
        Exit 0 when the database and the broker answer (the compose file's worker health check).
    halos fsck [--finish] [--no-blob-hashes]
        Does the data dir agree with the database? Every whole checkpoint verifies against its
        manifest, no file is left that no row accounts for; exit 1 with the list of problems
        (JSON on stdout). --finish first completes removals a kill interrupted.
    halos keys create --project NAME      prints the new API key, alone, on stdout
    halos keys revoke KEY_ID_OR_PREFIX
    halos feedback|models|runs|rounds|jobs|checkpoints …
        The HTTP API's client commands (halos_client/cli): they talk to a server at
        HALOS_BASE_URL with HALOS_API_KEY, like any other client.

Logs go to stderr; stdout carries only command results.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Annotated

import typer

from halos_client.cli import add_client_commands
from server.settings import Settings, get_settings

log = logging.getLogger("halos")

# The API's event loop: asyncio's own, not uvloop (which uvicorn picks when it is installed). The
# polled reads run on the loop (no thread hop on SQLite); under uvloop, with 128 clients, some of
# them then waited 1-5 s for an answer (p99 ~4 s, median 75 ms), with asyncio's loop none over
# 170 ms at the same throughput (bench/README, "Job reads: no dependencies, a Core connection,
# asyncio's loop").
EVENT_LOOP = "asyncio"


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )


def _is_sqlite(settings: Settings) -> bool:
    return settings.db_url.startswith("sqlite")


def _set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Linux: the child gets `sig` when the process that started it dies (no orphaned workers)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# --------------------------------------------------------------------------- commands


app = typer.Typer(
    name="halos",
    help="halos-server: online preference-alignment rounds",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
keys_app = typer.Typer(help="API keys", no_args_is_help=True)
app.add_typer(keys_app, name="keys", rich_help_panel="Server")

LogLevel = Annotated[
    str,
    typer.Option("--loglevel", show_default=False, help="DEBUG, INFO, WARNING, … [default: HALOS_LOG_LEVEL or INFO]"),
]
Concurrency = Annotated[int | None, typer.Option("--concurrency", help="jobs the worker runs at once")]
DEFAULT_LOGLEVEL = os.environ.get("HALOS_LOG_LEVEL", "INFO")


@app.command("migrate", rich_help_panel="Server", help="alembic upgrade head")
def cmd_migrate(loglevel: LogLevel = DEFAULT_LOGLEVEL) -> None:
    _setup_logging(loglevel)
    from server import migrate

    settings = get_settings()
    migrate.upgrade(settings)
    log.info("database at revision %s", migrate.current(settings))


@app.command("worker", rich_help_panel="Server", help="Celery worker that runs training jobs")
def cmd_worker(
    concurrency: Concurrency = None,
    no_sweeper: Annotated[bool, typer.Option("--no-sweeper")] = False,
    run_migrations: Annotated[bool, typer.Option("--migrate", help="run migrations first")] = False,
    loglevel: LogLevel = DEFAULT_LOGLEVEL,
) -> None:
    _setup_logging(loglevel)
    settings = get_settings()
    settings.ensure_dirs()
    concurrency = concurrency or settings.worker_concurrency
    from worker import slots  # the worker package is imported only by this command

    try:
        slots.configure(settings, concurrency)  # one GPU set per concurrent job
    except slots.SlotError as exc:
        log.error("refusing to start the worker: %s", exc)
        raise typer.Exit(2) from None
    if run_migrations:
        from server import migrate

        migrate.upgrade(settings)
    stop = threading.Event()
    if not no_sweeper:  # the sweeper, the webhook dispatcher, the tracking exporter
        from server import loops

        loops.start(settings, stop)
    from worker.app import app as celery_app

    argv = [
        "worker",
        "--queues",
        "halos",
        "--pool",
        "solo" if concurrency <= 1 else "threads",
        "--concurrency",
        str(max(1, concurrency)),
        "--hostname",
        f"halos-{os.getpid()}@{socket.gethostname()}",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    try:
        celery_app.worker_main(argv)
    finally:
        stop.set()


def _start_worker_child(loglevel: str, concurrency: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "worker", "--no-sweeper", "--loglevel", loglevel]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    return subprocess.Popen(
        cmd, preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None, start_new_session=True
    )


def _stop_child(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # warm shutdown: running jobs are released
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("worker did not stop within %.0fs; killing it", timeout)
        proc.kill()
        proc.wait()


@app.command("serve", rich_help_panel="Server", help="HTTP API + sweeper (+ one worker unless --no-worker)")
def cmd_serve(
    host: Annotated[str | None, typer.Option("--host")] = None,
    port: Annotated[int | None, typer.Option("--port")] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="API processes (each with its own rate-limit window and validation pool)"
        ),
    ] = 1,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="run the API alone (workers run elsewhere)")] = False,
    no_sweeper: Annotated[bool, typer.Option("--no-sweeper")] = False,
    no_migrate: Annotated[bool, typer.Option("--no-migrate")] = False,
    concurrency: Concurrency = None,
    loglevel: LogLevel = DEFAULT_LOGLEVEL,
) -> None:
    _setup_logging(loglevel)
    import uvicorn

    from server import loops, migrate

    settings = get_settings()
    settings.ensure_dirs()
    if not no_migrate:
        migrate.upgrade(settings)
    from server.app import serve_app

    worker_proc: subprocess.Popen | None = None
    if not no_worker:  # before any thread is started (preexec_fn)
        worker_proc = _start_worker_child(loglevel, concurrency)
        log.info("started worker process %d", worker_proc.pid)
    stop = threading.Event()
    try:
        # N API processes: uvicorn's supervisor spawns them, each builds its own app from HALOS_*
        api = "server.app:serve_app" if workers > 1 else serve_app(settings)
        if not no_sweeper:  # the sweeper, the webhook dispatcher, the tracking exporter
            loops.start(settings, stop)
    except BaseException:
        if worker_proc is not None:
            _stop_child(worker_proc, timeout=10)
        raise
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        config = uvicorn.Config(
            api,
            factory=True,
            host=host or settings.host,
            port=port or settings.port,
            log_level=loglevel.lower(),
            lifespan="on",
            loop=EVENT_LOOP,
            workers=workers,
        )
        try:
            # the supervisor handles SIGINT/SIGTERM itself: it stops its API processes and returns
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        finally:
            stop.set()
            if worker_proc is not None:
                _stop_child(worker_proc, timeout=settings.kill_grace_s + 30)
        return
    server = uvicorn.Server(
        uvicorn.Config(
            api,
            host=host or settings.host,
            port=port or settings.port,
            log_level=loglevel.lower(),
            lifespan="on",
            loop=EVENT_LOOP,
        )
    )
    # uvicorn captures SIGINT/SIGTERM while it runs and re-raises them to the previous handlers
    # once it has shut down; with these no-op handlers it returns instead, so the worker child
    # and the sweeper are stopped cleanly below and the exit status is 0.
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        server.run()
        if received:
            log.info("received %s: stopping", signal.Signals(received[-1]).name)
    finally:
        stop.set()
        if worker_proc is not None:
            _stop_child(worker_proc, timeout=settings.kill_grace_s + 30)


@app.command("check", rich_help_panel="Server", help="exit 0 when the database and the broker answer")
def cmd_check(loglevel: LogLevel = DEFAULT_LOGLEVEL) -> None:
    """What /readyz checks, as an exit status: the health check of a process without an HTTP port
    (the compose file's workers). The checks go to stdout as JSON."""
    _setup_logging(loglevel)
    from server.api.health import check_broker, check_database

    settings = get_settings()
    checks = {"database": check_database(settings), "broker": check_broker(settings)}
    sys.stdout.write(json.dumps(checks) + "\n")
    if any(v != "ok" for v in checks.values()):
        raise typer.Exit(1)


@app.command("fsck", rich_help_panel="Server", help="check the data dir against the database; exit 1 on problems")
def cmd_fsck(
    finish: Annotated[
        bool, typer.Option("--finish", help="first finish removals a killed process left half-done")
    ] = False,
    blob_hashes: Annotated[
        bool, typer.Option("--blob-hashes/--no-blob-hashes", help="hash every feedback / prompt-set blob")
    ] = True,
    loglevel: LogLevel = DEFAULT_LOGLEVEL,
) -> None:
    """Every checkpoint the database calls whole (or optimizer_pruned) verifies against its manifest
    (sha256 of every file: reads every checkpoint), and no file is left that no row accounts for.
    Prints {"ok", "checked", "problems"} as JSON; exit 1 when there are problems."""
    _setup_logging(loglevel)
    from server.db import session_scope
    from server.storage_lifecycle import files
    from server.storage_lifecycle.fsck import fsck

    settings = get_settings()
    with session_scope(settings) as session:
        if finish:
            files.finish_open_intents(session, settings)
        report = fsck(session, settings, verify_blobs=blob_hashes)
    sys.stdout.write(json.dumps({"ok": report.ok, "checked": report.checked, "problems": report.problems}) + "\n")
    if not report.ok:
        raise typer.Exit(1)


@keys_app.command("create", help="create a key; prints it alone on stdout")
def cmd_keys_create(
    project: Annotated[str, typer.Option("--project", help="the project the key belongs to (created if new)")],
    loglevel: LogLevel = DEFAULT_LOGLEVEL,
) -> None:
    _setup_logging(loglevel)
    from server import migrate
    from server.db import session_scope
    from server.services.keys import create_api_key

    settings = get_settings()
    if _is_sqlite(settings):
        settings.ensure_dirs()
        migrate.upgrade(settings)
    with session_scope(settings) as session:
        _key, secret = create_api_key(session, project)
    sys.stdout.write(secret + "\n")
    sys.stdout.flush()


@keys_app.command("revoke", help="revoke a key by id or prefix")
def cmd_keys_revoke(
    key: Annotated[str, typer.Argument(metavar="KEY_ID_OR_PREFIX")],
    loglevel: LogLevel = DEFAULT_LOGLEVEL,
) -> None:
    _setup_logging(loglevel)
    from server.db import session_scope
    from server.services.keys import revoke_api_key

    settings = get_settings()
    try:
        with session_scope(settings) as session:
            result = revoke_api_key(session, key)
    except Exception as exc:
        log.error("%s", getattr(exc, "message", None) or exc)
        raise typer.Exit(1) from None
    if result is None or result is False:
        log.error("no API key %r", key)
        raise typer.Exit(1)
    log.info("revoked %s", getattr(result, "id", key))


add_client_commands(app)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        app(args=list(argv) if argv is not None else None, prog_name="halos")
    except SystemExit as exc:  # typer (click) always ends by exiting; hand the status back
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`halos` command line (argparse).

    halos serve [--host H] [--port P] [--no-worker] [--no-sweeper] [--concurrency N]
        Migrates the database, then runs the HTTP API (uvicorn) in this process, the sweeper in
        a thread, and — unless --no-worker — one `halos worker --no-sweeper` child process.
        With nothing configured everything lives under HALOS_DATA_DIR (SQLite + embedded broker).
        Ctrl-C / SIGTERM stops the API, then the worker child (warm shutdown: running jobs are
        released and resume later), then the sweeper.
    halos worker [--concurrency N] [--no-sweeper] [--loglevel L]
        A Celery worker consuming queue `halos` (solo pool for N=1, threads for N>1) plus its
        own sweeper thread. With N>1 (and not HALOS_USE_CPU) every concurrent job gets its own
        HALOS_NUM_PROCESSES GPUs (worker/slots.py); too few visible GPUs: exits with status 2.
    halos migrate
        `alembic upgrade head` on HALOS_DATABASE_URL.
    halos keys create --project NAME      prints the new API key, alone, on stdout
    halos keys revoke KEY_ID_OR_PREFIX

Logs go to stderr; stdout carries only command results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Optional, Sequence

from server.settings import Settings, get_settings

log = logging.getLogger("halos")


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
    except Exception:  # noqa: BLE001 - best effort (not Linux)
        pass


# --------------------------------------------------------------------------- commands


def cmd_migrate(args: argparse.Namespace) -> int:
    from server import migrate

    settings = get_settings()
    migrate.upgrade(settings)
    log.info("database at revision %s", migrate.current(settings))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    settings.ensure_dirs()
    concurrency = args.concurrency or settings.worker_concurrency
    from worker import slots  # the worker package is imported only by this command

    try:
        slots.configure(settings, concurrency)  # one GPU set per concurrent job
    except slots.SlotError as exc:
        log.error("refusing to start the worker: %s", exc)
        return 2
    if args.migrate:
        from server import migrate

        migrate.upgrade(settings)
    stop = threading.Event()
    if not args.no_sweeper:
        from server import sweeper

        sweeper.start_thread(settings, stop)
    from worker.app import app

    argv = [
        "worker",
        "--queues", "halos",
        "--pool", "solo" if concurrency <= 1 else "threads",
        "--concurrency", str(max(1, concurrency)),
        "--hostname", f"halos-{os.getpid()}@{socket.gethostname()}",
        "--loglevel", args.loglevel,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    try:
        app.worker_main(argv)
    finally:
        stop.set()
    return 0


def _start_worker_child(args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "worker", "--no-sweeper", "--loglevel", args.loglevel]
    if args.concurrency:
        cmd += ["--concurrency", str(args.concurrency)]
    return subprocess.Popen(cmd, preexec_fn=_set_parent_death_signal if sys.platform.startswith("linux") else None,
                            start_new_session=True)


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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server import migrate, sweeper

    settings = get_settings()
    settings.ensure_dirs()
    if not args.no_migrate:
        migrate.upgrade(settings)
    from server.app import create_app

    worker_proc: Optional[subprocess.Popen] = None
    if not args.no_worker:  # before any thread is started (preexec_fn)
        worker_proc = _start_worker_child(args)
        log.info("started worker process %d", worker_proc.pid)
    stop = threading.Event()
    try:
        app = create_app(settings)
        if not args.no_sweeper:
            sweeper.start_thread(settings, stop)
    except BaseException:
        if worker_proc is not None:
            _stop_child(worker_proc, timeout=10)
        raise
    server = uvicorn.Server(uvicorn.Config(app, host=args.host or settings.host, port=args.port or settings.port,
                                           log_level=args.loglevel.lower(), lifespan="on"))
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
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """The database and the broker answer (what /readyz checks), as an exit status: a process's
    own health check where there is no HTTP port (the compose file's workers)."""
    from server.api.health import check_broker, check_database

    settings = get_settings()
    checks = {"database": check_database(settings), "broker": check_broker(settings)}
    print(json.dumps(checks))
    return 0 if all(v == "ok" for v in checks.values()) else 1


def cmd_keys_create(args: argparse.Namespace) -> int:
    from server import migrate
    from server.db import session_scope
    from server.services.keys import create_api_key

    settings = get_settings()
    if _is_sqlite(settings):
        settings.ensure_dirs()
        migrate.upgrade(settings)
    with session_scope(settings) as session:
        _key, secret = create_api_key(session, args.project)
    sys.stdout.write(secret + "\n")
    sys.stdout.flush()
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from server.db import session_scope
    from server.services.keys import revoke_api_key

    settings = get_settings()
    try:
        with session_scope(settings) as session:
            result = revoke_api_key(session, args.key)
    except Exception as exc:  # noqa: BLE001 - NotFound / Conflict (ambiguous prefix) from the service
        log.error("%s", getattr(exc, "message", None) or exc)
        return 1
    if result is None or result is False:
        log.error("no API key %r", args.key)
        return 1
    log.info("revoked %s", getattr(result, "id", args.key))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--loglevel", default=os.environ.get("HALOS_LOG_LEVEL", "INFO"))
    parser = argparse.ArgumentParser(prog="halos", description="halos-server: online preference-alignment rounds")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="HTTP API + sweeper (+ one worker unless --no-worker)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--no-worker", action="store_true", help="run the API alone (workers run elsewhere)")
    serve.add_argument("--no-sweeper", action="store_true")
    serve.add_argument("--no-migrate", action="store_true")
    serve.add_argument("--concurrency", type=int, default=None, help="jobs the embedded worker runs at once")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", parents=[common], help="Celery worker that runs training jobs")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--no-sweeper", action="store_true")
    worker.add_argument("--migrate", action="store_true", help="run migrations first")
    worker.set_defaults(func=cmd_worker)

    mig = sub.add_parser("migrate", parents=[common], help="alembic upgrade head")
    mig.set_defaults(func=cmd_migrate)

    check = sub.add_parser("check", parents=[common], help="exit 0 when the database and the broker answer")
    check.set_defaults(func=cmd_check)

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", parents=[common], help="create a key; prints it alone on stdout")
    create.add_argument("--project", required=True)
    create.set_defaults(func=cmd_keys_create)
    revoke = keys_sub.add_parser("revoke", parents=[common], help="revoke a key by id or prefix")
    revoke.add_argument("key", metavar="KEY_ID_OR_PREFIX")
    revoke.set_defaults(func=cmd_keys_revoke)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.loglevel)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The demo: two online alignment rounds through the real server, worker and `accelerate launch`.

    make demo          (or: .venv/bin/python scripts/demo.py)

1. builds a tiny Llama SFT model locally (nothing is downloaded),
2. starts `halos serve` with embedded defaults (SQLite + embedded broker) in a fresh data dir,
3. creates an API key with `halos keys create`,
4. with the `halos` client commands (each printed before it runs): registers the model, creates a
   run, and runs round 1 (DPO) and, on new feedback, round 2 continuing from round 1's checkpoint
   (weights, optimizer and scheduler), each `--wait`ing with a live progress bar,
5. with the Python SDK (`halos_client.Client`): prints the per-round metrics; then the lineage
   with `halos checkpoints lineage`, and shuts the server down.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from halos_client import APIConnectionError, Client, ServiceUnavailableError
from halos_core.synthetic import pairwise_records, to_jsonl_bytes

console = Console()
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def halos(*args: str, env: dict) -> str:
    return subprocess.run([str(BIN / "halos"), *args], env=env, check=True, capture_output=True, text=True).stdout


def show(*args: str, env: dict) -> dict:
    """Run a `halos` client command as a user would type it, print it, return its `-o json` result.
    Its stderr (uploads, the progress bar of --wait, errors) goes straight to the terminal."""
    argv = [*args, "-o", "json"]
    console.print(f"[dim]$ halos {' '.join(shlex.quote(a) for a in argv)}[/]")
    out = subprocess.run([str(BIN / "halos"), *argv], env=env, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"halos {args[0]} {args[1]} exited with {out.returncode}")
    return json.loads(out.stdout)


def wait_ready(client: Client, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"halos serve exited early with code {proc.returncode}")
        try:
            client.ready()
            return
        except (APIConnectionError, ServiceUnavailableError):
            time.sleep(0.5)
    raise SystemExit("server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT / "demo-data"), help="wiped and recreated")
    parser.add_argument("--keep", action="store_true", help="leave the server running at the end")
    args = parser.parse_args()

    started = time.monotonic()
    data_dir = Path(args.data_dir).resolve()
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    port = free_port()
    env = {
        **os.environ,
        "HALOS_DATA_DIR": str(data_dir),
        "HALOS_PORT": str(port),
        "HALOS_HEARTBEAT_INTERVAL_S": "1",
        "HALOS_SWEEP_INTERVAL_S": "2",
    }
    env.pop("HALOS_DATABASE_URL", None)
    env.pop("HALOS_BROKER_URL", None)

    console.rule("[bold]halos-server demo")
    model_dir = data_dir / "models" / "tiny-sft"  # <data dir>/models: where models may be registered by default
    subprocess.run(
        [sys.executable, "-m", "halos_core.tiny", str(model_dir)], env=env, check=True, stdout=subprocess.DEVNULL
    )
    console.print(f"built a tiny SFT model in {model_dir}")
    halos("migrate", env=env)
    key = halos("keys", "create", "--project", "demo", env=env).strip()
    console.print(f"created an API key for project 'demo': {key[:12]}…")

    log = open(data_dir / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "halos"), "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    cli_env = {**env, "HALOS_BASE_URL": base_url, "HALOS_API_KEY": key}
    try:
        client = Client(base_url, key)
        wait_ready(client, server)
        console.print(f"server ready on {base_url} (API docs at /docs; log {data_dir}/server.log)")

        model = show("models", "register", str(model_dir), "--name", "tiny-sft", env=cli_env)
        console.print(f"registered model {model['id']} sha256 {model['sha256'][:12]}…")
        hp = {
            "lr": 5e-4,
            "batch_size": 8,
            "microbatch_size": 4,
            "warmup_steps": 4,
            "max_length": 64,
            "max_prompt_length": 32,
            "checkpoint_every": 4,
        }
        run = show(
            "runs",
            "create",
            "--model",
            model["id"],
            "--loss",
            "dpo",
            "--name",
            "demo",
            *[arg for k, v in hp.items() for arg in ("--hp", f"{k}={v}")],
            env=cli_env,
        )

        rounds = []
        for index, (seed, loss) in enumerate([(1, None), (2, '{"name": "dpo", "beta": 0.1}')], start=1):
            feedback = data_dir / f"feedback-round{index}.jsonl"
            feedback.write_bytes(
                to_jsonl_bytes(pairwise_records(64, seed=seed, test_fraction=0.2, id_prefix=f"r{index}-"))
            )
            override = ["--loss", loss] if loss else []
            # --feedback FILE uploads the file first; --wait shows the progress bar and fails on failure
            rnd = show("rounds", "create", run["id"], "--feedback", str(feedback), *override, "--wait", env=cli_env)
            rounds.append(client.jobs.get(rnd["job_id"]))

        table = Table(title="per-round metrics (Python SDK: client.jobs.metrics)")
        for col in (
            "round",
            "steps",
            "first loss",
            "last loss",
            "reward acc (train, last)",
            "eval reward acc",
            "eval margin",
            "elapsed",
        ):
            table.add_column(col)
        for index, job in enumerate(rounds, start=1):
            series = list(client.jobs.metrics(job.id))
            train = [p.data for p in series if p.split == "train"]
            evals = [p.data for p in series if p.split == "eval"]
            ev = evals[-1] if evals else {}
            table.add_row(
                str(index),
                str(len(train)),
                f"{train[0]['loss']:.4f}",
                f"{train[-1]['loss']:.4f}",
                f"{train[-1].get('rewards/accuracy', float('nan')):.2f}",
                f"{ev.get('rewards/accuracy', float('nan')):.2f}",
                f"{ev.get('rewards/margin', float('nan')):.4f}",
                f"{job.elapsed_s or 0:.1f} s",
            )
        console.print(table)

        lineage_cmd = ["checkpoints", "lineage", rounds[-1].checkpoint_id or ""]
        console.print(f"[dim]$ halos {' '.join(lineage_cmd)}[/]")
        subprocess.run([str(BIN / "halos"), *lineage_cmd], env=cli_env, check=True)
        client.close()
        console.print(f"[green]demo finished in {time.monotonic() - started:.0f} s[/]")
        if args.keep:
            console.print(
                f"server left running; try: HALOS_BASE_URL={base_url} HALOS_API_KEY=… halos jobs list; Ctrl-C to stop"
            )
            server.wait()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
        console.print(f"server stopped (exit {server.returncode})")


if __name__ == "__main__":
    main()

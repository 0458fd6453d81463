"""The demo: two online alignment rounds through the real server, worker and `accelerate launch`.

    make demo          (or: .venv/bin/python scripts/demo.py)

1. builds a tiny Llama SFT model locally (nothing is downloaded),
2. starts `halos serve` with embedded defaults (SQLite + embedded broker) in a fresh data dir,
3. creates an API key with `halos keys create`,
4. uploads pairwise feedback over HTTP, runs round 1 (DPO) and, on new feedback, round 2
   continuing from round 1's checkpoint (weights, optimizer and scheduler),
5. shows progress, prints the lineage and per-round metrics, and shuts the server down.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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


def wait_ready(client: httpx.Client, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"halos serve exited early with code {proc.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


def check(resp: httpx.Response) -> dict:
    if resp.status_code >= 400:
        raise SystemExit(f"{resp.request.method} {resp.request.url.path} -> {resp.status_code}: {resp.text}")
    return resp.json()


def wait_for_job(client: httpx.Client, job_id: str, label: str) -> dict:
    with Progress(TextColumn(f"[bold]{label}[/] {{task.fields[status]}}"), BarColumn(),
                  TextColumn("step {task.completed}/{task.total}  loss {task.fields[loss]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(label, total=None, status="queued", loss="-")
        while True:
            job = check(client.get(f"/v1/jobs/{job_id}"))
            p = job["progress"]
            loss = (job.get("latest_metrics") or {}).get("loss")
            progress.update(task, completed=p.get("round_step") or 0, total=p.get("total_steps"),
                            status=job["status"], loss=f"{loss:.4f}" if isinstance(loss, float) else "-")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(1.0)


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
    env = {**os.environ, "HALOS_DATA_DIR": str(data_dir), "HALOS_PORT": str(port),
           "HALOS_HEARTBEAT_INTERVAL_S": "1", "HALOS_SWEEP_INTERVAL_S": "2"}
    env.pop("HALOS_DATABASE_URL", None)
    env.pop("HALOS_BROKER_URL", None)

    console.rule("[bold]halos-server demo")
    model_dir = data_dir / "models" / "tiny-sft"  # <data dir>/models: where models may be registered by default
    subprocess.run([sys.executable, "-m", "halos_core.tiny", str(model_dir)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    console.print(f"built a tiny SFT model in {model_dir}")
    halos("migrate", env=env)
    key = halos("keys", "create", "--project", "demo", env=env).strip()
    console.print(f"created an API key for project 'demo': {key[:12]}…")

    log = open(data_dir / "server.log", "w")
    server = subprocess.Popen([str(BIN / "halos"), "serve", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                              headers={"Authorization": f"Bearer {key}"})
        wait_ready(client, server)
        console.print(f"server ready on http://127.0.0.1:{port} (API docs at /docs; log {data_dir}/server.log)")

        model = check(client.post("/v1/models", json={"name": "tiny-sft", "path": str(model_dir)}))
        console.print(f"registered model {model['id']} sha256 {model['sha256'][:12]}…")

        hp = {"lr": 5e-4, "batch_size": 8, "microbatch_size": 4, "warmup_steps": 4, "max_length": 64,
              "max_prompt_length": 32, "checkpoint_every": 4}
        run = check(client.post("/v1/runs", json={"name": "demo", "model_id": model["id"],
                                                  "loss": {"name": "dpo", "beta": 0.1}, "hyperparams": hp}))

        rounds = []
        for index, (seed, loss) in enumerate([(1, None), (2, {"name": "dpo", "beta": 0.1})], start=1):
            body = to_jsonl_bytes(pairwise_records(64, seed=seed, test_fraction=0.2, id_prefix=f"r{index}-"))
            fb = check(client.post("/v1/feedback", content=body, headers={"Content-Type": "application/x-ndjson"}))
            console.print(f"uploaded feedback {fb['id']}: {fb['n_records']} {fb['kind']} records "
                          f"({fb['n_test']} held out)")
            request = {"feedback_ids": [fb["id"]]}
            if loss:
                request["loss"] = loss
            rnd = check(client.post(f"/v1/runs/{run['id']}/rounds", json=request))
            job = wait_for_job(client, rnd["job_id"], f"round {index}")
            if job["status"] != "succeeded":
                logs = client.get(f"/v1/jobs/{job['id']}/logs").text
                raise SystemExit(f"round {index} {job['status']}: {job.get('error')}\n{logs[-3000:]}")
            rounds.append(job)

        table = Table(title="per-round metrics")
        for col in ("round", "steps", "first loss", "last loss", "reward acc (train, last)",
                    "eval reward acc", "eval margin"):
            table.add_column(col)
        for index, job in enumerate(rounds, start=1):
            series = check(client.get(f"/v1/jobs/{job['id']}/metrics"))["items"]
            train = [m["data"] for m in series if m["split"] == "train"]
            evals = [m["data"] for m in series if m["split"] == "eval"]
            ev = evals[-1] if evals else {}
            table.add_row(str(index), str(len(train)), f"{train[0]['loss']:.4f}", f"{train[-1]['loss']:.4f}",
                          f"{train[-1].get('rewards/accuracy', float('nan')):.2f}",
                          f"{ev.get('rewards/accuracy', float('nan')):.2f}",
                          f"{ev.get('rewards/margin', float('nan')):.4f}")
        console.print(table)

        lineage = check(client.get(f"/v1/checkpoints/{rounds[-1]['checkpoint_id']}/lineage"))
        console.print("[bold]lineage[/] (newest first):")
        for item in lineage["items"]:
            console.print(f"  {item['checkpoint_id']}  round {item['round_index']}  step {item['step']}  "
                          f"loss {item['loss']['name']}  feedback {', '.join(item['feedback_ids'])}")
        root = lineage["model"]
        console.print(f"  {root['id']}  SFT model '{root['name']}'  sha256 {root['sha256'][:12]}…")
        console.print(f"[green]demo finished in {time.monotonic() - started:.0f} s[/]")
        if args.keep:
            console.print("server left running; Ctrl-C to stop")
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

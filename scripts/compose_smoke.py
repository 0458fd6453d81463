"""The compose stack, really started: from a fresh clone to `down -v`, driven as a user would.

    .venv/bin/python scripts/compose_smoke.py [--source DIR] [--keep] [--json OUT]

1. a Docker engine (started here as `dockerd` when none answers and this runs as root) and
   compose (`docker compose` v2 or `docker-compose` 1.29);
2. `git clone` of the source repository's HEAD into a temp dir (committed files only);
3. the base images (scripts/docker/build-base-images.sh: pulled, or Debian stand-ins);
   when containers cannot reach PyPI, a wheelhouse built by the host's pip
   (scripts/docker/build-wheelhouse.sh, torch as the host's pip resolves it) and
   HALOS_WHEELHOUSE=1;
4. `compose build`, then `compose up -d` of docker-compose.yml + docker-compose.cpu.yml with two
   CPU workers (`--scale worker-cpu=2`); migrations run in the `migrate` service; every
   long-running service must become healthy;
5. `compose exec api halos keys create`, a tiny model built in the data volume's models folder
   (`python -m halos_core.tiny /data/models/tiny`) and registered over HTTP (and /etc refused:
   registration is confined by default), two pairwise feedback files uploaded;
6. two chained DPO rounds. Round 1: once its first checkpoint is complete, the worker container
   running it crashes (SIGKILL of the container's init from the host, as the OOM killer would):
   the restart policy brings the container back. Round 2: the container running it gets
   `docker kill` (SIGKILL; Docker does not restart a container stopped by hand): the other
   worker takes the job over after the lease expires, and `compose up -d` starts the killed
   container again. Each round must succeed with exactly 2 attempts, the second resumed from the
   checkpoint complete before the kill, the attempts not overlapping;
7. the lineage (round 2 → round 1 → the model), then `compose down -v`, and nothing of the
   project left (containers, volumes, network).

Prints one line per step with its duration; --json writes the same summary. Exit status: 0 all
passed, 1 a check failed, 77 no Docker engine or no base images here (a skip, not a failure).
The project name is unique per run (HALOS_SMOKE_PROJECT to choose it), the API is published on
127.0.0.1 only, and the image is tagged halos-server:smoke (HALOS_IMAGE to choose it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from halos_core.synthetic import pairwise_records, to_jsonl_bytes  # noqa: E402 - after sys.path names the checkout

SKIP = 77
FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]
WORKER = "worker-cpu"
WORKERS = 2
STEPS = 20
HYPERPARAMS = {
    "lr": 1e-3,
    "batch_size": 8,
    "microbatch_size": 4,
    "warmup_steps": 4,
    "max_length": 64,
    "max_prompt_length": 32,
    "checkpoint_every": 4,
    "seed": 1,
}
HEALTH_TIMEOUT_S = 180
ROUND_TIMEOUT_S = 900


class Unavailable(Exception):
    """No Docker engine or no base images on this machine: the smoke cannot run (exit 77)."""


class Failed(AssertionError):
    pass


def check(cond: Any, what: str) -> None:
    if not cond:
        raise Failed(what)


def run(
    cmd: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    check_rc: bool = True,
    quiet: bool = False,
) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check_rc and out.returncode != 0:
        raise Failed(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    if not quiet and out.stderr.strip() and out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
    return out


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- the engine


def docker_ok() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    )


def ensure_daemon(log_dir: Path) -> str:
    """A Docker engine that answers; started as `dockerd` in the background if needed (root)."""
    if docker_ok():
        return "running"
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        raise Unavailable("no Docker engine: docker/dockerd not installed (Debian: apt-get install docker.io)")
    if os.geteuid() != 0:
        raise Unavailable("no Docker engine answers and starting dockerd needs root")
    log = open(log_dir / "dockerd.log", "ab")
    # its own session: it outlives this script, like a system service would
    subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if docker_ok():
            return f"started dockerd (log {log_dir / 'dockerd.log'})"
        time.sleep(1)
    raise Unavailable(f"dockerd did not come up within 60 s (see {log_dir / 'dockerd.log'})")


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise Unavailable(
        "neither `docker compose` nor `docker-compose` is installed (Debian: apt-get install docker-compose)"
    )


def pypi_reachable_from_containers(image: str) -> bool:
    probe = "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=10)"
    return (
        subprocess.run(
            ["docker", "run", "--rm", image, "python", "-c", probe], capture_output=True, timeout=120
        ).returncode
        == 0
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the stack


class Stack:
    def __init__(self, clone: Path, compose: list[str], project: str, env: dict[str, str], port: int):
        self.clone, self.compose, self.project, self.env, self.port = clone, compose, project, env, port

    def __call__(self, *args: str, timeout: float = 1800, check_rc: bool = True) -> subprocess.CompletedProcess:
        return run(
            [*self.compose, "-p", self.project, *FILES, *args],
            cwd=self.clone,
            env=self.env,
            timeout=timeout,
            check_rc=check_rc,
        )

    def containers(self, service: str | None = None, all_states: bool = False) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = run(["docker", "ps", "-q", "--no-trunc", *(["-a"] if all_states else []), *filters]).stdout
        return out.split()

    def one(self, service: str) -> str:
        ids = self.containers(service)
        check(len(ids) == 1, f"one running {service} container, found {len(ids)}")
        return ids[0]

    def inspect(self, container: str, fmt: str) -> str:
        return run(["docker", "inspect", "-f", fmt, container]).stdout.strip()

    def exec(self, service: str, *cmd: str, timeout: float = 600) -> str:
        return run(["docker", "exec", self.one(service), *cmd], timeout=timeout).stdout

    def sql(self, query: str) -> list[list[str]]:
        out = self.exec("postgres", "psql", "-U", "halos", "-d", "halos", "-tA", "-F", "\t", "-c", query)
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def healthy(self, container: str) -> bool:
        return (
            self.inspect(container, "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}")
            == "running healthy"
        )

    def wait_healthy(self, services: dict[str, int]) -> None:
        for service, count in services.items():
            wait_for(
                lambda: len(ids := self.containers(service)) == count and all(self.healthy(c) for c in ids),
                HEALTH_TIMEOUT_S,
                f"{count} healthy {service} container(s)",
                interval=2,
            )

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": run(["docker", "ps", "-aq", "--filter", label]).stdout.split(),
            "volumes": run(["docker", "volume", "ls", "-q", "--filter", label]).stdout.split(),
            "networks": run(["docker", "network", "ls", "-q", "--filter", label]).stdout.split(),
        }


# --------------------------------------------------------------------------- one round, one kill


def complete_checkpoint_steps(stack: Stack, job_id: str) -> list[int]:
    """Steps of the job's intermediate checkpoints whose manifest (written last) exists."""
    out = run(
        [
            "docker",
            "exec",
            stack.one("api"),
            "sh",
            "-c",
            f"ls -d /data/runs/{job_id}/checkpoints/step-*/meta.json 2>/dev/null || true",
        ]
    ).stdout
    return sorted(int(p.split("/step-")[1].split("/")[0]) for p in out.split())


def last_logged_step(stack: Stack, job_id: str) -> int:
    """The last optimizer step in the run directory's metrics.jsonl (the API's progress lags a heartbeat)."""
    out = run(["docker", "exec", stack.one("api"), "sh", "-c", f"cat /data/runs/{job_id}/metrics.jsonl"]).stdout
    return max((json.loads(line)["step"] for line in out.splitlines() if line.strip()), default=0)


def holder(stack: Stack, job_id: str) -> tuple[str, int]:
    """(container id, attempt) of the job's current attempt: its host column is the container's hostname."""
    rows = stack.sql(f"SELECT host, attempt FROM attempt WHERE job_id = '{job_id}' ORDER BY attempt DESC LIMIT 1")
    check(rows, f"an attempt row for {job_id}")
    host, attempt = rows[0][0], int(rows[0][1])
    for cid in stack.containers(WORKER):
        if cid.startswith(host):
            return cid, attempt
    raise Failed(f"attempt {attempt} of {job_id} runs on {host}, which is no running {WORKER} container")


def job(client: httpx.Client, job_id: str) -> dict:
    resp = client.get(f"/v1/jobs/{job_id}")
    check(resp.status_code == 200, f"GET /v1/jobs/{job_id}: {resp.status_code} {resp.text[:300]}")
    return resp.json()


def wait_terminal(client: httpx.Client, job_id: str) -> dict:
    return wait_for(
        lambda: (j := job(client, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
        ROUND_TIMEOUT_S,
        f"job {job_id} to finish",
        interval=2,
    )


def kill_mid_round(stack: Stack, client: httpx.Client, job_id: str, round_index: int, how: str) -> dict:
    """Wait for the round's first complete checkpoint, SIGKILL the worker container running it
    (`crash`: its init, from the host; `docker-kill`: `docker kill`), follow the recovery.
    Steps count on across rounds: round k ends at step k × STEPS."""
    end_step = round_index * STEPS
    wait_for(lambda: job(client, job_id)["status"] == "running", ROUND_TIMEOUT_S, f"{job_id} running")
    steps = wait_for(
        lambda: complete_checkpoint_steps(stack, job_id),
        ROUND_TIMEOUT_S,
        f"a complete checkpoint of {job_id}",
        interval=0.3,
    )
    container, attempt = holder(stack, job_id)
    check(attempt == 1, f"{job_id} is still on its first attempt when killed (attempt {attempt})")
    init_pid = int(stack.inspect(container, "{{.State.Pid}}"))
    t_kill = time.monotonic()
    if how == "crash":
        os.kill(init_pid, signal.SIGKILL)
    else:
        run(["docker", "kill", container])  # the default signal of `docker kill` is SIGKILL
    # its init gone = every process of its PID namespace gone: nothing of attempt 1 writes any more
    wait_for(
        lambda: int(stack.inspect(container, "{{.State.Pid}}")) != init_pid,
        60,
        "the killed container's init to exit",
        interval=0.1,
    )
    step_at_kill = last_logged_step(stack, job_id)
    check(step_at_kill < end_step, f"killed mid-round (step {step_at_kill}, the round ends at {end_step})")
    ckpt_before = max(complete_checkpoint_steps(stack, job_id))

    if how == "crash":
        # the restart policy starts the same container again, and it becomes healthy
        wait_for(
            lambda: int(stack.inspect(container, "{{.RestartCount}}")) >= 1 and stack.healthy(container),
            HEALTH_TIMEOUT_S,
            "the crashed worker container restarted and healthy",
            interval=1,
        )
        restarted_after = time.monotonic() - t_kill
    else:
        check(stack.inspect(container, "{{.State.Status}}") == "exited", "a killed container stays down")
        restarted_after = None

    done = wait_terminal(client, job_id)
    recovered_after = time.monotonic() - t_kill
    check(done["status"] == "succeeded", f"round {job_id} succeeded after the kill: {done}")
    check(done["attempt"] == 2 and done["progress"]["step"] == end_step, f"2 attempts, up to step {end_step}: {done}")
    rows = stack.sql(
        f"SELECT attempt, host, outcome, coalesce(resumed_from_step, -1), "
        f"extract(epoch from started_at), extract(epoch from ended_at), coalesce(error, '') "
        f"FROM attempt WHERE job_id = '{job_id}' ORDER BY attempt"
    )
    check([r[2] for r in rows] == ["crashed", "succeeded"], f"attempts crashed, succeeded: {rows}")
    check(rows[0][6].startswith("lease expired"), f"attempt 1 ended by its lease: {rows[0][6]}")
    check(float(rows[0][5]) <= float(rows[1][4]), f"attempts do not overlap: {rows}")
    resumed = int(rows[1][3])
    check(
        resumed >= steps[0] and resumed == ckpt_before,
        f"attempt 2 resumed from the last complete checkpoint (step {ckpt_before}), not {resumed}",
    )
    if how == "docker-kill":
        check(not container.startswith(rows[1][1]), "the other worker took the job over")
        stack("up", "-d", "--scale", f"{WORKER}={WORKERS}")  # what an operator runs: the killed one comes back
        stack.wait_healthy({WORKER: WORKERS})
        check(stack.healthy(container), "`compose up -d` started the killed container again")
    return {
        "kill": how,
        "killed_at_step": step_at_kill,
        "checkpoint_before_kill": ckpt_before,
        "resumed_from_step": resumed,
        "attempt_hosts": [rows[0][1], rows[1][1]],
        "restarted_after_s": None if restarted_after is None else round(restarted_after, 1),
        "recovered_after_s": round(recovered_after, 1),
    }


# --------------------------------------------------------------------------- main


def smoke(source: Path, work: Path, keep: bool, steps: list[dict]) -> dict:
    def step(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        value = fn()
        entry = {"step": name, "seconds": round(time.monotonic() - t0, 1)}
        if isinstance(value, dict):
            entry.update(value)
        steps.append(entry)
        print(
            f"[{entry['seconds']:7.1f} s] {name}" + (f"  {json.dumps(value)}" if isinstance(value, dict) else ""),
            flush=True,
        )
        return value

    step("docker engine", lambda: {"engine": ensure_daemon(work)})
    compose = compose_command()
    clone = work / "halos-server"

    def fresh_clone() -> dict:
        run(["git", "clone", "--quiet", str(source), str(clone)])
        return {
            "head": run(["git", "-C", str(clone), "log", "-1", "--format=%h %s"]).stdout.strip(),
            "compose": " ".join(compose),
        }

    step("fresh clone", fresh_clone)

    def base_images() -> dict:
        out = run(["scripts/docker/build-base-images.sh"], cwd=clone, check_rc=False)
        if out.returncode != 0:
            raise Unavailable(f"base images could not be pulled nor built:\n{out.stdout[-1500:]}{out.stderr[-1500:]}")
        return {"images": out.stdout.strip().splitlines()[-3:]}

    step("base images", base_images)

    project = os.environ.get("HALOS_SMOKE_PROJECT") or f"halossmoke{os.getpid()}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HALOS_")}
    env.update(
        {"HALOS_API_PORT": f"127.0.0.1:{port}", "HALOS_IMAGE": os.environ.get("HALOS_IMAGE", "halos-server:smoke")}
    )

    def wheelhouse() -> dict:
        if pypi_reachable_from_containers("python:3.11-slim-bookworm"):
            return {"pip_in_build": "PyPI"}
        run(["scripts/docker/build-wheelhouse.sh"], cwd=clone, env={**env, "PYTHON": sys.executable})
        env["HALOS_WHEELHOUSE"] = "1"
        torch_wheel = next(p.name for p in (clone / "wheelhouse").glob("torch-*.whl"))
        return {"pip_in_build": "wheelhouse (containers cannot reach PyPI)", "torch": torch_wheel}

    step("python packages for the image", wheelhouse)

    stack = Stack(clone, compose, project, env, port)
    step("compose build", lambda: {"image": env["HALOS_IMAGE"], "rc": stack("build").returncode})
    try:
        step("compose up -d", lambda: {"rc": stack("up", "-d", "--scale", f"{WORKER}={WORKERS}").returncode})
        step("healthy", lambda: stack.wait_healthy({"postgres": 1, "redis": 1, "api": 1, WORKER: WORKERS}))

        def migrated() -> dict:
            migrate = stack.containers("migrate", all_states=True)
            check(len(migrate) == 1 and stack.inspect(migrate[0], "{{.State.ExitCode}}") == "0", "migrate exited 0")
            revision = stack.sql("SELECT version_num FROM alembic_version")
            check(revision, "alembic_version has a revision")
            return {"revision": revision[0][0], "gpu_worker_started": bool(stack.containers("worker", all_states=True))}

        info = step("migrations", migrated)
        check(not info["gpu_worker_started"], "the CPU override leaves the GPU worker out")

        created: dict[str, str] = {}

        def make_key() -> dict:
            created["key"] = stack("exec", "-T", "api", "halos", "keys", "create", "--project", "smoke").stdout.strip()
            check(created["key"].startswith("hk_"), f"a key alone on stdout: {created['key'][:8]}…")
            return {"prefix": created["key"][:8]}  # never the secret itself

        step("halos keys create", make_key)
        key = created["key"]
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=120, headers={"Authorization": f"Bearer {key}"}
        )

        step(
            "tiny model in the data volume",
            lambda: {
                "rc": stack("exec", "-T", "api", "python", "-m", "halos_core.tiny", "/data/models/tiny").returncode
            },
        )

        def register() -> dict:
            refused = client.post("/v1/models", json={"name": "etc", "path": "/etc"})
            check(
                refused.status_code == 422 and refused.json()["error"]["code"] == "model_path_not_allowed",
                f"/etc refused by default: {refused.status_code} {refused.text[:300]}",
            )
            resp = client.post("/v1/models", json={"name": "tiny", "path": "/data/models/tiny"})
            check(resp.status_code == 201, f"register /data/models/tiny: {resp.status_code} {resp.text[:300]}")
            return {"model": resp.json()["id"], "sha256": resp.json()["sha256"][:12], "refused_etc": 422}

        model = step("register the model", register)

        def feedback() -> dict:
            ids = []
            for seed in (1, 2):
                body = to_jsonl_bytes(pairwise_records(STEPS * HYPERPARAMS["batch_size"], seed=seed))
                resp = client.post("/v1/feedback", content=body, headers={"Content-Type": "application/x-ndjson"})
                check(resp.status_code == 201, f"upload: {resp.status_code} {resp.text[:300]}")
                check(resp.json()["kind"] == "pairwise", f"pairwise feedback: {resp.json()}")
                ids.append(resp.json()["id"])
            return {"feedback": ids}

        fb = step("upload pairwise feedback", feedback)["feedback"]

        def submit() -> dict:
            run_resp = client.post(
                "/v1/runs",
                json={"model_id": model["model"], "loss": {"name": "dpo", "beta": 0.1}, "hyperparams": HYPERPARAMS},
            )
            check(run_resp.status_code == 201, f"create run: {run_resp.text[:300]}")
            run_id = run_resp.json()["id"]
            jobs = []
            for fb_id in fb:  # round 2 right behind round 1: it waits, then starts from round 1's checkpoint
                r = client.post(f"/v1/runs/{run_id}/rounds", json={"feedback_ids": [fb_id]})
                check(r.status_code == 201, f"submit round: {r.status_code} {r.text[:300]}")
                jobs.append(r.json()["job_id"])
            check(job(client, jobs[1])["status"] == "waiting", "round 2 waits for round 1")
            return {"run": run_id, "jobs": jobs}

        rounds = step("create run, submit 2 chained DPO rounds", submit)

        step(
            "round 1: worker container crashes mid-round",
            lambda: kill_mid_round(stack, client, rounds["jobs"][0], 1, "crash"),
        )
        step(
            "round 2: docker kill of its worker mid-round",
            lambda: kill_mid_round(stack, client, rounds["jobs"][1], 2, "docker-kill"),
        )

        def lineage() -> dict:
            j1, j2 = job(client, rounds["jobs"][0]), job(client, rounds["jobs"][1])
            resp = client.get(f"/v1/checkpoints/{j2['checkpoint_id']}/lineage")
            check(resp.status_code == 200, f"lineage: {resp.text[:300]}")
            items = resp.json()["items"]
            check(
                [i["checkpoint_id"] for i in items] == [j2["checkpoint_id"], j1["checkpoint_id"]],
                f"lineage round 2 → round 1: {items}",
            )
            check([i["feedback_ids"] for i in items] == [[fb[1]], [fb[0]]], "each round's feedback in the lineage")
            check(resp.json()["model"]["id"] == model["model"], "the lineage ends at the registered model")
            check(items[0]["step"] == 2 * STEPS and items[1]["step"] == STEPS, f"steps carry on: {items}")
            return {
                "lineage": [i["checkpoint_id"] for i in items] + [model["model"]],
                "steps": [i["step"] for i in items],
            }

        step("lineage", lineage)
        client.close()
    finally:
        if not keep:
            step("compose down -v", lambda: {"rc": stack("down", "-v", "--remove-orphans", timeout=300).returncode})
    if not keep:
        left = stack.leftovers()
        check(not any(left.values()), f"nothing of the project left after down -v: {left}")
    return {"project": project}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT), help="repository to clone (its HEAD); default: this one")
    parser.add_argument("--keep", action="store_true", help="leave the stack running (no down -v)")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    steps: list[dict] = []
    summary: dict[str, Any] = {"steps": steps}
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="halos-compose-smoke-"))
    try:
        summary.update(smoke(Path(args.source).resolve(), work, args.keep, steps))
        summary["result"], code = "passed", 0
    except Unavailable as exc:
        summary["result"], summary["reason"], code = "skipped", str(exc), SKIP
    except (Failed, subprocess.TimeoutExpired, httpx.HTTPError) as exc:
        summary["result"], summary["reason"], code = "failed", f"{type(exc).__name__}: {exc}", 1
    finally:
        summary["seconds"] = round(time.monotonic() - t0, 1)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{summary['result']} in {summary['seconds']} s" + (f": {summary['reason']}" if "reason" in summary else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())

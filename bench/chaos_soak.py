"""Chaos soak (issue 10): a Postgres + Redis deployment under random faults, checked against
docs/RELIABILITY.md's invariants. Not a CI test (tests/e2e/test_chaos_soak.py runs a short variant).

What runs: a PRIVATE Postgres cluster (initdb into a temp dir, its own port) and a PRIVATE Redis
(its own port, no persistence), so restarting them never touches anything else on the machine;
2 `halos serve --no-worker` API processes and 2 `halos worker` processes (the real trainer:
`accelerate launch` subprocesses), all on a data dir that is a small tmpfs when mounting is
permitted. A load thread keeps several runs busy with tiny rounds (4 optimizer steps): uploads
with an Idempotency-Key (some sent twice: the replay must return the same id), rounds chained
(round 2 submitted behind round 1), some cancelled by the client after a random delay. Every
client call goes to a random API process and is retried with the same Idempotency-Key on a
transport error or a 5xx (an API process may be dead for a moment).

A scheduler injects one fault per trial at a random moment, acting like a supervisor afterwards
(a killed worker / API process is started again, as compose's `restart:` would), waits for
recovery and records it. Fault kinds: worker-sigkill, trainer-sigkill (a rank of `accelerate
launch`), api-sigkill, worker-sigterm (warm shutdown), redis-restart, pg-restart
(`pg_ctl restart -m fast`), pg-terminate (`pg_terminate_backend` of every halos connection),
disk-full (the tmpfs data dir filled to the last byte for a few seconds). A clock jump is not a
fault here (libfaketime breaks `time.sleep` in a process whose monotonic clock stays real); leases
use the database's clock, and tests/server/test_jobs.py shifts a real worker's clock instead.

Columns (per fault kind; a job is charged to the last fault injected while it was unfinished or
accepted while that fault was being injected):
  lost     accepted job (2xx) that is missing, or ended failed/cancelled although neither it nor
           its parent round was cancelled by the client (a disk-full trial's job that failed with
           a storage reason is counted under `failed_reason`, not lost)
  doubled  job with two attempts training at the same time: overlapping attempt rows (I2), or
           live processes of two attempts of the job seen by the /proc sampler at one moment
  orphans  processes of an attempt (environment markers) alive after the kill grace although
           their job is finished or has moved to another attempt, or a watchdog whose runner died
           still alive after the grace (I6)
  stuck    not terminal at the end of the drain deadline (I1)
  corrupt  checkpoint the database calls whole / optimizer_pruned that fails
           read_manifest(verify=True) (I4, I8)
  recovery seconds from the injection until every job running at that moment advanced again
           (a higher step or attempt, or terminal); median / max

    .venv/bin/python bench/chaos_soak.py --trials 20 --duration 3600
    .venv/bin/python bench/chaos_soak.py --faults worker-sigkill,pg-restart --trials 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from halos_core.run_dir import CheckpointError, read_manifest  # noqa: E402 - after the sys.path line
from halos_core.synthetic import pairwise_records, to_jsonl_bytes  # noqa: E402 - after the sys.path line
from worker.monitor import ENV_ATTEMPT, ENV_JOB  # noqa: E402 - after the sys.path line
from worker.watchdog import proc_stat, read_environ  # noqa: E402 - after the sys.path line

BIN = Path(sys.executable).parent
FAULTS = (
    "worker-sigkill",
    "trainer-sigkill",
    "api-sigkill",
    "worker-sigterm",
    "redis-restart",
    "pg-restart",
    "pg-terminate",
    "disk-full",
)
TERMINAL = ("succeeded", "failed", "cancelled")
HYPERPARAMS = {
    "lr": 5e-4,
    "batch_size": 8,
    "microbatch_size": 4,
    "warmup_steps": 2,
    "max_length": 64,
    "max_prompt_length": 32,
    "checkpoint_every": 2,
}
RECORDS = 32  # → 4 optimizer steps per round
KILL_GRACE_S = 2.0
ENV = {  # short recovery timings, as the fault tests use (defaults: 60/5/10/30 s)
    "HALOS_LEASE_TTL_S": "4",
    "HALOS_HEARTBEAT_INTERVAL_S": "0.5",
    "HALOS_SWEEP_INTERVAL_S": "0.5",
    "HALOS_KILL_GRACE_S": str(KILL_GRACE_S),
    "HALOS_RETRY_BACKOFF_S": "0.2",
    "HALOS_REPUBLISH_AFTER_S": "2",
    # faults are injected on purpose and often: a job may be hit several times; Q6 (give up after
    # max_attempts) is not what this soak measures
    "HALOS_MAX_ATTEMPTS": "20",
    "HALOS_STORAGE_RESERVE_BYTES": str(1 << 20),
    # the sweeper's storage pass as a deployment runs it (default 300 s), more often: it also trims
    # the reference cache and removes the intermediates of rounds whose worker was killed
    "HALOS_RETENTION_INTERVAL_S": "60",
    "PYTHONUNBUFFERED": "1",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


# ---------------------------------------------------------------- private Postgres and Redis


class PrivatePostgres:
    """A throw-away cluster (initdb, run as the `postgres` user when we are root) on its own port."""

    def __init__(self, root: Path):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        self.bin = bins[-1] if bins else Path(shutil.which("pg_ctl") or "pg_ctl").parent
        self.dir = root / "pg"
        self.sock = root / "pgsock"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/halos"

    def _as_pg(self, *cmd: str) -> None:
        full = [str(self.bin / cmd[0]), *cmd[1:]]
        if os.geteuid() == 0:
            full = ["runuser", "-u", "postgres", "--", *full]
        subprocess.run(full, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        self.sock.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.sock, "postgres")
            os.chmod(self.dir.parent, 0o755)
        self._as_pg("initdb", "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._ctl("start")
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE halos")

    def _ctl(self, action: str) -> None:
        opts = f"-p {self.port} -k {self.sock} -c fsync=off -c max_connections=200"
        # -l: the server must not inherit our pipes (pg_ctl's caller would wait for their EOF forever)
        logfile = str(self.sock / "postgres.log")
        self._as_pg("pg_ctl", "-D", str(self.dir), "-l", logfile, "-o", opts, "-w", "-t", "60", "-m", "fast", action)

    def restart(self) -> None:
        self._ctl("restart")

    def terminate_backends(self) -> int:
        with psycopg.connect(self.url, autocommit=True) as c:
            rows = c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'halos' AND pid <> pg_backend_pid()"
            ).fetchall()
        return len(rows)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._ctl("stop")


class PrivateRedis:
    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.root = root
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log_fh = open(self.root / "redis.log", "a")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise RuntimeError("private redis did not start")

    def restart(self) -> None:
        self.stop()
        time.sleep(0.5)
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- the deployment


class Deployment:
    def __init__(self, root: Path, data_dir: Path, env: dict[str, str], n_api: int, n_workers: int):
        self.root, self.data_dir, self.env = root, data_dir, env
        self.api_ports = [free_port() for _ in range(n_api)]
        self.apis: list[subprocess.Popen | None] = [None] * n_api
        self.workers: list[subprocess.Popen | None] = [None] * n_workers
        self.worker_pids: set[int] = set()  # every runner pid ever (watchdogs name theirs)
        self.lock = threading.Lock()
        self.key = ""
        self.spawned = 0

    def halos(self, *args: str) -> str:
        out = subprocess.run([str(BIN / "halos"), *args], env=self.env, capture_output=True, text=True, timeout=300)
        if out.returncode:
            raise RuntimeError(f"halos {' '.join(args)}: {out.stdout}\n{out.stderr}")
        return out.stdout

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        self.spawned += 1
        fh = open(self.root / f"{name}.{self.spawned}.log", "w")
        return subprocess.Popen(
            [str(BIN / "halos"), *args], env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_api(self, i: int) -> None:
        self.apis[i] = self._spawn(["serve", "--no-worker", "--no-migrate", "--port", str(self.api_ports[i])], "api")

    def start_worker(self, i: int) -> None:
        proc = self._spawn(["worker"], "worker")
        self.workers[i] = proc
        self.worker_pids.add(proc.pid)

    def start(self) -> None:
        self.halos("migrate")
        self.key = self.halos("keys", "create", "--project", "soak").strip()
        for i in range(len(self.apis)):
            self.start_api(i)
        for i in range(len(self.workers)):
            self.start_worker(i)
        for port in self.api_ports:
            self.wait_ready(port)

    def wait_ready(self, port: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=3).status_code == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"API on {port} not ready")

    def stop(self) -> None:
        procs = [p for p in self.apis + self.workers if p is not None]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# ---------------------------------------------------------------- the client load


@dataclass
class JobRecord:
    job_id: str
    run_id: str
    client_cancelled: bool = False
    parent: str | None = None  # the job of the round submitted just before it (chained)
    faults: list[int] = field(default_factory=list)  # trials injected while it was unfinished
    accepted_at: float = field(default_factory=time.monotonic)


class Load:
    """Streams of tiny rounds through random API processes; every accepted job recorded."""

    def __init__(self, dep: Deployment, model_dir: Path, streams: int, seed: int):
        self.dep, self.model_dir, self.streams = dep, model_dir, streams
        self.rng = random.Random(seed)
        self.jobs: dict[str, JobRecord] = {}
        self.idem_replays = 0
        self.new_runs = 0  # a round refused with 409 (latest round failed / cancelled): a new run instead
        self.idem_mismatch: list[str] = []
        self.client_errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def call(self, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
        """Retried on transport errors / 5xx (an API process may be down) with the same key."""
        headers = {"Authorization": f"Bearer {self.dep.key}", **kw.pop("headers", {})}
        if key:
            headers["Idempotency-Key"] = key
        deadline = time.monotonic() + 180
        while True:
            port = random.choice(self.dep.api_ports)
            try:
                resp = httpx.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, timeout=30, **kw)
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp
            except httpx.TransportError:
                resp = None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method} {path}: gave up ({resp.status_code if resp else 'no answer'})")
            time.sleep(0.5)

    def setup(self) -> list[str]:
        model = self.call("POST", "/v1/models", key="model", json={"name": "tiny", "path": str(self.model_dir)})
        assert model.status_code in (200, 201), model.text
        self.model_id = model.json()["id"]
        return [self.new_run() for _ in range(self.streams)]

    def upload(self, seed: int) -> str:
        body = to_jsonl_bytes(pairwise_records(RECORDS, seed=seed, id_prefix="p"))
        key = f"fb-{seed}-{secrets.token_hex(4)}"
        headers = {"Content-Type": "application/x-ndjson"}
        first = self.call("POST", "/v1/feedback", key=key, content=body, headers=headers)
        assert first.status_code in (200, 201), first.text
        if self.rng.random() < 0.4:  # the client "lost the answer" and retries: same key, same body
            again = self.call("POST", "/v1/feedback", key=key, content=body, headers=headers)
            with self.lock:
                self.idem_replays += 1
                if again.json().get("id") != first.json()["id"]:
                    self.idem_mismatch.append(key)
        return first.json()["id"]

    def new_run(self) -> str:
        body = {"model_id": self.model_id, "loss": {"name": "dpo", "beta": 0.1}, "hyperparams": HYPERPARAMS}
        r = self.call("POST", "/v1/runs", key=f"run-{secrets.token_hex(6)}", json=body)
        assert r.status_code in (200, 201), r.text
        return r.json()["id"]

    def submit(self, run_id: str, fb_id: str, parent: str | None) -> str | None:
        key = f"round-{secrets.token_hex(6)}"
        r = self.call("POST", f"/v1/runs/{run_id}/rounds", key=key, json={"feedback_ids": [fb_id]})
        if r.status_code == 409:  # the run's latest round failed / was cancelled: the user starts a new run
            with self.lock:
                self.new_runs += 1
            return None
        if r.status_code != 201 and r.status_code != 200:
            with self.lock:
                self.client_errors.append(f"round: {r.status_code} {r.text[:200]}")
            return None
        job_id = r.json()["job_id"]
        with self.lock:
            self.jobs[job_id] = JobRecord(job_id, run_id, parent=parent)
        return job_id

    def status(self, job_id: str) -> str:
        return self.call("GET", f"/v1/jobs/{job_id}").json()["status"]

    def stream(self, run_id: str, n: int) -> None:
        seed = n * 1000
        while not self.stop.is_set():
            try:
                seed += 1
                chained = self.rng.random() < 0.5
                j1 = self.submit(run_id, self.upload(seed), None)
                if j1 is None:
                    run_id = self.new_run()
                    continue
                jobs = [j1]
                if chained and j1:
                    seed += 1
                    jobs.append(self.submit(run_id, self.upload(seed), j1))
                if self.rng.random() < 0.2 and j1:  # the client cancels round 1 after a moment
                    time.sleep(self.rng.uniform(0.5, 15))
                    resp = self.call("POST", f"/v1/jobs/{j1}/cancel")
                    if resp.status_code == 202:
                        with self.lock:
                            self.jobs[j1].client_cancelled = True
                deadline = time.monotonic() + 600
                for j in jobs:
                    while j and not self.stop.is_set() and time.monotonic() < deadline:
                        if self.status(j) in TERMINAL:
                            break
                        time.sleep(1)
            except Exception as exc:  # a load error is recorded and the stream goes on
                with self.lock:
                    self.client_errors.append(repr(exc)[:300])
                time.sleep(1)

    def start(self, run_ids: list[str]) -> None:
        for n, run_id in enumerate(run_ids):
            t = threading.Thread(target=self.stream, args=(run_id, n), daemon=True)
            t.start()
            self.threads.append(t)


# ---------------------------------------------------------------- observation


def marked_processes(job_ids: set[str]) -> list[tuple[int, str, int]]:
    """(pid, job, attempt) of every live process carrying an attempt's markers, for our jobs."""
    out = []
    for pid in all_pids():
        env = read_environ(pid)
        job = env.get(ENV_JOB)
        if job in job_ids and live(pid):
            out.append((pid, job, int(env.get(ENV_ATTEMPT, "0"))))
    return out


class Sampler(threading.Thread):
    """Every 0.3 s: do two attempts of one job have live trainer processes at the same moment?"""

    def __init__(self, load: Load):
        super().__init__(daemon=True)
        self.load = load
        self.doubled: dict[str, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with self.load.lock:
                ids = set(self.load.jobs)
            per_job: dict[str, set[int]] = {}
            for pid, job, attempt in marked_processes(ids):
                if "halos_core.train" in " ".join(cmdline(pid)):
                    per_job.setdefault(job, set()).add(attempt)
            for job, atts in per_job.items():
                if len(atts) > 1:
                    self.doubled.setdefault(job, f"live trainer processes of attempts {sorted(atts)}")
            time.sleep(0.3)


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def deleted_open_bytes(data_dir: Path) -> tuple[int, list[int]]:
    """Space held by files under `data_dir` that were deleted while a process still has them open
    (it comes back only when the process closes them or dies), and those processes."""
    held, pids, seen = 0, set(), set()
    for pid in all_pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(str(data_dir)) and target.endswith(" (deleted)"):
                        st = os.stat(f"/proc/{pid}/fd/{fd}")
                        pids.add(pid)
                        if (st.st_dev, st.st_ino) not in seen:
                            seen.add((st.st_dev, st.st_ino))
                            held += st.st_blocks * 512
    return held, sorted(pids)


def disk_usage_line(data_dir: Path) -> str:
    """Where the data dir's space is: free, each top-level folder, and deleted-but-open files."""
    st = os.statvfs(data_dir)
    parts = {d.name: tree_bytes(d) for d in sorted(data_dir.iterdir()) if d.is_dir()}
    held, pids = deleted_open_bytes(data_dir)
    mib = 1 << 20
    used = ", ".join(f"{name} {size / mib:.0f}" for name, size in parts.items())
    return (
        f"data dir: {st.f_bavail * st.f_frsize / mib:.0f} MiB free; MiB used by {used}; "
        f"deleted but still open {held / mib:.0f} MiB (pids {pids[:8]})"
    )


class DiskWatch(threading.Thread):
    """Logs where the data dir's space goes, every `interval` s: a round refused for space with no
    disk-full trial running is then explained by a figure, not inferred."""

    def __init__(self, data_dir: Path, interval: float = 120.0):
        super().__init__(daemon=True)
        self.data_dir, self.interval = data_dir, interval
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(OSError):
                log(disk_usage_line(self.data_dir))


def db_rows(url: str, sql: str, args: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, connect_timeout=5) as c:
        return c.execute(sql, args).fetchall()


def jobs_snapshot(url: str) -> dict[str, tuple[str, int, int]]:
    return {r[0]: (r[1], r[2], r[3]) for r in db_rows(url, "SELECT id, status, step, attempt FROM job")}


@dataclass
class Trial:
    n: int
    fault: str
    t_inject: float
    detail: str = ""
    recovery_s: float | None = None
    orphans: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.root = Path(tempfile.mkdtemp(prefix="halos-chaos-"))
        os.chmod(self.root, 0o755)
        self.data_dir = self.root / "data"
        self.data_dir.mkdir()
        self.tmpfs = False
        self.pg = PrivatePostgres(self.root)
        self.redis = PrivateRedis(self.root)
        self.trials: list[Trial] = []
        self.orphan_log: list[str] = []
        self.disk_watch = DiskWatch(self.data_dir)

    # --- setup / teardown
    def setup(self) -> None:
        if "disk-full" in self.args.faults:
            res = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.args.tmpfs_mb}m", "tmpfs", str(self.data_dir)],
                capture_output=True,
                text=True,
            )
            self.tmpfs = res.returncode == 0
            if not self.tmpfs:
                log(f"mounting a tmpfs data dir is not permitted ({res.stderr.strip()}): disk-full dropped")
                self.args.faults = [f for f in self.args.faults if f != "disk-full"]
        self.pg.start()
        self.redis.start()
        model_dir = self.root / "sft" / "tiny"
        subprocess.run([sys.executable, "-m", "halos_core.tiny", str(model_dir)], check=True, capture_output=True)
        env = {
            **os.environ,
            **ENV,
            "HALOS_DATA_DIR": str(self.data_dir),
            "HALOS_DATABASE_URL": self.pg.url,
            "HALOS_BROKER_URL": self.redis.url,
            "HALOS_MODEL_ROOTS": str(model_dir.parent),
        }
        self.dep = Deployment(self.root, self.data_dir, env, n_api=2, n_workers=self.args.workers)
        self.dep.start()
        self.load = Load(self.dep, model_dir, self.args.streams, self.args.seed)
        self.load.start(self.load.setup())
        self.sampler = Sampler(self.load)
        self.sampler.start()
        self.disk_watch.start()

    def teardown(self) -> None:
        self.load.stop.set()
        self.sampler.stop.set()
        self.disk_watch.stop.set()
        with contextlib.suppress(OSError):
            log(f"at the end: {disk_usage_line(self.data_dir)}")
        self.dep.stop()
        # any training process of ours still alive at the very end is an orphan too
        for pid, job, attempt in marked_processes(set(self.load.jobs)):
            self.orphan_log.append(f"at teardown: pid {pid} of {job} attempt {attempt}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.redis.stop()
        self.pg.stop()
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.data_dir)], check=False)
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- faults
    def running_jobs(self) -> dict[str, tuple[str, int, int]]:
        return {j: v for j, v in jobs_snapshot(self.pg.url).items() if v[0] == "running"}

    def wait_running(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.running_jobs():
                    return
            time.sleep(0.3)

    def inject(self, fault: str) -> str:
        dep = self.dep
        if fault in ("worker-sigkill", "worker-sigterm"):
            i = self.rng.randrange(len(dep.workers))
            proc = dep.workers[i]
            sig = signal.SIGKILL if fault == "worker-sigkill" else signal.SIGTERM
            os.kill(proc.pid, sig)  # the runner only: its training is the watchdog's / runner's business
            if fault == "worker-sigterm":
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    return f"worker {proc.pid} did not exit within 60 s of SIGTERM"
            else:
                proc.wait()
            dep.start_worker(i)  # the supervisor restarts it
            return f"worker {proc.pid} (replaced by {dep.workers[i].pid})"
        if fault == "trainer-sigkill":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ranks = [
                    (pid, job)
                    for pid, job, _ in marked_processes(set(self.load.jobs))
                    if "halos_core.train" in " ".join(cmdline(pid)) and "accelerate" not in " ".join(cmdline(pid))
                ]
                if ranks:
                    pid, job = self.rng.choice(ranks)
                    os.kill(pid, signal.SIGKILL)
                    return f"rank {pid} of {job}"
                time.sleep(0.2)
            return "no trainer rank found within 60 s"
        if fault == "api-sigkill":
            i = self.rng.randrange(len(dep.apis))
            proc = dep.apis[i]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            dep.start_api(i)
            dep.wait_ready(dep.api_ports[i])
            return f"api {proc.pid}"
        if fault == "redis-restart":
            self.redis.restart()
            return "redis"
        if fault == "pg-restart":
            self.pg.restart()
            return "postgres"
        if fault == "pg-terminate":
            return f"{self.pg.terminate_backends()} backends terminated"
        if fault == "disk-full":
            filler = self.data_dir / "filler.bin"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for size in (1 << 20, 4096, 1):  # unbuffered, down to the last byte
                    with contextlib.suppress(OSError):
                        while os.write(fd, b"\0" * size):
                            pass
            finally:
                os.close(fd)
            time.sleep(self.rng.uniform(2, 6))
            filler.unlink()
            return "data dir full for a few seconds"
        raise ValueError(fault)

    def recovery(self, before: dict[str, tuple[str, int, int]], t0: float, timeout: float) -> float | None:
        """Seconds until every job running at the injection advanced (step/attempt) or ended."""
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            try:
                now = jobs_snapshot(self.pg.url)
            except Exception:  # Postgres may be restarting: keep polling
                time.sleep(0.3)
                continue
            pending = [
                j
                for j, (_, step, att) in before.items()
                if not (
                    now.get(j, ("?",))[0] in TERMINAL
                    or (now[j][0] == "running" and (now[j][1] > step or now[j][2] > att))
                )
            ]
            if not pending:
                return time.monotonic() - t0
            time.sleep(0.3)
        return None

    def check_orphans(self) -> list[str]:
        """Processes of finished jobs / superseded attempts, and watchdogs of dead runners, still
        alive after the kill grace (checked twice, the grace apart)."""

        def suspects() -> set[tuple[int, str]]:
            snap = jobs_snapshot(self.pg.url)
            out = set()
            for pid, job, attempt in marked_processes(set(self.load.jobs)):
                status, _, current = snap.get(job, ("?", 0, 0))
                if status in TERMINAL or attempt != current:
                    out.add((pid, f"{job} attempt {attempt} ({status}, current {current})"))
            for pid in all_pids():
                c = cmdline(pid)
                if c[1:3] == ["-m", "worker.watchdog"] and len(c) > 3 and c[3].isdigit():
                    runner = int(c[3])
                    if runner in self.dep.worker_pids and not live(runner) and live(pid):
                        out.add((pid, f"watchdog of dead runner {runner}"))
            return out

        first = suspects()
        if not first:
            return []
        time.sleep(KILL_GRACE_S + 3)
        return [f"pid {pid}: {what}" for pid, what in first & suspects() if live(pid)]

    def run_trials(self) -> None:
        faults = list(self.args.faults)
        plan = []
        for _ in range(self.args.trials):  # shuffled blocks of every kind: a --duration cut stays balanced
            block = faults[:]
            self.rng.shuffle(block)
            plan += block
        t_end = time.monotonic() + self.args.duration
        for n, fault in enumerate(plan, 1):
            if time.monotonic() > t_end:
                log(f"duration reached after {n - 1} trials")
                break
            self.wait_running()
            time.sleep(self.rng.uniform(0, 4))  # a random moment of the running rounds
            try:
                before = self.running_jobs()
            except Exception:  # not expected: Postgres is up between trials
                before = {}
            unfinished = {j for j, v in jobs_snapshot(self.pg.url).items() if v[0] not in TERMINAL}
            t0 = time.monotonic()
            trial = Trial(n, fault, t0)
            trial.detail = self.inject(fault)
            injected = time.monotonic()
            with self.load.lock:
                for j, rec in self.load.jobs.items():
                    # unfinished when the fault began, or accepted while it lasted (a round accepted
                    # while the disk was full fails its launch check at once: it was never "running")
                    if j in unfinished or t0 <= rec.accepted_at <= injected:
                        rec.faults.append(n)
            trial.recovery_s = self.recovery(before, t0, timeout=180)
            trial.orphans = self.check_orphans()
            self.orphan_log += [f"trial {n} ({fault}): {o}" for o in trial.orphans]
            self.trials.append(trial)
            rec = f"{trial.recovery_s:.1f}s" if trial.recovery_s is not None else "NOT RECOVERED"
            log(f"trial {n} {fault}: {trial.detail}; {len(before)} running; recovery {rec}; orphans {trial.orphans}")

    def drain(self) -> None:
        self.load.stop.set()
        deadline = time.monotonic() + self.args.drain
        while time.monotonic() < deadline:
            ids = set(self.load.jobs)
            snap = jobs_snapshot(self.pg.url)
            if all(snap.get(j, ("?",))[0] in TERMINAL for j in ids):
                return
            time.sleep(1)
        # after the drain every job is finished: any attempt process still alive past the grace is
        # an orphan
        self.orphan_log += [f"at end: {o}" for o in self.check_orphans()]

    # --- the verdict
    def report(self) -> int:
        url = self.pg.url
        snap = {r[0]: (r[1], r[2] or "") for r in db_rows(url, "SELECT id, status, error FROM job")}
        attempts: dict[str, list[tuple]] = {}
        for job, att, started, ended in db_rows(
            url, "SELECT job_id, attempt, started_at, ended_at FROM attempt ORDER BY job_id, started_at"
        ):
            attempts.setdefault(job, []).append((att, started, ended))
        trial_fault = {t.n: t.fault for t in self.trials}
        kinds = list(dict.fromkeys(t.fault for t in self.trials))
        rows = {k: dict(trials=0, lost=0, doubled=0, orphans=0, stuck=0, corrupt=0, failed_reason=0) for k in kinds}
        rows["(no fault)"] = dict(trials=0, lost=0, doubled=0, orphans=0, stuck=0, corrupt=0, failed_reason=0)
        problems: list[str] = []
        notes: list[str] = []
        for t in self.trials:
            rows[t.fault]["trials"] += 1
            rows[t.fault]["orphans"] += len(t.orphans)
        for o in self.orphan_log:
            if o.startswith("at end"):
                rows["(no fault)"]["orphans"] += 1
                problems.append(o)
        cancelled_by_client = {j for j, r in self.load.jobs.items() if r.client_cancelled}

        def excused(j: str) -> bool:
            r = self.load.jobs[j]
            return j in cancelled_by_client or (r.parent is not None and excused(r.parent))

        for j, rec in self.load.jobs.items():
            kind = trial_fault[rec.faults[-1]] if rec.faults else "(no fault)"
            status, error = snap.get(j, ("missing", ""))
            if status not in TERMINAL:
                rows[kind]["stuck"] += 1
                problems.append(f"stuck {j}: {status}")
            elif status != "succeeded" and not excused(j):
                disk = any(trial_fault[n] == "disk-full" for n in rec.faults)
                if disk and status == "failed" and any(s in error.lower() for s in ("space", "storage", "enospc")):
                    rows[kind]["failed_reason"] += 1
                    notes.append(f"failed with a reason {j}: {error[:200]}")
                else:
                    rows[kind]["lost"] += 1
                    problems.append(f"lost {j}: {status} {error[:200]}")
            atts = attempts.get(j, [])
            overlap = any(a[2] is None or a[2] > b[1] for a, b in zip(atts, atts[1:]))
            if overlap or j in self.sampler.doubled:
                rows[kind]["doubled"] += 1
                problems.append(f"doubled {j}: {self.sampler.doubled.get(j, 'overlapping attempt rows')}")
        for ckpt, job, path, state in db_rows(url, "SELECT id, job_id, path, state FROM checkpoint"):
            if state not in ("whole", "optimizer_pruned"):
                continue
            p = Path(path) if Path(path).is_absolute() else self.data_dir / path
            try:
                read_manifest(p, verify=True)
            except CheckpointError as exc:
                rec = self.load.jobs.get(job)
                kind = trial_fault[rec.faults[-1]] if rec and rec.faults else "(no fault)"
                rows[kind]["corrupt"] += 1
                problems.append(f"corrupt {ckpt} ({job}): {exc}")
        if not rows["(no fault)"]["trials"] and not any(v for k, v in rows["(no fault)"].items() if k != "trials"):
            del rows["(no fault)"]

        n_jobs = len(self.load.jobs)
        outcome = {s: sum(1 for j in self.load.jobs if snap.get(j, ("missing",))[0] == s) for s in TERMINAL}
        print()
        print(
            f"chaos soak: {len(self.trials)} trials, {n_jobs} jobs accepted ({outcome}), "
            f"{len(cancelled_by_client)} cancelled by the client, "
            f"{self.load.new_runs} rounds refused 409 (new run), {self.load.idem_replays} idempotent upload "
            f"replays ({len(self.load.idem_mismatch)} answered a different id), data dir "
            f"{'tmpfs ' + str(self.args.tmpfs_mb) + ' MiB' if self.tmpfs else 'plain directory'}, "
            f"{self.args.workers} workers, 2 API processes"
        )
        head = (
            "fault",
            "trials",
            "lost",
            "doubled",
            "orphans",
            "stuck",
            "corrupt",
            "failed_reason",
            "recovery s (median / max)",
        )
        lines = [head]
        for k, r in rows.items():
            recs = [t.recovery_s for t in self.trials if t.fault == k and t.recovery_s is not None]
            unrec = sum(1 for t in self.trials if t.fault == k and t.recovery_s is None)
            rec_s = f"{statistics.median(recs):.1f} / {max(recs):.1f}" if recs else "-"
            if unrec:
                rec_s += f" ({unrec} not recovered in 180 s)"
            lines.append(
                (
                    k,
                    *(str(r[c]) for c in ("trials", "lost", "doubled", "orphans", "stuck", "corrupt", "failed_reason")),
                    rec_s,
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        for idx, line in enumerate(lines):
            print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
            if idx == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        if self.load.idem_mismatch:
            problems.append(f"idempotent replays answered another id: {self.load.idem_mismatch}")
        if self.load.client_errors:
            print(f"\nclient errors ({len(self.load.client_errors)}):", *self.load.client_errors[:10], sep="\n  ")
        if notes:
            print("\nnotes:", *notes[:20], sep="\n  ")
        if problems:
            print("\nproblems:", *problems, sep="\n  ")
        summary = {"trials": len(self.trials), "rows": rows, "problems": problems}
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(summary, indent=2, default=str))
        bad = any(r[c] for r in rows.values() for c in ("lost", "doubled", "orphans", "stuck", "corrupt"))
        return 1 if bad or self.load.idem_mismatch else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="trials per fault kind")
    ap.add_argument("--duration", type=float, default=3600, help="stop injecting after this many seconds")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    ap.add_argument("--workers", type=int, default=2, choices=(2, 3))
    ap.add_argument("--streams", type=int, default=3, help="runs driven in parallel")
    ap.add_argument("--drain", type=float, default=300, help="seconds the jobs get to finish after the last trial")
    # ~2 MiB of run dir per tiny round: 256 MiB filled up through normal operation after ~150 rounds
    # (the API then answers 507 to every round, correctly, and the load stops)
    ap.add_argument(
        "--tmpfs-mb", type=int, default=4096, help="data dir size (20 trials per kind keep ~1 GiB of rounds)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = ap.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}")
    soak = Soak(args)
    log(f"soak root {soak.root}")
    try:
        soak.setup()
        soak.run_trials()
        soak.drain()
        return soak.report()
    finally:
        soak.teardown()


if __name__ == "__main__":
    sys.exit(main())

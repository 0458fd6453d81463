"""The online loop, entirely over HTTP: sample from the run's head → label with a reward model
trained on this server → train a round; three iterations (DPO, KTO, DPO), plus a negative control.

    .venv/bin/python examples/online_loop.py              # starts `halos serve` (embedded defaults)
    .venv/bin/python examples/online_loop.py --small      # the CI size (tests/e2e/test_online_loop.py)

The task (halos_core.synthetic), and how it is made learnable for a tiny random model:
  a prompt names a topic; the preferred reply repeats the topic and ends with "thanks"
  ("The apple is a fine apple, thanks."), the dispreferred one names another word ("A river is
  here"). A randomly initialised 2-layer Llama cannot write either, so:
  1. warm start: an `sft` run on a 50/50 mix of both replies; its checkpoint is registered as the
     model (the loop's pinned reference), so its samples are a mix of good and bad replies — the
     reward model has something to tell apart and the policy something to move towards;
  2. reward model: a `bradley_terry` run on synthetic preference pairs;
  3. the loop run starts from the warm-started model; each iteration samples 4 completions per
     training prompt from the head, labels them with the reward model (DPO: one max-gap pair per
     prompt; KTO: binary by the median score) and trains a round on them, with the held-out
     preference pairs as the round's eval set and a gate (the held-out accuracy may not drop
     more than 0.2 below the head's).
Printed per iteration: the mean reward-model score of the fresh samples (drawn from the head at
the start of the iteration; one more sampling after the last) and the held-out preference accuracy
of the policy after the iteration (the DPO rounds' eval on the held-out pairs; after the KTO round
it is the next DPO round's `eval_before`, the same eval set scored by the head before training).
Negative control: the same loop, but the reward model's labels are replaced by coin flips (the
labelled file is downloaded, its labels randomised, uploaded again) — no signal, so no rise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from halos_core.synthetic import PROMPT_TEMPLATES, TOPICS, pairwise_records

BIN = Path(sys.executable).parent


@dataclass
class Size:
    prompts: int  # training prompts sampled each iteration
    heldout: int  # held-out preference pairs (the eval set)
    warm: int  # warm-start SFT records
    rm_pairs: int  # reward-model training pairs
    n: int  # samples per prompt
    epochs: int  # passes of each round over its labelled data


FULL = Size(prompts=48, heldout=48, warm=192, rm_pairs=128, n=4, epochs=2)
SMALL = Size(prompts=16, heldout=16, warm=64, rm_pairs=32, n=4, epochs=1)
HP = {"lr": 5e-4, "batch_size": 8, "microbatch_size": 4, "max_length": 64, "max_prompt_length": 32}
SCHEDULE = [
    ("dpo", {"name": "dpo", "beta": 0.1}),
    ("kto", {"name": "kto", "beta": 0.1}),
    ("dpo", {"name": "dpo", "beta": 0.1}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


class Server:
    """`halos serve` with embedded defaults (SQLite, embedded broker, one worker) in a temp data dir."""

    def __init__(self, data_dir: Path):
        self.port = free_port()
        # model registration: the tiny model is built in <data_dir>/models (allowed by default); the
        # warm start registers a checkpoint of this server as a model, so its runs/ folder is listed too
        self.env = {
            **os.environ,
            "HALOS_DATA_DIR": str(data_dir),
            "HALOS_PORT": str(self.port),
            "HALOS_HEARTBEAT_INTERVAL_S": "1",
            "HALOS_SWEEP_INTERVAL_S": "2",
            "PYTHONUNBUFFERED": "1",
            "HALOS_MODEL_ROOTS": str((data_dir / "runs").resolve()),
        }
        self.env.pop("HALOS_DATABASE_URL", None)
        self.env.pop("HALOS_BROKER_URL", None)

        def run(*args: str) -> str:
            return subprocess.run(
                [str(BIN / "halos"), *args], env=self.env, check=True, capture_output=True, text=True
            ).stdout

        run("migrate")
        self.key = run("keys", "create", "--project", "loop").strip()
        self.log = open(data_dir / "serve.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "halos"), "serve", "--port", str(self.port)],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        with httpx.Client(base_url=self.url, timeout=5) as c:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if c.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    time.sleep(0.3)
        raise SystemExit("halos serve did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


class Api:
    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"})

    def call(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.http.request(method, path, **kw)
        if resp.status_code >= 400:
            raise SystemExit(f"{method} {path} -> {resp.status_code}: {resp.text[:2000]}")
        return resp.json() if resp.headers.get("content-type", "").startswith("application/json") else resp.content

    def upload(self, path: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        return self.call("POST", path, content=jsonl(records), headers={"Content-Type": "application/x-ndjson"})

    def wait(self, job_id: str, timeout: float = 1800) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.call("GET", f"/v1/jobs/{job_id}")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
                return job
            time.sleep(0.5)
        raise SystemExit(f"job {job_id} did not finish")

    def round(self, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
        rnd = self.call("POST", f"/v1/runs/{run_id}/rounds", json=body)
        return self.wait(rnd["job_id"])

    def output(self, job: dict[str, Any]) -> dict[str, Any]:
        return self.call("GET", f"/v1/feedback/{job['output_feedback_id']}")


def prompts(n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "prompt_id": f"{prefix}{i}",
            "prompt": [{"role": "user", "content": rng.choice(PROMPT_TEMPLATES).format(t=rng.choice(TOPICS))}],
        }
        for i in range(n)
    ]


def warm_start_records(n: int, seed: int) -> list[dict[str, Any]]:
    """SFT data: each prompt with the good or the bad reply, 50/50 (samples format: one output each)."""
    out = []
    for i, r in enumerate(pairwise_records(n, seed=seed, id_prefix="w")):
        reply = r["output_A"] if (i % 2 == 0) == (r["label"] == 1) else r["output_B"]
        out.append(
            {"type": "sample", "prompt_id": r["prompt_id"], "sample_id": "0", "prompt": r["prompt"], "output": reply}
        )
    return out


def setup(api: Api, size: Size, model_dir: Path) -> tuple[dict[str, Any], str, dict[str, Any], dict[str, Any]]:
    """(warm-started model, reward model checkpoint, train prompt set, held-out pairs)."""
    base = api.call("POST", "/v1/models", json={"name": "tiny-random", "path": str(model_dir)})
    warm_fb = api.upload("/v1/feedback", warm_start_records(size.warm, seed=11))
    warm_run = api.call(
        "POST",
        "/v1/runs",
        json={"model_id": base["id"], "loss": {"name": "sft"}, "hyperparams": {**HP, "lr": 2e-3, "n_epochs": 3}},
    )
    warm = api.round(warm_run["id"], {"feedback_ids": [warm_fb["id"]]})
    warm_ckpt = api.call("GET", f"/v1/checkpoints/{warm['checkpoint_id']}")
    model = api.call("POST", "/v1/models", json={"name": "warm-start", "path": warm_ckpt["path"]})
    rm_pairs = api.upload("/v1/feedback", pairwise_records(size.rm_pairs, seed=21, id_prefix="r"))
    rm_run = api.call(
        "POST",
        "/v1/runs",
        json={
            "model_id": base["id"],
            "loss": {"name": "bradley_terry"},
            "hyperparams": {**HP, "lr": 1e-3, "n_epochs": 2},
        },
    )
    rm = api.round(rm_run["id"], {"feedback_ids": [rm_pairs["id"]]})
    train_prompts = api.upload("/v1/prompts", prompts(size.prompts, seed=31, prefix="t"))
    heldout = api.upload(
        "/v1/feedback", [{**r, "split": "test"} for r in pairwise_records(size.heldout, seed=41, id_prefix="h")]
    )
    return model, rm["checkpoint_id"], train_prompts, heldout


def coin_flips(api: Api, fb: dict[str, Any], seed: int) -> dict[str, Any]:
    """The negative control's labels: the same records with random labels (downloaded, re-uploaded)."""
    rng = random.Random(seed)
    records = [json.loads(line) for line in api.call("GET", f"/v1/feedback/{fb['id']}/content").splitlines()]
    for r in records:
        r["label"] = rng.randint(0, 1)
    return api.upload("/v1/feedback", records)


def loop(
    api: Api,
    size: Size,
    model: dict[str, Any],
    rm_ckpt: str,
    train_prompts: dict[str, Any],
    heldout: dict[str, Any],
    control: bool,
) -> list[dict[str, float]]:
    run = api.call(
        "POST",
        "/v1/runs",
        json={
            "name": "control" if control else "loop",
            "model_id": model["id"],
            "loss": {"name": "dpo", "beta": 0.1},
            "hyperparams": {**HP, "n_epochs": size.epochs},
        },
    )
    rows: list[dict[str, float]] = []

    def sample_head(k: int) -> dict[str, Any]:
        """Samples of the run's head (the sampling job's finished job)."""
        return api.wait(
            api.call(
                "POST",
                "/v1/sampling-jobs",
                json={
                    "prompt_set_id": train_prompts["id"],
                    "run_id": run["id"],
                    "params": {"n": size.n, "max_new_tokens": 24, "temperature": 1.0, "seed": 100 + k},
                },
            )["id"]
        )

    def fresh_score(k: int) -> float:
        scored = api.wait(
            api.call(
                "POST",
                "/v1/labelling-jobs",
                json={"samples_id": sample_head(k)["output_feedback_id"], "reward_model_checkpoint_id": rm_ckpt},
            )["id"]
        )
        return float(api.output(scored)["provenance"]["stats"]["mean_score"])

    for k, (loss_name, loss) in enumerate(SCHEDULE, start=1):
        samples = api.output(sample_head(k))
        rule = (
            {"type": "pairwise", "method": "max", "min_gap": 0.0}
            if loss_name == "dpo"
            else {"type": "binary", "method": "median"}
        )
        labelled_job = api.wait(
            api.call(
                "POST",
                "/v1/labelling-jobs",
                json={"samples_id": samples["id"], "reward_model_checkpoint_id": rm_ckpt, "label": rule},
            )["id"]
        )
        labelled = api.output(labelled_job)
        score = float(labelled["provenance"]["stats"]["mean_score"])
        if control:
            labelled = coin_flips(api, labelled, seed=k)
        gate = [{"metric": "rewards/accuracy", "max_drop": 0.2}] if loss_name == "dpo" else None
        body = {"feedback_ids": [labelled["id"], heldout["id"]], "loss": loss, "gate": gate}
        if loss_name == "kto":  # KTO trains on unpaired data: the held-out pairs become desirable/undesirable
            body["conversion"] = {"type": "pairwise_to_unpaired"}
        job = api.round(run["id"], body)
        view = api.call("GET", f"/v1/runs/{run['id']}")
        rnd = next(r for r in view["rounds"] if r["job_id"] == job["id"])
        result_eval = {
            m["split"]: m["data"]
            for m in api.call("GET", f"/v1/jobs/{job['id']}/metrics", params={"split": "eval"})["items"]
        }.get("eval", {})
        rows.append(
            {
                "iteration": k,
                "loss": loss_name,
                "fresh_score": score,
                "accuracy_after": result_eval.get("rewards/accuracy", float("nan")),
                "accuracy_before": (rnd.get("promotion") or {}).get("gate", {}).get("checks", [{}])[0].get("head")
                if gate
                else None,
                "promoted": rnd["promoted"],
            }
        )
    # after the KTO round, its accuracy is the next DPO round's baseline (eval_before) on the same pairs
    for i, row in enumerate(rows):
        if row["loss"] == "kto" and i + 1 < len(rows) and rows[i + 1]["accuracy_before"] is not None:
            row["accuracy_after"] = rows[i + 1]["accuracy_before"]
    rows.append(
        {
            "iteration": len(SCHEDULE) + 1,
            "loss": "-",
            "fresh_score": fresh_score(len(SCHEDULE) + 1),
            "accuracy_after": float("nan"),
            "accuracy_before": None,
            "promoted": None,
        }
    )
    return rows


def show(title: str, baseline: float | None, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    if baseline is not None:
        print(f"  held-out preference accuracy of the warm start: {baseline:.3f}")
    print("  iter  loss  mean RM score of fresh samples  held-out accuracy after  promoted")
    for r in rows:
        acc = "" if r["accuracy_after"] != r["accuracy_after"] else f"{r['accuracy_after']:.3f}"
        print(f"  {r['iteration']:>4}  {r['loss']:>4}  {r['fresh_score']:>30.3f}  {acc:>23}  {r['promoted']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CI size")
    parser.add_argument("--no-control", action="store_true", help="skip the negative control")
    parser.add_argument(
        "--url",
        help="an existing server (with --key) on this machine, whose HALOS_MODEL_ROOTS lists"
        " the temp dir and its own runs/ folder; default: start one here",
    )
    parser.add_argument("--key")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir")
    args = parser.parse_args(argv)
    size = SMALL if args.small else FULL
    work = Path(tempfile.mkdtemp(prefix="halos-loop-"))
    server = None
    started = time.monotonic()
    try:
        model_dir = work / "data" / "models" / "tiny"  # the data dir's models folder: registrable by default
        subprocess.run([sys.executable, "-m", "halos_core.tiny", str(model_dir)], check=True, stdout=subprocess.DEVNULL)
        if args.url:
            api = Api(args.url, args.key)
        else:
            server = Server(work / "data")
            api = Api(server.url, server.key)
        model, rm_ckpt, train_prompts, heldout = setup(api, size, model_dir)
        rows = loop(api, size, model, rm_ckpt, train_prompts, heldout, control=False)
        baseline = next((r["accuracy_before"] for r in rows if r["accuracy_before"] is not None), None)
        show("online loop (reward-model labels)", baseline, rows)
        control = None if args.no_control else loop(api, size, model, rm_ckpt, train_prompts, heldout, control=True)
        if control is not None:
            show("negative control (coin-flip labels)", None, control)
        print(f"\n(total {time.monotonic() - started:.0f} s)")
        return {"loop": rows, "control": control, "baseline_accuracy": baseline}
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

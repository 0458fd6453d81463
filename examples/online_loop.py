"""The online loop, entirely over HTTP: sample from the run's head → label with a reward model
trained on this server → train a round; three iterations (DPO, KTO, DPO), plus a negative control.

    .venv/bin/python examples/online_loop.py              # starts `halos serve` (embedded defaults)
    .venv/bin/python examples/online_loop.py --small      # the CI size (tests/e2e/test_online_loop.py)

The task (halos_core.synthetic), and how it is made learnable for a tiny random model:
  a prompt names a topic; the preferred reply repeats the topic and ends with "thanks"
  ("The apple is a fine apple, thanks."), the dispreferred one names another word ("A river is
  here"). A randomly initialised 2-layer Llama cannot write either, so:
  1. warm start: an `sft` run on a 50/50 mix of both replies; its checkpoint is registered as
     the model, which is the loop's pinned reference, so its samples are a mix of good-ish and
     bad-ish replies (with many typos at 3 epochs) — the reward model has something to tell
     apart and the policy something to move towards;
  2. reward model: a `bradley_terry` run on synthetic preference pairs (it scores the good form
     about +7 and the bad one about -6);
  3. the loop run starts from the warm-started model; each iteration samples 4 completions per
     training prompt from the head, labels them with the reward model (DPO: one max-gap pair per
     prompt; KTO: binary by the median score) and trains one round on them.
  4. the held-out pairs: the task's prompt texts are split in two halves, training prompts drawn
     from one and 96 held-out prompts from the other; 4 samples each from the warm start,
     labelled by the reward model (its best and worst sample per prompt, kept when their scores
     differ by at least 2): pairs of the kind of text the policy writes, ordered by the judge it
     learns from, on prompts the loop never trains on.
  What we measured (docs/ONLINE_LOOP.md, seeds 0-4): the first round makes the held-out
  accuracy (0.5 -> 0.71-0.82) and later rounds move it by -6 to +13 pairs of ~90, less than the
  control moves by chance; the criterion below is not met. With fixed synthetic template pairs
  as the held-out set the first round flipped nearly all of them (0.979, 0.979, 0.958 at lr 5e-4).
Printed per iteration k = 0..3 (0: the warm start, k: the head after round k):
  - the mean reward-model score of fresh samples drawn from that head (the samples iteration
    k+1 trains on; after the last round one more sampling);
  - the held-out preference accuracy of that head on the held-out pairs (4. above), scored by
    the trainer with the round's DPO loss against the reference — the share whose preferred
    reply gets the higher implicit reward beta*log(pi/pi_ref), ties counted 1/2
    (`rewards/accuracy` + `rewards/ties` / 2: the warm start IS the reference, every pair ties,
    0.5). A DPO round scores the held-out set before training (its gate's `eval_before`) and
    after; the head after the KTO round is measured by the next DPO round's `eval_before`.
Negative control: the same loop, but the reward model's labels are replaced by coin flips (the
labelled file is downloaded, its labels randomised, uploaded again) — no signal: its accuracy
wanders around or below chance (0.23-0.60 over seeds 0-4).
The last line is PASS or FAIL: both figures strictly above the previous iteration's at every
iteration, and the control's accuracy never above its start.
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
    warm_epochs: int  # passes of the warm start over them
    rm_pairs: int  # reward-model training pairs
    n: int  # samples per prompt
    epochs: int  # passes of each round over its labelled data


FULL = Size(prompts=48, heldout=96, warm=192, warm_epochs=3, rm_pairs=128, n=4, epochs=3)
SMALL = Size(prompts=16, heldout=16, warm=64, warm_epochs=3, rm_pairs=32, n=4, epochs=1)
HP = {"lr": 5e-4, "batch_size": 8, "microbatch_size": 4, "max_length": 64, "max_prompt_length": 32}
LOOP_HP = {"lr": 1e-4}  # the loop's rounds
LABELS = {
    "dpo": {"type": "pairwise", "method": "max", "min_gap": 0.0},
    "kto": {"type": "binary", "method": "median"},
}
# the held-out pairs: per held-out prompt, the warm start's best and worst of n samples by the reward
# model, kept when their scores differ by at least 2 (the reward model is sure of the order)
HELDOUT_LABELS = {"type": "pairwise", "method": "max", "min_gap": 2.0}
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

    def artefact(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run a sampling or labelling job to its end: its output feedback file."""
        return self.output(self.wait(self.call("POST", path, json=body)["id"]))


def prompt_texts(seed: int) -> tuple[list[str], list[str]]:
    """The task's prompt texts (template x topic), split into two disjoint halves: the loop's
    training prompts and its held-out prompts (the topics are shared; the texts are not)."""
    texts = [template.format(t=topic) for template in PROMPT_TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(texts)
    half = len(texts) // 2
    return texts[:half], texts[half:]


def prompts(n: int, texts: list[str], seed: int, prefix: str) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt_id": f"{prefix}{i}", "prompt": [{"role": "user", "content": rng.choice(texts)}]} for i in range(n)]


def sampling(size: Size, seed: int) -> dict[str, Any]:
    """A sampling job's params: `size.n` completions per prompt."""
    return {"n": size.n, "max_new_tokens": 24, "temperature": 1.0, "seed": seed}


def label(api: Api, samples: dict[str, Any], rm_ckpt: str, rule: dict[str, Any] | None = None) -> dict[str, Any]:
    """A labelling job over `samples` with the reward model (`rule` None: the server's default,
    scalar rewards): its output feedback file."""
    body: dict[str, Any] = {"samples_id": samples["id"], "reward_model_checkpoint_id": rm_ckpt}
    if rule is not None:
        body["label"] = rule
    return api.artefact("/v1/labelling-jobs", body)


def warm_start_records(n: int, seed: int) -> list[dict[str, Any]]:
    """SFT data: each prompt with the good or the bad reply, 50/50 (samples format: one output each)."""
    out = []
    for i, r in enumerate(pairwise_records(n, seed=seed, id_prefix="w")):
        reply = r["output_A"] if (i % 2 == 0) == (r["label"] == 1) else r["output_B"]
        out.append(
            {"type": "sample", "prompt_id": r["prompt_id"], "sample_id": "0", "prompt": r["prompt"], "output": reply}
        )
    return out


def setup(
    api: Api, size: Size, model_dir: Path, seed: int = 0
) -> tuple[dict[str, Any], str, dict[str, Any], dict[str, Any]]:
    """(warm-started model, reward model checkpoint, train prompt set, held-out pairs)."""
    base = api.call("POST", "/v1/models", json={"name": "tiny-random", "path": str(model_dir)})
    warm_fb = api.upload("/v1/feedback", warm_start_records(size.warm, seed=seed + 11))
    warm_run = api.call(
        "POST",
        "/v1/runs",
        json={
            "model_id": base["id"],
            "loss": {"name": "sft"},
            "hyperparams": {**HP, "lr": 2e-3, "n_epochs": size.warm_epochs},
        },
    )
    warm = api.round(warm_run["id"], {"feedback_ids": [warm_fb["id"]]})
    warm_ckpt = api.call("GET", f"/v1/checkpoints/{warm['checkpoint_id']}")
    model = api.call("POST", "/v1/models", json={"name": "warm-start", "path": warm_ckpt["path"]})
    rm_pairs = api.upload("/v1/feedback", pairwise_records(size.rm_pairs, seed=seed + 21, id_prefix="r"))
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
    train_texts, heldout_texts = prompt_texts(seed + 51)
    train_prompts = api.upload("/v1/prompts", prompts(size.prompts, train_texts, seed=seed + 31, prefix="t"))
    heldout_prompts = api.upload(
        "/v1/prompts", [{**p, "split": "test"} for p in prompts(size.heldout, heldout_texts, seed + 41, prefix="h")]
    )
    samples = api.artefact(
        "/v1/sampling-jobs",
        {"prompt_set_id": heldout_prompts["id"], "model_id": model["id"], "params": sampling(size, seed + 41)},
    )
    heldout = label(api, samples, rm["checkpoint_id"], HELDOUT_LABELS)
    if heldout["n_test"] == 0:
        raise SystemExit(f"no held-out pair has a reward gap of {HELDOUT_LABELS['min_gap']}: nothing to measure")
    print(f"held-out pairs: {heldout['n_test']} (of {size.heldout} prompts the loop never trains on)", flush=True)
    return model, rm["checkpoint_id"], train_prompts, heldout


def coin_flips(api: Api, fb: dict[str, Any], seed: int) -> dict[str, Any]:
    """The negative control's labels: the same records with random labels (downloaded, re-uploaded)."""
    rng = random.Random(seed)
    records = [json.loads(line) for line in api.call("GET", f"/v1/feedback/{fb['id']}/content").splitlines()]
    for r in records:
        r["label"] = rng.randint(0, 1)
    return api.upload("/v1/feedback", records)


def heldout_accuracy(metrics: dict[str, float]) -> float:
    """Share of held-out pairs whose chosen reply gets the higher implicit reward, ties counted 1/2.
    (`rewards/accuracy` is HALOs' strict `>`: a policy equal to its reference ties every pair and
    would score 0.0 instead of chance.)"""
    return metrics["rewards/accuracy"] + 0.5 * metrics["rewards/ties"]


def loop(
    api: Api,
    size: Size,
    model: dict[str, Any],
    rm_ckpt: str,
    train_prompts: dict[str, Any],
    heldout: dict[str, Any],
    control: bool,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows for iterations 0..3: the head after the iteration (0: the warm start), the mean RM score
    of fresh samples drawn from it, and its held-out preference accuracy."""
    run = api.call(
        "POST",
        "/v1/runs",
        json={
            "name": "control" if control else "loop",
            "model_id": model["id"],
            "loss": SCHEDULE[0][1],
            "hyperparams": {**HP, **LOOP_HP, "n_epochs": size.epochs},
        },
    )

    def sample_head(k: int) -> dict[str, Any]:
        """Samples of the run's head (the sampling job's output feedback)."""
        return api.artefact(
            "/v1/sampling-jobs",
            {"prompt_set_id": train_prompts["id"], "run_id": run["id"], "params": sampling(size, seed + 100 + k)},
        )

    scores: list[float] = []  # scores[k]: fresh samples of the head after iteration k
    evals: list[tuple[str, dict[str, Any]]] = []  # per round: (loss, result)
    for k, (loss_name, loss) in enumerate(SCHEDULE, start=1):
        rule = LABELS[loss_name]
        labelled = label(api, sample_head(k), rm_ckpt, rule)
        scores.append(float(labelled["provenance"]["stats"]["mean_score"]))
        if control:
            labelled = coin_flips(api, labelled, seed=seed + k)
        # the gate makes the trainer score the held-out pairs with the head BEFORE training too
        # (eval_before); KTO's eval has no pairwise accuracy, so its head is measured by the next
        # DPO round's eval_before
        gate = [{"metric": "rewards/accuracy", "max_drop": 0.2}] if loss_name == "dpo" else None
        body = {"feedback_ids": [labelled["id"], heldout["id"]], "loss": loss, "gate": gate}
        if loss_name == "kto":  # KTO trains on unpaired data: the held-out pairs become desirable/undesirable
            body["conversion"] = {"type": "pairwise_to_unpaired"}
        job = api.round(run["id"], body)
        view = api.call("GET", f"/v1/runs/{run['id']}")
        rnd = next(r for r in view["rounds"] if r["job_id"] == job["id"])
        evals.append((loss_name, {"job": job, "round": rnd}))
    scores.append(float(label(api, sample_head(len(SCHEDULE) + 1), rm_ckpt)["provenance"]["stats"]["mean_score"]))

    def round_eval(i: int, before: bool) -> dict[str, float]:
        return evals[i][1]["round"]["promotion"]["eval_before" if before else "eval"]

    rows: list[dict[str, Any]] = []
    for k in range(len(SCHEDULE) + 1):
        if k == 0:
            acc_metrics = round_eval(0, before=True)
        elif evals[k - 1][0] == "dpo":
            acc_metrics = round_eval(k - 1, before=False)
        else:  # the head after a KTO round, as the next DPO round saw it before training
            acc_metrics = round_eval(k, before=True)
        rnd = evals[k - 1][1]["round"] if k else None
        rows.append(
            {
                "iteration": k,
                "loss": evals[k - 1][0] if k else "-",
                "fresh_score": scores[k],
                "accuracy": heldout_accuracy(acc_metrics),
                "accuracy_strict": acc_metrics["rewards/accuracy"],
                "promoted": rnd["promoted"] if rnd else None,
            }
        )
    return rows


def rises(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def verdict(rows: list[dict[str, Any]], control: list[dict[str, Any]] | None) -> tuple[bool, str]:
    """The criterion: every iteration's mean RM score and held-out accuracy strictly above the
    previous one's, and the control's accuracy never above its start (chance, 0.5)."""
    checks = [
        ("RM score rises every iteration", rises([r["fresh_score"] for r in rows])),
        ("held-out accuracy rises every iteration", rises([r["accuracy"] for r in rows])),
    ]
    if control is not None:
        start = control[0]["accuracy"]
        checks.append(("control accuracy never above its start", all(r["accuracy"] <= start for r in control[1:])))
    ok = all(passed for _, passed in checks)
    return ok, ("PASS" if ok else "FAIL") + ": " + "; ".join(f"{name}: {'yes' if p else 'NO'}" for name, p in checks)


def show(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print("  iter  head after        mean RM score of fresh samples  held-out accuracy (ties 1/2)  promoted")
    for r in rows:
        head = "warm start" if r["iteration"] == 0 else f"{r['loss'].upper()} round"
        promoted = "" if r["promoted"] is None else str(r["promoted"])
        print(f"  {r['iteration']:>4}  {head:<16} {r['fresh_score']:>31.3f}  {r['accuracy']:>28.3f}  {promoted}")


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
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="added to the seeds of the example's data, prompts, sampling and coin flips (not to the"
        " tiny model's initialisation or the rounds' training seed)",
    )
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
        model, rm_ckpt, train_prompts, heldout = setup(api, size, model_dir, args.seed)
        inputs = (api, size, model, rm_ckpt, train_prompts, heldout)
        rows = loop(*inputs, control=False, seed=args.seed)
        show("online loop (reward-model labels)", rows)
        control = None if args.no_control else loop(*inputs, control=True, seed=args.seed)
        if control is not None:
            show("negative control (coin-flip labels)", control)
        ok, line = verdict(rows, control)
        print(f"\n{line}")
        print(f"(total {time.monotonic() - started:.0f} s)")
        return {"loop": rows, "control": control, "passed": ok, "heldout_pairs": heldout["n_test"]}
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Sampling and labelling jobs through the real job machinery: API → state machine → worker
(`tasks.execute`: claim, lease, supervised `python -m halos_core.sample|label` subprocess, finish)
→ stored feedback file with provenance; cancel; the same seed gives the same samples; bad inputs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from halos_core.synthetic import pairwise_records
from tests.loop.conftest import post_file

PROMPTS = [
    {
        "prompt_id": f"q{i}",
        "prompt": [{"role": "user", "content": f"Tell me about the apple {i}."}],
        **({"split": "test"} if i == 0 else {}),
    }
    for i in range(6)
]
SMALL = {"batch_size": 4, "microbatch_size": 2, "max_length": 64, "max_prompt_length": 32, "lr": 1e-3}


def _ok(resp, status: int = 201) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()


def _output(client, job_id: str) -> dict:
    fb_id = _ok(client.get(f"/v1/jobs/{job_id}"), 200)["output_feedback_id"]
    return _ok(client.get(f"/v1/feedback/{fb_id}"), 200)


def _sample(client, prompt_set: str, **generator) -> dict:
    return _ok(
        client.post(
            "/v1/sampling-jobs",
            json={
                "prompt_set_id": prompt_set,
                **generator,
                "params": {"n": 3, "max_new_tokens": 12, "temperature": 1.0, "seed": 7, "batch_size": 4},
            },
        )
    )


def test_sample_label_train(api, work, tiny_dir: Path, settings) -> None:
    client, other = api
    model = _ok(client.post("/v1/models", json={"name": "tiny", "path": str(tiny_dir)}))
    ps = _ok(post_file(client, "/v1/prompts", PROMPTS))
    assert ps["n_prompts"] == 6 and ps["n_test"] == 1
    assert client.get(f"/v1/prompts/{ps['id']}/content").content.decode().count("\n") == 6

    job = _sample(client, ps["id"], model_id=model["id"])
    assert job["kind"] == "sample" and job["status"] == "queued"
    assert work(job["id"]) == "succeeded"
    done = _ok(client.get(f"/v1/jobs/{job['id']}"), 200)
    samples = _ok(client.get(f"/v1/feedback/{done['output_feedback_id']}"), 200)
    assert samples["kind"] == "sampled" and samples["format"] == "halos_sampled" and samples["source"] == "sampling"
    assert samples["n_records"] == 18 and samples["n_prompts"] == 6 and samples["n_test"] == 3
    assert samples["job_id"] == job["id"]
    prov = samples["provenance"]
    assert prov["generator"] == {"checkpoint_id": None, "model_id": model["id"], "run_id": None}
    assert prov["prompt_set_id"] == ps["id"] and prov["engine"] == "hf" and prov["params"]["seed"] == 7
    lines = [json.loads(x) for x in client.get(f"/v1/feedback/{samples['id']}/content").content.splitlines()]
    assert {(r["prompt_id"], r["sample_id"]) for r in lines} == {(f"q{i}", str(j)) for i in range(6) for j in range(3)}
    assert all(r["generator"] == model["id"] for r in lines)
    metrics = _ok(client.get(f"/v1/jobs/{job['id']}/metrics"), 200)["items"]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["data"]["samples_per_s"] > 0 for m in metrics)
    assert "halos_core.sample: ok 18 samples (hf)" in client.get(f"/v1/jobs/{job['id']}/logs").text

    # same seed ⇒ same samples (HF engine), a new job and a new subprocess
    again = _sample(client, ps["id"], model_id=model["id"])
    assert work(again["id"]) == "succeeded"
    assert _output(client, again["id"])["sha256"] == samples["sha256"]

    # a reward model trained on this server (bradley_terry), then label the samples with it
    pairs = _ok(post_file(client, "/v1/feedback", pairwise_records(16, seed=3)))
    rm_run = _ok(
        client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "bradley_terry"}, "hyperparams": SMALL})
    )
    rm_round = _ok(client.post(f"/v1/runs/{rm_run['id']}/rounds", json={"feedback_ids": [pairs["id"]]}))
    assert work(rm_round["job_id"]) == "succeeded"
    rm_ckpt = _ok(client.get(f"/v1/jobs/{rm_round['job_id']}"), 200)["checkpoint_id"]

    lab = _ok(
        client.post(
            "/v1/labelling-jobs",
            json={
                "samples_id": samples["id"],
                "reward_model_checkpoint_id": rm_ckpt,
                "label": {"type": "pairwise", "method": "max", "min_gap": 0.0},
            },
        )
    )
    assert lab["kind"] == "label" and work(lab["id"]) == "succeeded"
    labelled = _output(client, lab["id"])
    assert labelled["kind"] == "pairwise" and labelled["source"] == "labelling"
    assert labelled["provenance"]["reward_model"] == {"checkpoint_id": rm_ckpt, "run_id": rm_run["id"]}
    assert labelled["provenance"]["samples_id"] == samples["id"] and labelled["n_prompts"] <= 6
    pairs_out = [json.loads(x) for x in client.get(f"/v1/feedback/{labelled['id']}/content").content.splitlines()]
    assert all(p["reward_A"] > p["reward_B"] and p["label"] == 1 for p in pairs_out)
    scalar = _ok(
        client.post("/v1/labelling-jobs", json={"samples_id": samples["id"], "reward_model_checkpoint_id": rm_ckpt})
    )
    assert work(scalar["id"]) == "succeeded"
    scalar_fb = _output(client, scalar["id"])["id"]
    scores = {
        (r["prompt_id"], r["output"][0]["content"]): r["reward"]
        for r in map(json.loads, client.get(f"/v1/feedback/{scalar_fb}/content").content.splitlines())
    }
    for p in pairs_out:  # the pairs are the max-gap pairs of the same scores
        group = [s for (pid, _), s in scores.items() if pid == p["prompt_id"]]
        assert p["reward_A"] == max(group) and p["reward_B"] == min(group)

    # the labelled pairs train a DPO round directly; the samples train an SFT round directly
    dpo = _ok(
        client.post(
            "/v1/runs",
            json={"model_id": model["id"], "loss": {"name": "dpo"}, "hyperparams": {**SMALL, "batch_size": 2}},
        )
    )
    _ok(client.post(f"/v1/runs/{dpo['id']}/rounds", json={"feedback_ids": [labelled["id"]]}))
    sft = _ok(client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "sft"}, "hyperparams": SMALL}))
    _ok(client.post(f"/v1/runs/{sft['id']}/rounds", json={"feedback_ids": [samples["id"]]}))

    # sampling from a run = its head (the RM run's only checkpoint), resolved and recorded
    from_run = _sample(client, ps["id"], run_id=rm_run["id"])
    assert work(from_run["id"]) == "succeeded"
    fb = _output(client, from_run["id"])
    assert fb["provenance"]["generator"] == {"checkpoint_id": rm_ckpt, "model_id": model["id"], "run_id": rm_run["id"]}

    # bad input: a checkpoint without a reward head, other kinds, unknown / foreign ids, the cap
    dpo_like = _ok(
        client.post("/v1/runs", json={"model_id": model["id"], "loss": {"name": "dpo"}, "hyperparams": SMALL})
    )
    r = _ok(client.post(f"/v1/runs/{dpo_like['id']}/rounds", json={"feedback_ids": [pairs["id"]]}))
    assert work(r["job_id"]) == "succeeded"
    no_head = _ok(client.get(f"/v1/jobs/{r['job_id']}"), 200)["checkpoint_id"]
    err = client.post("/v1/labelling-jobs", json={"samples_id": samples["id"], "reward_model_checkpoint_id": no_head})
    assert err.status_code == 422 and err.json()["error"]["code"] == "no_reward_head"
    assert "no reward head" in err.json()["error"]["message"] and "'dpo'" in err.json()["error"]["message"]
    err = client.post("/v1/labelling-jobs", json={"samples_id": pairs["id"], "reward_model_checkpoint_id": rm_ckpt})
    assert err.status_code == 422 and err.json()["error"]["code"] == "not_samples"
    for body, field in (
        ({"samples_id": "fb_000000000000000000000000", "reward_model_checkpoint_id": rm_ckpt}, "samples_id"),
        ({"samples_id": samples["id"], "reward_model_checkpoint_id": "ckpt_0"}, "reward_model_checkpoint_id"),
    ):
        err = client.post("/v1/labelling-jobs", json=body)
        assert err.status_code == 404 and err.json()["error"]["details"]["field"] == field
    # another project's samples or reward model: 404, as if they did not exist
    err = other.post("/v1/labelling-jobs", json={"samples_id": samples["id"], "reward_model_checkpoint_id": rm_ckpt})
    assert err.status_code == 404 and err.json()["error"]["details"]["field"] == "samples_id"
    samples_lines = client.get(f"/v1/feedback/{samples['id']}/content").content
    own_samples = other.post("/v1/feedback", content=samples_lines, headers={"Content-Type": "application/x-ndjson"})
    assert own_samples.status_code == 201 and own_samples.json()["kind"] == "sampled"
    err = other.post(
        "/v1/labelling-jobs", json={"samples_id": own_samples.json()["id"], "reward_model_checkpoint_id": rm_ckpt}
    )
    assert err.status_code == 404 and err.json()["error"]["details"]["field"] == "reward_model_checkpoint_id"
    assert other.get("/v1/jobs").json()["items"] == []  # nothing was queued for it
    for gen in ({"checkpoint_id": rm_ckpt}, {"model_id": model["id"]}, {"run_id": rm_run["id"]}):
        err = other.post("/v1/sampling-jobs", json={"prompt_set_id": ps["id"], **gen})
        assert err.status_code == 404  # foreign prompt set (and generator)
    other_ps = _ok(post_file(other, "/v1/prompts", PROMPTS))
    for gen, field in (
        ({"checkpoint_id": rm_ckpt}, "checkpoint_id"),
        ({"model_id": model["id"]}, "model_id"),
        ({"run_id": rm_run["id"]}, "run_id"),
    ):
        err = other.post("/v1/sampling-jobs", json={"prompt_set_id": other_ps["id"], **gen})
        assert err.status_code == 404 and err.json()["error"]["details"]["field"] == field, err.text
    err = client.post(
        "/v1/sampling-jobs", json={"prompt_set_id": ps["id"], "model_id": model["id"], "run_id": rm_run["id"]}
    )
    assert err.status_code == 422 and err.json()["error"]["code"] == "invalid_generator"
    err = client.post(
        "/v1/sampling-jobs", json={"prompt_set_id": ps["id"], "model_id": model["id"], "params": {"n": 64}}
    )
    assert err.status_code == 422 and err.json()["error"]["code"] == "too_many_samples"
    assert "64 x 6 = 384" in err.json()["error"]["message"]


def test_cancel_a_running_sampling_job(api, work, tiny_dir: Path) -> None:
    client, _ = api
    model = _ok(client.post("/v1/models", json={"name": "tiny", "path": str(tiny_dir)}))
    ps = _ok(post_file(client, "/v1/prompts", PROMPTS * 1))
    job = _ok(
        client.post(
            "/v1/sampling-jobs",
            json={
                "prompt_set_id": ps["id"],
                "model_id": model["id"],
                "params": {"n": 8, "max_new_tokens": 2000, "batch_size": 1},
            },
        )
    )
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(work(job["id"])))
    worker.start()
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job['id']}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # the subprocess is generating
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    worker.join(timeout=120)
    assert outcome == ["cancelled"]
    final = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["output_feedback_id"] is None

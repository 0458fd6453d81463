"""Live job events and the dashboard, end to end, on a real `halos serve` that trains two real rounds.

- The SSE stream of round 2 is read while it waits, runs and finishes; the reader disconnects
  after a few messages and resumes with `Last-Event-ID`: the union is exactly the job's events
  (`GET /v1/jobs/{id}/events`) and metric points, nothing twice, ending with `event: end`.
- Headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium) opens `/ui` while
  round 1 trains, types the API key, opens the run and is never reloaded: when both rounds are
  done, the series the page plotted (`window.halosPlotData`) equal the API's metric series, with
  round boundaries at each round's last step and the eval points per round. A screenshot is saved
  to `$HALOS_TEST_ARTIFACTS` (default `test-artifacts/`) as `dashboard.png`.

Selenium + chromedriver rather than CDP by hand or playwright: both Debian packages come from the
same Chromium build (matching versions, no browser download), and selenium is the well-kept
client of that protocol (WebDriver) with explicit waits.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from halos_client import Client
from halos_core.synthetic import pairwise_records, to_jsonl_bytes
from tests.e2e.conftest import embedded_deployment, wait_for_job

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
HYPERPARAMS = {
    "lr": 5e-4,
    "batch_size": 8,
    "microbatch_size": 4,
    "warmup_steps": 2,
    "max_length": 64,
    "max_prompt_length": 32,
    "checkpoint_every": 2,
    "eval_fraction": 0.2,
}
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
METRIC_KEYS = ("loss", "rewards/accuracy", "rewards/margin")


def _upload(client: httpx.Client, seed: int) -> str:
    body = to_jsonl_bytes(pairwise_records(40, seed=seed, id_prefix="p"))  # 32 train (4 steps) + 8 eval
    resp = client.post("/v1/feedback", content=body, headers={"Content-Type": "application/x-ndjson"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


class StreamReader(threading.Thread):
    """Reads a job's SSE stream; drops the connection after `cut_after` messages, then resumes with
    Last-Event-ID (as a client after a network blip would)."""

    def __init__(self, base_url: str, key: str, job_id: str, cut_after: int = 3):
        super().__init__(daemon=True)
        self.base_url, self.key, self.job_id, self.cut_after = base_url, key, job_id, cut_after
        self.messages: list[tuple[str, str, dict]] = []
        self.connections = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            last_id = None
            with httpx.Client(
                base_url=self.base_url,
                timeout=httpx.Timeout(60, read=90),
                headers={"Authorization": f"Bearer {self.key}"},
            ) as client:
                while True:
                    self.connections += 1
                    headers = {"Last-Event-ID": last_id} if last_id else {}
                    with connect_sse(client, "GET", f"/v1/jobs/{self.job_id}/events/stream", headers=headers) as src:
                        n = 0
                        for sse in src.iter_sse():
                            if not sse.data:  # a heartbeat comment (httpx-sse yields it as an empty message)
                                continue
                            n += 1
                            self.messages.append((sse.event, sse.id, json.loads(sse.data)))
                            last_id = sse.id
                            if sse.event == "end":
                                return
                            if self.connections == 1 and n >= self.cut_after:
                                break  # drop the connection mid-stream
        except BaseException as exc:
            self.error = exc


def _browser(profile: Path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "no browser: Debian's chromium and chromium-driver are not installed "
            "(apt-get install -y chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1500,1100",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    try:
        return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except Exception as exc:
        pytest.skip(f"headless chromium could not start: {exc}")


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _api_series(client: httpx.Client, job_ids: list[str]) -> dict[str, dict[str, list[list[float]]]]:
    points = [p for j in job_ids for p in client.get(f"/v1/jobs/{j}/metrics").json()["items"]]
    out: dict[str, dict[str, list[list[float]]]] = {}
    for key in METRIC_KEYS:
        out[key] = {
            split: sorted(
                [p["step"], p["data"][key]]
                for p in points
                if p["split"] == split and isinstance(p["data"].get(key), (int, float))
            )
            for split in ("train", "eval")
        }
    return out


def test_live_events_and_dashboard(tmp_path, tiny_model_dir):
    driver = _browser(tmp_path / "chromium-profile")
    artifacts = Path(os.environ.get("HALOS_TEST_ARTIFACTS", REPO / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        with embedded_deployment(tmp_path / "data") as dep:
            client = dep.client()
            base = f"http://127.0.0.1:{dep.port}"
            model = client.post("/v1/models", json={"name": "tiny", "path": str(tiny_model_dir)}).json()
            run = client.post(
                "/v1/runs",
                json={
                    "name": "dashboard e2e",
                    "model_id": model["id"],
                    "loss": {"name": "dpo", "beta": 0.1},
                    "hyperparams": HYPERPARAMS,
                },
            ).json()
            fb1, fb2 = _upload(client, 1), _upload(client, 2)
            r1 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb1]}).json()
            r2 = client.post(f"/v1/runs/{run['id']}/rounds", json={"feedback_ids": [fb2]}).json()
            reader = StreamReader(base, dep.key or "", r2["job_id"])
            reader.start()

            # the page opens while round 1 trains and is never reloaded
            driver.get(f"{base}/ui/")
            driver.find_element("id", "key").send_keys(dep.key)
            driver.find_element("css selector", "#login-form button").click()
            _wait(lambda: driver.find_elements("css selector", f"#runs li[data-run-id='{run['id']}']"), 30, "run list")
            driver.find_element("css selector", f"#runs li[data-run-id='{run['id']}']").click()
            driver.execute_script("window.__sameDocument = true;")
            _wait(
                lambda: driver.execute_script("return window.halosPlotData && window.halosPlotData.run_id"),
                30,
                "first plot",
            )

            job1, job2 = wait_for_job(client, r1["job_id"]), wait_for_job(client, r2["job_id"])
            assert job1["status"] == job2["status"] == "succeeded", (job1, job2, dep.logs())
            reader.join(timeout=120)
            assert reader.error is None, reader.error

            # --- the stream: resumed once, everything exactly once, in order, ending with `end`
            assert reader.connections == 2, reader.connections
            ids = [m[1] for m in reader.messages if m[0] != "end"]
            assert len(ids) == len(set(ids))
            assert reader.messages[-1][0] == "end" and reader.messages[-1][2]["status"] == "succeeded"
            api_events = client.get(f"/v1/jobs/{r2['job_id']}/events").json()["items"]
            streamed = [m[2] for m in reader.messages if m[0] not in ("metric", "end")]
            assert streamed == api_events
            assert [e["type"] for e in api_events][:2] == ["job.waiting_for_parent", "job.queued"]
            assert {"job.started", "job.checkpoint_saved", "job.eval_done", "checkpoint.created", "job.succeeded"} <= {
                e["type"] for e in api_events
            }
            with Client(base, dep.key) as sdk:  # the SDK's iterator over the same stream
                assert [m.data for m in sdk.jobs.events(r2["job_id"], metrics=False) if m.event != "end"] == api_events
            api_points = client.get(f"/v1/jobs/{r2['job_id']}/metrics").json()["items"]
            assert sorted((m[2]["step"], m[2]["split"]) for m in reader.messages if m[0] == "metric") == sorted(
                (p["step"], p["split"]) for p in api_points
            )

            # --- the page: updated live (same document), plotted series == the API's numbers
            expected = _api_series(client, [r1["job_id"], r2["job_id"]])

            def page_done():
                data = driver.execute_script("return window.halosPlotData")
                done = data and [r["status"] for r in data["rounds"]] == ["succeeded", "succeeded"]
                return data if done and data["series"] == expected else None

            try:
                data = _wait(page_done, 60, "the page to show both finished rounds with the API's series")
            finally:
                driver.save_screenshot(str(artifacts / "dashboard.png"))
            assert driver.execute_script("return window.__sameDocument === true")  # no reload happened
            last = [
                max(p["step"] for p in client.get(f"/v1/jobs/{j}/metrics").json()["items"] if p["split"] == "train")
                for j in (r1["job_id"], r2["job_id"])
            ]
            assert last[1] > last[0] >= 3  # round 2 continues round 1's step count
            assert data["boundaries"] == [{"round": 1, "step": last[0]}, {"round": 2, "step": last[1]}]
            assert [p[0] for p in data["series"]["loss"]["eval"]] == last  # one eval pass at each round's end
            assert len(data["series"]["loss"]["train"]) == last[1]
            rows = driver.find_elements("css selector", "#rounds tbody tr")
            assert [r.find_element("css selector", ".status").text for r in rows] == ["succeeded", "succeeded"]
            assert job1["checkpoint_id"] in rows[0].text and job1["checkpoint_id"] in rows[1].text  # lineage
            assert len(driver.find_elements("css selector", "#charts .chart canvas")) == 3
    finally:
        driver.quit()

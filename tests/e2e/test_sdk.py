"""The Python SDK against a real `halos serve` (real HTTP, real worker, real `accelerate launch`).

- pagination across pages (sync and async);
- a POST whose answer is lost on the wire is resent with the same Idempotency-Key and the
  server replays it: one object, not two (a proxy in front of the real server cuts the first answer);
- a call made while the server is down rides out its restart;
- a real 429 from the server's rate limiter: Retry-After honoured (and not waited for past the limit);
- `jobs.wait` follows a real round to its checkpoint (percent done, elapsed, ETA), and raises
  `JobFailed` with the server's reason for a round that fails.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from halos_client import NO_RETRIES, AsyncClient, Client, JobFailed, RateLimitError, RetryPolicy
from halos_core.synthetic import pairwise_records, to_jsonl_bytes
from tests.e2e.conftest import Deployment, embedded_deployment

pytestmark = pytest.mark.e2e

HP = {"lr": 5e-4, "batch_size": 8, "microbatch_size": 4, "max_length": 64, "max_prompt_length": 32}


def feedback_bytes(seed: int, n: int = 32) -> bytes:
    return to_jsonl_bytes(pairwise_records(n, seed=seed, test_fraction=0.2, id_prefix=f"s{seed}-"))


@pytest.fixture(scope="module")
def dep(tmp_path_factory) -> Iterator[Deployment]:
    with embedded_deployment(tmp_path_factory.mktemp("sdk") / "data") as deployment:
        yield deployment


def client_for(dep: Deployment, key: str | None = None, **kw) -> Client:
    return Client(f"http://127.0.0.1:{dep.port}", key or dep.key, **kw)


# --------------------------------------------------------------------------- pagination


def test_lists_iterate_across_pages(dep: Deployment) -> None:
    key = dep.halos("keys", "create", "--project", "paging").strip()  # a project of its own: exactly these
    with client_for(dep, key) as client:
        uploaded = [client.feedback.upload(feedback_bytes(seed, 4), filename=f"{seed}.jsonl").id for seed in range(5)]
        listed = [fb.id for fb in client.feedback.list(page_size=2)]  # 3 pages
        assert listed == uploaded[::-1]  # newest first, each exactly once

    async def async_ids() -> list[str]:
        async with AsyncClient(f"http://127.0.0.1:{dep.port}", key) as aclient:
            return [fb.id async for fb in aclient.feedback.list(page_size=2)]

    assert asyncio.run(async_ids()) == listed


# --------------------------------------------------------------------------- idempotent replay


class LoseFirstAnswer:
    """A TCP proxy in front of the real server. The first request whose first bytes start with
    `prefix` is forwarded whole; as soon as the server starts answering, the proxy hangs up on the
    client and drops the answer: the work is done, the client never hears of it."""

    def __init__(self, upstream_port: int, prefix: bytes) -> None:
        self.upstream_port, self.prefix = upstream_port, prefix
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.heads: list[bytes] = []  # the first bytes of every matching request
        self.answers: list[bytes] = []  # the first bytes of the answers that were passed on
        self.lost = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record_first: list[bytes] | None = None) -> None:
        first = True
        try:
            while data := src.recv(65536):
                if record_first is not None and first:
                    record_first.append(data)  # before passing it on: the client may look at once
                first = False
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self, conn: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        head = conn.recv(65536)
        matching = head.startswith(self.prefix)
        lose = matching and self.lost == 0
        if matching:
            self.heads.append(head)
        if lose:
            self.lost += 1
        up.sendall(head)
        threading.Thread(target=self._pump, args=(conn, up), daemon=True).start()
        if not lose:
            self._pump(up, conn, self.answers if matching else None)
            return
        up.recv(65536)  # the server has answered: the object exists now
        # Hang up on the client without a byte of the answer (shutdown, not close: the pump
        # thread still blocks in recv on this socket, and only shutdown wakes it).
        conn.shutdown(socket.SHUT_RDWR)
        up.close()


def _keys(heads: list[bytes]) -> list[str]:
    out = []
    for head in heads:
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"idempotency-key:"):
                out.append(line.split(b":", 1)[1].strip().decode())
    return out


def test_a_lost_answer_is_replayed_by_idempotency_key_not_done_twice(dep: Deployment, tiny_model_dir: Path) -> None:
    key = dep.halos("keys", "create", "--project", "replay").strip()
    with client_for(dep, key) as direct:
        model = direct.models.register("tiny", str(tiny_model_dir))

    proxy = LoseFirstAnswer(dep.port, b"POST /v1/feedback")
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", key) as client:
            fb = client.feedback.upload(feedback_bytes(7))
    finally:
        proxy.close()
    assert proxy.lost == 1 and len(proxy.heads) == 2
    assert len(set(_keys(proxy.heads))) == 1  # the resend carried the same key
    assert b"idempotent-replayed: true" in proxy.answers[0].lower()  # the server answered it as a replay
    with client_for(dep, key) as direct:
        assert [f.id for f in direct.feedback.list()] == [fb.id]  # one file stored, the one we were given

        run = direct.runs.create(model.id, "dpo", hyperparams=HP)
    proxy = LoseFirstAnswer(dep.port, f"POST /v1/runs/{run.id}/rounds".encode())
    try:
        with Client(f"http://127.0.0.1:{proxy.port}", key) as client:
            rnd = client.rounds.create(run.id, [fb.id])
    finally:
        proxy.close()
    assert proxy.lost == 1 and len(set(_keys(proxy.heads))) == 1
    with client_for(dep, key) as direct:
        rounds = direct.rounds.list(run.id)
        assert [(r.round_id, r.job_id) for r in rounds] == [(rnd.round_id, rnd.job_id)]  # one round, one job
        assert [j.id for j in direct.jobs.list()] == [rnd.job_id]
        direct.jobs.wait(rnd.job_id, timeout=300, poll_interval=0.5)


# --------------------------------------------------------------------------- real outages


def test_a_call_made_while_the_server_is_down_rides_out_its_restart(tmp_path: Path) -> None:
    with embedded_deployment(tmp_path / "data") as dep:
        # A longer budget than the default (~16 s) so a slow start on a loaded machine still fits.
        with client_for(dep, retry=RetryPolicy(max_attempts=9)) as client:
            assert list(client.feedback.list()) == []
            dep.stop()
            result: dict = {}
            caller = threading.Thread(target=lambda: result.update(fb=client.feedback.upload(feedback_bytes(3))))
            started = time.monotonic()
            caller.start()
            time.sleep(2.0)
            assert caller.is_alive()  # still retrying: nothing listens on the port
            dep.spawn("serve", "--port", str(dep.port), log_name="serve-restarted.log")
            caller.join(120)
            assert not caller.is_alive() and "fb" in result, dep.logs()
            assert time.monotonic() - started >= 2.0
            assert [f.id for f in client.feedback.list()] == [result["fb"].id]


def test_a_real_429_is_waited_out_per_retry_after(tmp_path: Path) -> None:
    with embedded_deployment(tmp_path / "data", {"HALOS_RATE_LIMIT_PER_MINUTE": "3"}) as dep:
        with client_for(dep, retry=NO_RETRIES) as client:
            for _ in range(3):
                list(client.feedback.list())
            with pytest.raises(RateLimitError) as refused:
                list(client.feedback.list())
        retry_after = refused.value.retry_after
        assert retry_after is not None and 1 <= retry_after <= 60 and refused.value.code == "rate_limited"

        with client_for(dep, retry=RetryPolicy(max_retry_after_s=5)) as impatient:
            t0 = time.monotonic()
            with pytest.raises(RateLimitError):
                impatient.feedback.upload(feedback_bytes(4))
            assert time.monotonic() - t0 < 5  # a wait beyond its limit is not taken

        with client_for(dep) as client:  # the default waits as long as the server says
            t0 = time.monotonic()
            fb = client.feedback.upload(feedback_bytes(4))
            waited = time.monotonic() - t0
            assert waited >= retry_after - 2, waited
            assert [f.id for f in client.feedback.list()] == [fb.id]  # refused tries stored nothing
        print(f"\n[sdk] 429 Retry-After {retry_after:.0f} s; the upload succeeded after {waited:.1f} s")


# --------------------------------------------------------------------------- wait()


def test_wait_follows_a_real_round_to_its_checkpoint(dep: Deployment, tiny_model_dir: Path) -> None:
    with client_for(dep) as client:
        model = client.models.register("tiny", str(tiny_model_dir))
        fb = client.feedback.upload(feedback_bytes(11, 64))
        run = client.runs.create(model.id, {"name": "dpo", "beta": 0.1}, hyperparams=HP)
        rnd = client.rounds.create(run.id, [fb.id])
        seen = []
        job = client.jobs.wait(rnd.job_id, timeout=300, poll_interval=0.3, on_progress=seen.append)
        assert job.status == "succeeded" and job.checkpoint_id
        assert job.percent_done == 100.0 and job.eta_s == 0.0 and job.elapsed_s and job.elapsed_s > 0
        assert "running" in {s.status for s in seen}
        running = [s for s in seen if s.status == "running"]
        assert all(s.elapsed_s is not None for s in running)
        total = job.progress.total_steps
        points = list(client.jobs.metrics(job.id, split="train", page_size=2))  # several pages
        assert [p.step for p in points] == list(range(1, total + 1))
        lineage = client.checkpoints.lineage(job.checkpoint_id)
        assert lineage.model.id == model.id and [i.job_id for i in lineage.items] == [job.id]

    async def again() -> tuple[str, list[str]]:
        async with AsyncClient(f"http://127.0.0.1:{dep.port}", dep.key) as aclient:
            final = await aclient.jobs.wait(rnd.job_id, timeout=10)
            return final.status, [j.id async for j in aclient.jobs.list(page_size=1)]

    status, job_ids = asyncio.run(again())
    assert status == "succeeded" and rnd.job_id in job_ids and len(job_ids) == len(set(job_ids))


def test_wait_raises_job_failed_with_the_servers_reason(dep: Deployment, tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = dep.data_dir / "models" / f"sft-broken-{tmp_path.name}"  # where models may be registered
    shutil.copytree(tiny_model_dir, model_dir)
    with client_for(dep) as client:
        model = client.models.register("broken", str(model_dir))
        (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")  # after registration
        run = client.runs.create(model.id, "dpo", hyperparams=HP)
        rnd = client.rounds.create(run.id, [client.feedback.upload(feedback_bytes(12)).id])
        with pytest.raises(JobFailed) as failed:
            client.jobs.wait(rnd.job_id, timeout=300, poll_interval=0.5)
        assert failed.value.job.status == "failed" and failed.value.reason == failed.value.job.error
        assert failed.value.reason and rnd.job_id in str(failed.value)
        print(f"\n[sdk] failed round's reason: {failed.value.reason[-300:]}")
        final = client.jobs.wait(rnd.job_id, raise_on_failure=False)
        assert final.status == "failed" and final.eta_s is None

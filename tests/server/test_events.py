"""Job events are written by the state machine, in the transaction of the change they describe:
the whole lifecycle (retry, crash, cancel, chaining) in order, nothing for a transition that did
not happen, the webhook outbox rows with them; the events API pages and the SSE stream resumes."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, SQLModel, select
from standardwebhooks.webhooks import Webhook

from halos_core.round_result import RoundResult
from server import jobs
from server.db import make_engine
from server.jobs import Outcome
from server.models import Event, JobStatus, OutboundDelivery, WebhookEndpoint, utcnow
from server.webhooks import signing
from tests.worker.support import add_round, make_settings, reload, seed_run

TTL = 30.0


@pytest.fixture
def env(tmp_path: Path):
    settings = make_settings(tmp_path / "data")
    settings.ensure_dirs()
    engine = make_engine(settings.db_url)
    SQLModel.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as session:
        run = seed_run(session, tmp_path)
        yield session, run, tmp_path
    engine.dispose()


def _events(session: Session, job_id: str) -> list[Event]:
    rows = list(session.exec(select(Event).where(Event.job_id == job_id).order_by(Event.id)).all())
    session.commit()
    return rows


def _types(session: Session, job_id: str) -> list[tuple[str, str | None, int | None]]:
    return [(e.type, e.status, e.attempt) for e in _events(session, job_id)]


def _result(tmp: Path) -> RoundResult:
    d = tmp / "final"
    d.mkdir(parents=True, exist_ok=True)
    return RoundResult(
        job_id="job_x",
        final_dir=str(d),
        manifest_sha256="ab" * 32,
        step=6,
        examples=24,
        round_step=6,
        total_steps=6,
        loss="dpo",
        reference_sha256="cd" * 32,
    )


def test_lifecycle_with_a_crash_and_retry_in_order(env):
    session, run, tmp = env
    job = add_round(session, run, tmp)
    child = add_round(session, run, tmp, parent=job)
    c1 = jobs.claim(session, job.id, "host-a", 1, TTL)
    jobs.record_progress(
        session,
        job.id,
        c1.lease_token,
        [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}, {"split": "eval", "step": 2, "loss": 0.65}],
    )
    assert jobs.record_checkpoint_saved(session, job.id, c1.lease_token, 2, "step-000002")
    jobs.finish(session, job.id, c1.lease_token, Outcome("crashed", error="killed by signal 9"), retry_backoff_s=0)
    c2 = jobs.claim(session, job.id, "host-b", 2, TTL)
    # the retry finds the first attempt's checkpoint again: no second event for the same step
    assert not jobs.record_checkpoint_saved(session, job.id, c2.lease_token, 2, "step-000002")
    assert jobs.record_checkpoint_saved(session, job.id, c2.lease_token, 4, "step-000004")
    done = jobs.finish(session, job.id, c2.lease_token, Outcome("succeeded", result=_result(tmp)))
    assert done.status == JobStatus.succeeded

    assert _types(session, job.id) == [
        ("job.queued", "queued", None),
        ("job.started", "running", 1),
        ("job.eval_done", "running", 1),
        ("job.checkpoint_saved", "running", 1),
        ("job.attempt_crashed", "running", 1),
        ("job.retry_scheduled", "queued", 1),
        ("job.started", "running", 2),
        ("job.checkpoint_saved", "running", 2),
        ("checkpoint.created", "succeeded", 2),
        ("job.succeeded", "succeeded", 2),
    ]
    events = _events(session, job.id)
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert all(e.run_id == run.id and e.project_id == run.project_id for e in events)
    crashed, retry = events[4], events[5]
    assert crashed.data["reason"] == "killed by signal 9"
    assert retry.data["retry"] == 2 and retry.data["max_attempts"] == 3
    assert events[2].data["step"] == 2 and events[2].data["metrics"]["loss"] == 0.65
    created, succeeded = events[8], events[9]
    ckpt_id = reload(session, job.id) and jobs.job_checkpoint(session, reload(session, job.id)).id
    assert created.subject_id == ckpt_id and succeeded.data["checkpoint_id"] == ckpt_id
    assert succeeded.data["step"] == 6

    # the child waited for its parent, then was queued from the parent's checkpoint in the same commit
    assert [(t, s) for t, s, _ in _types(session, child.id)] == [
        ("job.waiting_for_parent", "waiting"),
        ("job.queued", "queued"),
    ]
    queued = _events(session, child.id)[1]
    assert queued.data["parent_job_id"] == job.id and queued.data["parent_checkpoint_id"] == ckpt_id


def test_no_event_for_a_transition_that_did_not_happen(env):
    session, run, tmp = env
    job = add_round(session, run, tmp)
    c = jobs.claim(session, job.id, "h", 1, TTL)
    before = _types(session, job.id)
    assert jobs.claim(session, job.id, "h", 1, TTL) is None  # duplicate delivery
    jobs.finish(session, job.id, "stale-token", Outcome("failed", error="x"))  # stale runner
    assert not jobs.release(session, job.id, "stale-token", "shutdown")
    jobs.record_progress(session, job.id, "stale-token", [{"split": "eval", "step": 1}])
    assert not jobs.record_checkpoint_saved(session, job.id, "stale-token", 1, "step-000001")
    assert _types(session, job.id) == before
    assert jobs.release(session, job.id, c.lease_token, "worker shutting down")
    assert _types(session, job.id)[-1] == ("job.released", "queued", 1)


def test_expired_leases_crash_retry_then_fail_and_fail_the_waiting_children(env):
    session, run, tmp = env
    job = add_round(session, run, tmp)
    child = add_round(session, run, tmp, parent=job)
    for attempt in range(1, 4):
        jobs.claim(session, job.id, "h", 1, TTL, now=utcnow() + timedelta(hours=attempt))
        jobs.expire_leases(session, utcnow() + timedelta(hours=attempt, minutes=5), retry_backoff_s=0)
    types = [t for t, _, _ in _types(session, job.id)]
    assert types == [
        "job.queued",
        "job.started",
        "job.attempt_crashed",
        "job.retry_scheduled",
        "job.started",
        "job.attempt_crashed",
        "job.retry_scheduled",
        "job.started",
        "job.attempt_crashed",
        "job.failed",
    ]
    failed = _events(session, job.id)[-1]
    assert failed.status == "failed" and "crashed 3 times" in failed.data["error"]
    assert _events(session, job.id)[2].data["reason"].startswith("lease expired")
    child_events = _events(session, child.id)
    assert [e.type for e in child_events] == ["job.waiting_for_parent", "job.failed"]
    assert "parent round 1" in child_events[-1].data["error"]


def test_cancel_events(env):
    session, run, tmp = env
    queued = add_round(session, run, tmp)
    jobs.request_cancel(session, queued.id)
    assert _types(session, queued.id)[-1] == ("job.cancelled", "cancelled", None)
    running = add_round(session, run, tmp)
    c = jobs.claim(session, running.id, "h", 1, TTL)
    jobs.request_cancel(session, running.id)
    jobs.request_cancel(session, running.id)  # a second request changes nothing, writes nothing
    jobs.finish(session, running.id, c.lease_token, Outcome("cancelled", error="cancelled by request"))
    assert [t for t, _, _ in _types(session, running.id)] == [
        "job.queued",
        "job.started",
        "job.cancelling",
        "job.cancelled",
    ]


def test_outbox_rows_are_written_with_their_event_and_signed_bodies_verify(env):
    session, run, tmp = env
    finished = WebhookEndpoint(
        project_id=run.project_id,
        url="https://hooks.example.com/a",
        event_types=["job.finished"],
        secret=signing.new_secret(),
    )
    everything = WebhookEndpoint(
        project_id=run.project_id, url="https://hooks.example.com/b", event_types=["*"], secret=signing.new_secret()
    )
    session.add_all([finished, everything])
    session.commit()
    job = add_round(session, run, tmp)
    c = jobs.claim(session, job.id, "h", 1, TTL)
    jobs.finish(session, job.id, c.lease_token, Outcome("failed", error="bad data"))
    rows = list(session.exec(select(OutboundDelivery).order_by(OutboundDelivery.event_id)).all())
    session.commit()
    assert [(r.endpoint_id, r.type) for r in rows if r.endpoint_id == finished.id] == [(finished.id, "job.failed")]
    assert [r.type for r in rows if r.endpoint_id == everything.id] == ["job.queued", "job.started", "job.failed"]
    failed_event = _events(session, job.id)[-1]
    delivery = next(r for r in rows if r.endpoint_id == finished.id)
    assert delivery.event_id == failed_event.id and delivery.status == "pending"
    body = json.loads(delivery.body)
    assert body["type"] == "job.failed" and body["data"]["job_id"] == job.id and body["data"]["error"] == "bad data"
    headers = signing.headers(delivery.id, delivery.body, utcnow(), [finished.secret])
    assert Webhook(finished.secret).verify(delivery.body, headers)["data"]["status"] == "failed"


def test_a_rolled_back_transition_leaves_no_event(env):
    session, run, tmp = env
    parent = add_round(session, run, tmp)
    c = jobs.claim(session, parent.id, "h", 1, TTL)
    jobs.finish(session, parent.id, c.lease_token, Outcome("failed", error="x"))
    n = len(list(session.exec(select(Event)).all()))
    session.commit()
    with pytest.raises(jobs.ParentFailed):
        from server.models import Job

        jobs.submit(
            session, Job(project_id=run.project_id, spec={}, parent_job_id=parent.id), refuse_failed_parent=True
        )
    assert len(list(session.exec(select(Event)).all())) == n


# --------------------------------------------------------------------------- API


def test_events_api_pages_and_the_stream_resumes(client, session, settings, tmp_path):
    from tests.server._seed import seed_project

    seeded = seed_project(client, session, settings, tmp_path / "seed", tag="ev")
    job_id = seeded.done_job_id
    all_events = client.get(f"/v1/jobs/{job_id}/events").json()["items"]
    assert [e["type"] for e in all_events] == ["job.queued", "job.started", "checkpoint.created", "job.succeeded"]
    first = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 2}).json()
    rest = client.get(f"/v1/jobs/{job_id}/events", params={"after": first["next_cursor"]}).json()
    assert first["items"] + rest["items"] == all_events
    assert client.get(f"/v1/jobs/{job_id}/events", params={"after": all_events[-1]["id"]}).json()["items"] == []

    def read_stream(headers=None):
        from httpx_sse import EventSource

        with client.stream("GET", f"/v1/jobs/{job_id}/events/stream", headers=headers or {}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            return [(s.event, s.id, json.loads(s.data)) for s in EventSource(resp).iter_sse()]

    messages = read_stream()
    assert messages[-1][0] == "end" and messages[-1][2]["status"] == "succeeded"
    assert [m[2]["id"] for m in messages if m[0].startswith(("job.", "checkpoint."))] == [e["id"] for e in all_events]
    points = [(m[2]["step"], m[2]["split"]) for m in messages if m[0] == "metric"]
    assert points == [(1, "train"), (2, "train"), (2, "eval"), (4, "train")]
    # resume after the 3rd message: exactly the rest, nothing twice
    resumed = read_stream({"Last-Event-ID": messages[2][1]})
    assert [m[1] for m in resumed] == [m[1] for m in messages[3:]]
    # the list URL with Accept: text/event-stream is the same stream
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
    # a Last-Event-ID this server never sent is ignored: the stream starts from the beginning; so is
    # one beyond any id the database can hold (on Postgres it would fail the query: a broken stream)
    assert read_stream({"Last-Event-ID": "garbage"}) == messages
    assert read_stream({"Last-Event-ID": f"{2**31}.0"}) == messages
    # a cursor beyond any id: 422, not the database's out-of-range error (a 500 on Postgres)
    assert client.get(f"/v1/jobs/{job_id}/events", params={"after": 2**31}).status_code == 422
    # feedback.stored went to the seeded webhook's outbox
    deliveries = client.get(f"/v1/webhooks/{seeded.webhook_id}/deliveries").json()["items"]
    assert "feedback.stored" in {d["type"] for d in deliveries}


def test_client_iter_events_follows_to_the_end_and_resumes(client, session, settings, tmp_path):
    from halos_client.events import iter_events
    from tests.server._seed import seed_project

    seeded = seed_project(client, session, settings, tmp_path / "seed", tag="it")
    messages = list(iter_events(client, seeded.done_job_id))
    assert messages[-1].event == "end" and messages[-1].data["status"] == "succeeded"
    api = client.get(f"/v1/jobs/{seeded.done_job_id}/events").json()["items"]
    assert [m.data for m in messages if m.event not in ("metric", "end")] == api
    rest = list(iter_events(client, seeded.done_job_id, last_event_id=messages[1].id, metrics=False))
    seen_event = int(messages[1].id.split(".")[0])  # "<event id>.<metric id>"
    assert [m.data["id"] for m in rest if m.event != "end"] == [e["id"] for e in api if e["id"] > seen_event]
    assert all(m.event != "metric" for m in rest)

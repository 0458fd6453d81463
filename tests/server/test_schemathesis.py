"""S1: schemathesis over the OpenAPI spec, against the real app in process (ASGI), with auth.

Two tests, both on one seeded temp data dir (SQLite + embedded broker) and one API key:

- `test_api[METHOD /path]`: every operation, every phase schemathesis runs from pytest
  (explicit examples, coverage — boundary values, unexpected methods, wrong content types —
  and fuzzing, positive and negative), every built-in check, bounded to MAX_EXAMPLES fuzzed
  cases per operation, deterministic (fixed seed, no example database).
- `test_stateful_links`: the OpenAPI links (upload → get feedback, register → get model,
  create run → get run / create round, create round → job, metrics, logs, cancel, run) chained
  by schemathesis' state machine, with the same checks.

Generated ids almost never exist, so part of the generated cases get *real* ids of the seeded
project (path parameters, the ids inside create-run/create-round bodies, a real model
directory, a valid feedback file, a server-issued pagination cursor): that way the 200/201
answers are schema-checked too, not only the 404/422 ones. Edits are made on the case before it
is sent; schemathesis re-validates an edited case, so a case stays "positive" or "negative"
according to what is actually sent.

Pass condition: no server error, no response that violates the spec (schema, status code,
content type, headers), no schema-valid request refused except where listed in EXCLUSIONS.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis import Config, GenerationMode
from sqlmodel import Session, SQLModel

from halos_core.synthetic import pairwise_records, to_jsonl_bytes
from server.app import create_app
from server.db import get_engine
from server.models import ApiKey
from server.services.keys import PREFIX_CHARS, get_or_create_project, hash_key
from server.settings import Settings
from tests.server._seed import LABEL_STUDIO_DELIVERY, Seeded, seed_project

LABEL_STUDIO_EXPORT = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "labelstudio" / "export_pairwise.json").read_text()
)

SEED = 20240611
MAX_EXAMPLES = 25  # fuzzed cases per operation (the coverage phase adds its own, bounded, set)
STATEFUL_SCENARIOS = 30
STATEFUL_STEPS = 6

# Checks that cannot hold for some operations because the schema cannot express a semantic rule
# of the request (these operations still get every other check: server errors, response schema,
# status codes, content types, headers, auth, negative data rejection, ...). Besides the rules
# named below, the three idempotent POSTs refuse — by design (I5) — a reused Idempotency-Key with a
# different body (422 `idempotency_key_reused`), and Hypothesis reuses short keys such as "0".
EXCLUSIONS: dict[str, dict[str, str]] = {
    "positive_data_acceptance": {
        # body must be a valid feedback file (HALOs / TRL / OpenAI records); the schema can only
        # say "array of objects" / "binary", so almost every schema-valid body is a 422
        "upload_feedback": "file content must be valid feedback records",
        # `path` must name an existing directory with config.json, weights and a tokenizer
        "register_model": "model path must exist and hold a loadable model",
        # `model_id` must exist; loss/hyperparams/conversion/lora have cross-field rules
        # (e.g. a `threshold` conversion needs a non-null `threshold`, microbatches must divide
        # the batch) that pydantic validators enforce but JSON Schema does not carry
        "create_run": "referenced model must exist; cross-field config rules",
        # same, plus: feedback ids must exist, the loss must fit the feedback kinds, the parent
        # checkpoint must belong to the run
        "create_round": "referenced feedback/checkpoint must exist; cross-field config rules",
        # `url` must be http(s) and must not name a loopback/private/link-local address (the SSRF
        # guard, docs/RELIABILITY.md S4): JSON Schema's `uri` format admits both
        "create_webhook": "webhook URL must be a public http(s) URL",
        # the online loop: file contents and referenced ids the schema cannot carry
        "upload_prompts": "file content must be valid prompt records",
        "labelstudio_import": "body must be a Label Studio export of tasks this server made",
        "create_sampling_job": "referenced prompt set and generator must exist",
        "create_labelling_job": "referenced samples and reward-model checkpoint must exist",
        "create_integration": "an Argilla integration needs a Standard Webhooks secret (cross-field)",
        "rollback": "the checkpoint must belong to the run",
        "set_retention": "keep_weights_rounds must be >= keep_rounds (cross-field)",
        "webhook": "the delivery must carry the integration's secret / signature",
        "labelstudio_tasks": "the feedback file must be a samples file (stateful links bring uploaded pairwise files)",
    },
    "use_after_free": {
        # a deleted feedback file or prompt set stays readable as a tombstone (`deleted_at`, its
        # sha256), so the lineage of rounds trained on it still names it (server/services/common.py);
        # its content is gone (tests/server/test_storage_lifecycle.py)
        "get_feedback": "a deleted feedback file is a tombstone, not a 404",
        "get_prompt_set": "a deleted prompt set is a tombstone, not a 404",
    },
}


# DELETE operations get the seed's spare objects (nothing uses them: a 204), never the seeded ones
SPARE_FOR_DELETE = {
    "delete_feedback": ("feedback_id", "spare_feedback_id"),
    "delete_prompt_set": ("prompt_set_id", "spare_prompt_set_id"),
    "delete_model": ("model_id", "spare_model_id"),
    "delete_run": ("run_id", "spare_run_id"),
}


def _spec() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        return create_app(Settings(data_dir=Path(d) / "data")).openapi()


# The seeded project's API key, known before collection: schemathesis builds the explicit
# examples (with their headers) while collecting. Stored like `create_api_key` does (hash only).
SECRET = "hk_" + secrets.token_urlsafe(32)

CONFIG = Config.from_dict(
    {
        "seed": SEED,
        # a busy CI box must not turn slowness into failures (no deadline either: schemathesis' default)
        "suppress-health-check": ["too_slow", "filter_too_much"],
        "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
        "checks": {"enabled": True},
        "operations": [
            {"include-operation-id": sorted(ops), "checks": {check: {"enabled": False}}}
            for check, ops in EXCLUSIONS.items()
        ],
    }
)


class _LiveApp:
    """The ASGI app schemathesis sends to (also its own probes, e.g. `ignored_auth`); the `live`
    fixture plugs the real, seeded app in."""

    target: FastAPI | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        assert self.target is not None, "the `live` fixture provides the app"
        await self.target(scope, receive, send)


@dataclass
class Live:
    app: FastAPI = field(repr=False)
    seeded: Seeded
    cursors: dict[str, str] = field(default_factory=dict, repr=False)  # list path -> a real next_cursor
    # a valid JSONL feedback file, as text: a `format: binary` string in the spec, and schemathesis
    # re-validates edited bodies against it (bytes would make the case count as negative)
    feedback_body: str = field(default="", repr=False)
    prompts_body: str = field(default="", repr=False)  # a valid JSONL prompt set, as text


LIVE_APP = _LiveApp()

# The raw-file upload media types: send the generated (or substituted) payload as it is.
schemathesis.serializer.alias(["application/x-ndjson", "application/jsonl"], "application/octet-stream")

schema = schemathesis.openapi.from_dict(_spec(), config=CONFIG)
schema.app = LIVE_APP


@schema.auth(refresh_interval=None, retry_on=[])
class _ApiKey:
    """`Authorization: Bearer <key>` of the seeded project on every request (an auth provider, so
    schemathesis knows the credentials are explicit: `ignored_auth` then re-sends each operation
    without them and with a wrong key, and expects 401)."""

    def get(self, case: Any, ctx: Any) -> str:
        return SECRET

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("schemathesis")
    settings = Settings(
        data_dir=root / "data",
        database_url=f"sqlite:///{root / 'halos.db'}",
        broker_url=f"sqla+sqlite:///{root / 'broker.db'}",
        max_upload_bytes=256 * 1024,
        rate_limit_per_minute=0,
        num_processes=1,
        max_attempts=3,
        auth_enabled=True,
        events_stream_max_s=0.3,
        events_poll_interval_s=0.1,  # streams of unrun jobs end
        model_roots=[root],
    )  # seed_project builds its models under root
    engine = get_engine(settings)
    SQLModel.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as session:
        project = get_or_create_project(session, "alpha")
        session.add(ApiKey(project_id=project.id, prefix=SECRET[:PREFIX_CHARS], key_hash=hash_key(SECRET)))
        session.commit()
        app = create_app(settings)
        with TestClient(app, headers={"Authorization": f"Bearer {SECRET}"}) as client:
            seeded = seed_project(client, session, settings, root / "seed", tag="alpha")
            # a second object of each listed kind, so `limit=1` pages have a next cursor
            seed_project(client, session, settings, root / "seed2", tag="alpha2", seed=7)
            cursors = {}
            for path in (
                "/v1/feedback",
                "/v1/models",
                "/v1/runs",
                "/v1/jobs",
                "/v1/webhooks",
                "/v1/webhooks/{webhook_id}/deliveries",
                "/v1/prompts",
            ):
                page = client.get(path.format(webhook_id=seeded.webhook_id), params={"limit": 1}).json()
                assert page["next_cursor"], (path, page)
                cursors[path] = page["next_cursor"]
        state = Live(
            app=app,
            seeded=seeded,
            cursors=cursors,
            feedback_body=to_jsonl_bytes(pairwise_records(4, seed=11)).decode(),
            prompts_body="".join(
                json.dumps({"prompt_id": f"q{i}", "prompt": [{"role": "user", "content": f"Q{i}?"}]}) + "\n"
                for i in range(3)
            ),
        )
        LIVE_APP.target = app
        try:
            yield state
        finally:
            LIVE_APP.target = None
    from server import queue

    queue.reset()
    engine.dispose()


# --------------------------------------------------------------------------- real ids


def _pick(case: Any, salt: str, n: int, *, with_path: bool = True) -> int:
    """A deterministic choice in range(n) that varies with the generated case (`with_path=False`:
    not with the path parameters — in stateful steps they are server-made ids, random per run)."""
    path = case.path_parameters if with_path else None
    return zlib.crc32(f"{salt}|{path}|{case.query}|{case.body!r}".encode()) % n


def _positive(case: Any, location: str) -> bool:
    meta = case.meta
    if meta is None:
        return True  # stateful steps built from links
    info = meta.components.get(location)
    return info is None or info.mode == GenerationMode.POSITIVE


def realize(case: Any, live: Live, *, stateful: bool = False) -> None:
    """Swap generated ids for the seeded project's real ones in about half of the cases (only
    where that part of the case was generated valid; a real id keeps it valid).

    `stateful`: keep the path parameters (the steps get them from links), and give each request
    its own Idempotency-Key — a scenario's answers must not depend on what earlier scenarios sent
    (Hypothesis replays scenarios and requires the same steps to lead to the same draws)."""
    s = live.seeded
    op = case.operation.definition.raw.get("operationId", "")
    if case.headers and not _positive(case, "header"):
        # An HTTP server ignores header fields it does not know (RFC 9110 §5.1), so an undeclared
        # header name cannot make a request invalid: send only the declared ones (and the key).
        declared = {p.name.lower() for p in case.operation.headers} | {"authorization"}
        kept = {k: v for k, v in case.headers.items() if k.lower() in declared}
        if len(kept) != len(case.headers):
            case.headers = kept
    if stateful and case.headers and "Idempotency-Key" in case.headers and _positive(case, "header"):
        case.headers = {**case.headers, "Idempotency-Key": f"st-{uuid.uuid4().hex}"}
    if not stateful and case.path_parameters and _positive(case, "path") and _pick(case, "path", 2):
        params = dict(case.path_parameters)
        for name in params:
            if name == "job_id":
                params[name] = (s.queued_job_id, s.done_job_id)[_pick(case, "job", 2)]
            elif name == "webhook_id" and op == "delete_webhook":
                params[name] = s.extra["spare_webhook_id"]  # the seeded webhook stays for the other operations
            elif op in SPARE_FOR_DELETE and name == SPARE_FOR_DELETE[op][0]:
                params[name] = s.extra[SPARE_FOR_DELETE[op][1]]  # deleting the seeded object would break the rest
            elif name == "name" and op == "labelstudio_config":
                params[name] = "pairwise"
            elif s.id_for(name, case.operation.path) is not None:
                params[name] = s.id_for(name, case.operation.path)
        case.path_parameters = params
    if case.query and "cursor" in case.query and _positive(case, "query"):
        path = case.operation.path
        if path in live.cursors:  # an opaque cursor is valid only as the server issued it
            case.query = {**case.query, "cursor": live.cursors[path]}
    body = case.body
    if not _positive(case, "body") or not _pick(case, "body", 2, with_path=not stateful):
        return
    if op == "register_model" and isinstance(body, dict) and "path" in body:
        case.body = {**body, "path": str(s.model_dir)}
    elif op == "create_run" and isinstance(body, dict) and "model_id" in body:
        case.body = {**body, "model_id": s.model_id}
    elif op == "create_round" and isinstance(body, dict) and "feedback_ids" in body:
        new = {**body, "feedback_ids": [s.feedback_id]}
        if new.get("parent_checkpoint_id") is not None:
            new["parent_checkpoint_id"] = s.checkpoint_id
        case.body = new
    elif op == "create_sampling_job" and isinstance(body, dict):
        new = {k: v for k, v in body.items() if k not in ("model_id", "run_id")}
        new.update(prompt_set_id=s.prompt_set_id, checkpoint_id=s.checkpoint_id)
        if isinstance(new.get("params"), dict):
            new["params"] = {**new["params"], "n": 1}  # under the server's n x prompts cap
        case.body = new
    elif op == "create_labelling_job" and isinstance(body, dict):
        case.body = {**body, "samples_id": s.samples_id, "reward_model_checkpoint_id": s.reward_checkpoint_id}
    elif op == "rollback" and isinstance(body, dict) and "checkpoint_id" in body:
        case.body = {**body, "checkpoint_id": s.checkpoint_id}
    elif op == "labelstudio_import" and isinstance(body, list):
        case.body = LABEL_STUDIO_EXPORT
    elif op == "webhook" and isinstance(body, dict):  # a recorded Label Studio delivery, with the secret
        case.body = LABEL_STUDIO_DELIVERY
        case.headers = {**(case.headers or {}), "X-Halos-Webhook-Secret": s.integration_secret}
    elif op == "upload_prompts":
        if isinstance(body, dict) and "file" in body:  # multipart
            case.body = {**body, "file": live.prompts_body}
        elif isinstance(body, list):
            case.body = [json.loads(line) for line in live.prompts_body.splitlines()]
        elif isinstance(body, (bytes, str)):
            case.body = live.prompts_body
    elif op == "upload_feedback":
        if isinstance(body, dict) and "file" in body:  # multipart
            case.body = {**body, "file": live.feedback_body}
        elif isinstance(body, list):  # application/json: a HALOs JSON array
            case.body = pairwise_records(3, seed=_pick(case, "fb", 1000))
        elif isinstance(body, (bytes, str)):  # JSONL media types
            case.body = live.feedback_body


# --------------------------------------------------------------------------- tests


# (operation label, status) of every response test_api got, to prove the substitution works
ANSWERS: dict[str, Counter[int]] = defaultdict(Counter)


@schema.parametrize()
def test_api(case: Any, live: Live) -> None:
    realize(case, live)
    response = case.call_and_validate()
    ANSWERS[case.operation.label][response.status_code] += 1


def test_every_operation_was_checked_on_a_success() -> None:
    """Runs after test_api (same module, file order): each operation answered 2xx at least once,
    so its success schema was checked too — not only 404/422 bodies (guards `realize`)."""
    labels = {result.ok().label for result in schema.get_all_operations()}
    if set(ANSWERS) != labels:
        pytest.skip("needs every test_api case of this module in the same session")
    no_success = {
        label: dict(codes)
        for label, codes in ANSWERS.items()
        if not any(200 <= c < 300 for c in codes) and label != "GET /readyz"
    }  # its 200 depends on the broker, not on the request
    assert not no_success, no_success


def test_stateful_links(live: Live) -> None:
    base = schema.as_state_machine()

    answers: list[tuple[str, int]] = []

    class Machine(base):  # type: ignore[valid-type, misc]  # a class schemathesis builds at runtime
        def before_call(self, case: Any) -> None:
            realize(case, live, stateful=True)

        def after_call(self, response: Any, case: Any) -> None:
            super().after_call(response, case)
            answers.append((case.operation.label, response.status_code))

    # The live app keeps its state across scenarios, so a replayed choice sequence can meet other
    # links than the first time: Hypothesis then stops with FlakyStrategyDefinition. That says
    # nothing about the server, so: no shrinking (a real check failure surfaces as itself, not as a
    # replay), and an inconsistent-generation stop ends the run with what it has seen — every
    # response so far must still be free of server errors, and links must have been followed.
    try:
        Machine.run(
            settings=hypothesis.settings(
                max_examples=STATEFUL_SCENARIOS,
                stateful_step_count=STATEFUL_STEPS,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
        )
    except FlakyStrategyDefinition:
        pass
    assert not [a for a in answers if a[1] >= 500], str(sorted(Counter(answers).items()))
    # links were followed: something created in a scenario was then used through a link (the
    # by-id operations only get real ids from links here)
    created = {label for label, status in answers if status == 201}
    linked_ok = {label for label, status in answers if 200 <= status < 300 and "{" in label}
    assert created and linked_ok, str(sorted(Counter(answers).items()))

"""S2 (I7): every route × project A's key on project B's real ids ⇒ 404, indistinguishable from an
id that never existed; A's lists never show B's objects. S3 through the real CLI: keys stored as
hashes only, a revoked key refused at once.

The matrix is not a hand-written list: it walks every route the app serves (through included
routers) and the OpenAPI spec, so a new route is covered as soon as it exists — and one the
matrix cannot drive (a path parameter or a request body it does not know) FAILS the test until
it is taught here, instead of silently going untested.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import column, create_engine, inspect, select, table
from sqlmodel import Session

from halos_core.synthetic import pairwise_records
from server.app import create_app
from server.services.keys import PREFIX_CHARS
from server.settings import Settings
from tests.server._seed import Seeded, seed_project
from tests.server.conftest import SMALL_HP, jsonl

# path or body parameter -> the kind of object it names (its 404 code is `<kind>_not_found`)
ID_KINDS = {
    "feedback_id": "feedback",
    "model_id": "model",
    "run_id": "run",
    "job_id": "job",
    "checkpoint_id": "checkpoint",
    "feedback_ids": "feedback",
    "parent_checkpoint_id": "checkpoint",
    "webhook_id": "webhook",
    "delivery_id": "delivery",
    "prompt_set_id": "prompt_set",
    "samples_id": "feedback",
    "reward_model_checkpoint_id": "checkpoint",
    "integration_id": "integration",
}
# Path parameters that name something no project owns (a constant of the server): not in the matrix.
PUBLIC_PARAMS = {"name"}  # GET /v1/labelstudio/configs/{name}: the shipped labelling configs
# Operations authenticated by something other than the project's key: not in the matrix, with why.
KEYLESS = {
    # Label Studio / Argilla call it with the integration's secret or signature, never an API key
    # (tests/loop/test_labelstudio.py: a bad secret ⇒ 401 and nothing recorded)
    "webhook",
}
ID_LIKE = re.compile(r"(^|_)ids?$")

# A valid request body of the caller's own, per operationId, for operations that need one (with a
# path parameter, or with ids in the body): only the id under test is foreign, so nothing but the
# isolation check can refuse the request.
BODIES: dict[str, Callable[[Seeded], dict[str, Any]]] = {
    "create_run": lambda own: {"model_id": own.model_id, "loss": {"name": "dpo", "beta": 0.1}, "hyperparams": SMALL_HP},
    "create_round": lambda own: {"feedback_ids": [own.feedback_id]},
    "create_sampling_job": lambda own: {
        "prompt_set_id": own.prompt_set_id,
        "checkpoint_id": own.checkpoint_id,
        "params": {"n": 2, "max_new_tokens": 8},
    },
    "create_labelling_job": lambda own: {"samples_id": own.samples_id, "reward_model_checkpoint_id": own.checkpoint_id},
    "rollback": lambda own: {"checkpoint_id": own.checkpoint_id},
    "set_retention": lambda own: {"keep_rounds": 2},
}
# Body fields of which a request gives exactly one (the sampling job's generator): the one under
# test replaces the others.
ONE_OF = [{"checkpoint_id", "model_id", "run_id"}]


def _with_field(body: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    out = dict(body)
    for group in ONE_OF:
        if name in group:
            for other in group - {name}:
                out.pop(other, None)
    out[name] = value
    return out


# A real Label Studio export (recorded, tests/loop/test_labelstudio.py)
LABEL_STUDIO_EXPORT = (
    Path(__file__).resolve().parents[1] / "fixtures" / "labelstudio" / "export_pairwise.json"
).read_bytes()
SERVER_ID = re.compile(r"[a-z]+_[0-9a-f]{24}")
NEVER = {
    "feedback": "fb_",
    "model": "mdl_",
    "run": "run_",
    "job": "job_",
    "checkpoint": "ckpt_",
    "webhook": "whk_",
    "delivery": "msg_",
    "prompt_set": "ps_",
    "integration": "intg_",
}


def _never_existed(kind: str) -> str:
    return NEVER[kind] + "0" * 24


# --------------------------------------------------------------------------- route discovery


def served_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(METHOD, path template) of every HTTP route the app serves, including routes hidden from
    the spec and routes of included routers (FastAPI ≥ 0.12x includes routers lazily)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes: list[Any] = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    out: set[tuple[str, str]] = set()
    for route in routes:
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None)
        assert path is not None, f"route without a path: {route!r}"
        if methods is None:  # a mount or a websocket: cannot be driven here
            assert "{" not in path, f"route {path!r} (not a plain HTTP route) is not covered by the S2 matrix"
            continue
        for method in methods - {"HEAD", "OPTIONS"}:
            out.add((method, path))
    return out


def _params(path: str) -> list[str]:
    """The path parameters naming a project's objects (not PUBLIC_PARAMS)."""
    return [p for p in re.findall(r"{([^}:]+)(?::[^}]*)?}", path) if p not in PUBLIC_PARAMS]


def _resolve(spec: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _json_body_schema(spec: dict[str, Any], operation: dict[str, Any]) -> dict[str, Any] | None:
    content = (operation.get("requestBody") or {}).get("content") or {}
    return _resolve(spec, content["application/json"]["schema"]) if "application/json" in content else None


def body_id_fields(spec: dict[str, Any], operation: dict[str, Any]) -> list[str]:
    """Top-level id properties of the JSON request body; fails on an id nested deeper (the matrix
    would not reach it)."""
    schema = _json_body_schema(spec, operation)
    if schema is None or schema.get("type") == "array":
        return []
    top = [name for name in (schema.get("properties") or {}) if ID_LIKE.search(name)]

    def nested(node: Any, depth: int, seen: set[int]) -> Iterator[str]:
        node = _resolve(spec, node)
        if isinstance(node, dict) and id(node) not in seen:
            seen.add(id(node))
            for name, sub in (node.get("properties") or {}).items():
                if depth > 0 and ID_LIKE.search(name):
                    yield name
                yield from nested(sub, depth + 1, seen)
            for key in ("items", "additionalProperties"):
                yield from nested(node.get(key), depth + 1, seen)
            for key in ("anyOf", "oneOf", "allOf"):
                for sub in node.get(key) or []:
                    yield from nested(sub, depth, seen)

    deep = sorted(set(nested(schema, 0, set())))
    assert not deep, f"{operation.get('operationId')}: ids nested in the body ({deep}) are not covered by the S2 matrix"
    return top


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def projects(
    client: TestClient, client_b: TestClient, session: Session, settings: Settings, tmp_path: Path
) -> tuple[Seeded, Seeded]:
    a = seed_project(client, session, settings, tmp_path / "a", tag="a", seed=0)
    b = seed_project(client_b, session, settings, tmp_path / "b", tag="b", seed=100)
    return a, b


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _assert_404(resp: Any, kinds: set[str], what: str) -> dict[str, Any]:
    assert resp.status_code == 404, (what, resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), (what, resp.headers)
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, (what, body)
    assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["details"], dict), (what, body)
    assert body["error"]["code"] in {f"{k}_not_found" for k in kinds}, (what, body)
    return body


def _same_as_never_existed(
    client: TestClient, method: str, path: str, body: Any, real: dict[str, Any], what: str, kinds: set[str]
) -> None:
    """The answer for the foreign id is the answer for an id that never existed (I7: A cannot even
    detect B's objects): same status, code, details keys, and message once the id is blanked."""
    resp = client.request(method, path, json=body)
    fake = _assert_404(resp, kinds, what + " (never existed)")
    assert fake["error"]["code"] == real["error"]["code"], (what, fake, real)
    assert set(fake["error"]["details"]) == set(real["error"]["details"]), (what, fake, real)
    blank = re.compile(r"[a-z]+_[0-9a-f]{24}")
    assert blank.sub("ID", fake["error"]["message"]) == blank.sub("ID", real["error"]["message"]), (what, fake, real)


def _snapshot(client: TestClient, owner: Seeded, get_routes: list[str]) -> dict[str, Any]:
    """The owner's own view of each of its objects (every GET route with a path parameter)."""
    out = {}
    for path in get_routes:
        for job_id in (owner.queued_job_id, owner.done_job_id):
            url = re.sub(
                r"{([^}:]+)(?::[^}]*)?}",
                lambda m: job_id if m.group(1) == "job_id" else str(owner.id_for(m.group(1), path)),
                path,
            )
            resp = client.get(url)
            out[url] = (resp.status_code, resp.text)
    return out


# --------------------------------------------------------------------------- S2


def test_every_route_with_an_id_answers_404_to_another_project(
    app: FastAPI, client: TestClient, client_b: TestClient, projects: tuple[Seeded, Seeded]
) -> None:
    a, b = projects
    spec = app.openapi()
    served = served_routes(app)
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    with_params = sorted(r for r in served if _params(r[1]))
    assert {r for r in documented if _params(r[1])} <= set(with_params), "spec routes the app does not serve?"
    assert len(with_params) >= 10, with_params  # the matrix is not vacuous

    # first make sure the matrix can drive every route (else: fail, naming what to teach it)
    plan: list[tuple[str, str, list[str], Callable[[Seeded], dict[str, Any]] | None]] = []
    for method, path in with_params:
        operation = spec["paths"].get(path, {}).get(method.lower(), {})
        op_id = operation.get("operationId", f"{method} {path}")
        if op_id in KEYLESS:
            continue
        params = _params(path)
        unknown = [p for p in params if p not in ID_KINDS]
        assert not unknown, f"{method} {path}: path parameter(s) {unknown} not covered by the S2 matrix (ID_KINDS)"
        needs_body = (operation.get("requestBody") or {}).get("required") or (
            (method, path) not in documented and method in ("POST", "PUT", "PATCH")
        )  # hidden: body unknown
        assert not needs_body or op_id in BODIES, (
            f"{method} {path}: needs a request body the S2 matrix does not know (BODIES)"
        )
        plan.append((method, path, params, BODIES[op_id] if needs_body else None))

    get_routes = sorted(p for m, p in with_params if m == "GET")
    before = (_snapshot(client, a, get_routes), _snapshot(client_b, b, get_routes))
    for snap in before:  # the ids are real: their owner reads every one of them
        assert all(status == 200 for status, _ in snap.values()), snap

    for caller, owner, name in ((client, b, "A→B"), (client_b, a, "B→A")):
        own = a if owner is b else b
        for method, path, params, make_body in plan:
            body = make_body(own) if make_body else None
            kinds = {ID_KINDS[p] for p in params}
            # B's job ids in both states: a finished job must not answer 409 (that would leak it)
            variants = [owner.queued_job_id, owner.done_job_id] if "job_id" in params else [None]
            for job_id in variants:
                values = {p: (job_id if p == "job_id" else owner.id_for(p, path)) for p in params}
                url = path.format(**values)
                what = f"{name} {method} {url}"
                real = _assert_404(caller.request(method, url, json=body), kinds, what)
                fake_url = path.format(**{p: _never_existed(ID_KINDS[p]) for p in params})
                _same_as_never_existed(caller, method, fake_url, body, real, what, kinds)

        # B's ids inside A's own, otherwise valid, request bodies
        for path, ops in spec["paths"].items():
            for method, operation in ops.items():
                fields = body_id_fields(spec, operation)
                if not fields:
                    continue
                op_id = operation.get("operationId")
                assert op_id in BODIES, (
                    f"{method.upper()} {path}: body ids {fields} not covered by the S2 matrix (BODIES)"
                )
                url = path.format(**{p: own.id_for(p, path) for p in _params(path)})
                for f in fields:
                    assert f in ID_KINDS, (
                        f"{method.upper()} {path}: body field {f!r} not covered by the S2 matrix (ID_KINDS)"
                    )
                    kind = ID_KINDS[f]
                    foreign = owner.id_for(f[:-1] if f.endswith("_ids") else f)
                    never = _never_existed(kind)
                    body = _with_field(BODIES[op_id](own), f, [foreign] if f.endswith("_ids") else foreign)
                    what = f"{name} {method.upper()} {url} body.{f}"
                    real = _assert_404(caller.request(method.upper(), url, json=body), {kind}, what)
                    fake = _with_field(body, f, [never] if f.endswith("_ids") else never)
                    _same_as_never_existed(caller, method.upper(), url, fake, real, what, {kind})

    # nothing changed for either owner (e.g. A's cancel of B's queued job did nothing)
    assert (_snapshot(client, a, get_routes), _snapshot(client_b, b, get_routes)) == before


def _list_routes(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """GET operations without path parameters whose 200 answer has an `items` array."""
    out = []
    for path, ops in spec["paths"].items():
        get = ops.get("get")
        if get is None or _params(path):
            continue
        ok = (((get.get("responses") or {}).get("200") or {}).get("content") or {}).get("application/json")
        schema = _resolve(spec, (ok or {}).get("schema"))
        if isinstance(schema, dict) and "items" in (schema.get("properties") or {}):
            out.append((path, get))
    return out


def _all_pages(client: TestClient, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    pages, cursor = [], None
    for _ in range(100):
        resp = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert resp.status_code == 200, (path, params, resp.text)
        pages.append(resp.json())
        cursor = pages[-1].get("next_cursor")
        if not cursor:
            return pages
    raise AssertionError(f"{path}: more than 100 pages")


def test_lists_never_show_another_projects_objects(
    app: FastAPI, client: TestClient, client_b: TestClient, projects: tuple[Seeded, Seeded]
) -> None:
    a, b = projects
    spec = app.openapi()
    lists = _list_routes(spec)
    assert {p for p, _ in lists} >= {"/v1/feedback", "/v1/models", "/v1/runs", "/v1/jobs"}, lists
    for caller, me, other, name in ((client, a, b, "A"), (client_b, b, a, "B")):
        for path, operation in lists:
            query_params = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}
            variants: list[dict[str, Any]] = [{}]
            if "limit" in query_params:
                variants.append({"limit": 1})  # walk every page: cursors stay in the project
            for pname, p in query_params.items():  # every value of every enumerated filter
                for value in _resolve(spec, p.get("schema", {})).get("enum", []) + [
                    v for s in _resolve(spec, p.get("schema", {})).get("anyOf", []) for v in s.get("enum", [])
                ]:
                    variants.append({pname: value})
            seen_own = False
            for params in variants:
                for page in _all_pages(caller, path, params):
                    leaked = set(_strings(page)) & other.ids()
                    assert not leaked, (name, path, params, leaked)
                    seen_own |= bool(set(_strings(page)) & me.ids())
            assert seen_own, (name, path, "the list shows none of the caller's own objects: check is vacuous")
            if "cursor" in query_params:  # the other project's cursor does not open its list
                theirs = (client_b if caller is client else client).get(path, params={"limit": 1}).json()
                if theirs.get("next_cursor"):
                    resp = caller.get(path, params={"cursor": theirs["next_cursor"]})
                    assert resp.status_code in (200, 422), resp.text
                    if resp.status_code == 200:
                        assert not set(_strings(resp.json())) & other.ids(), (name, path)


# Requests of the caller's own, per operationId, for the operations that take an Idempotency-Key.
IDEMPOTENT: dict[str, Callable[[Seeded], dict[str, Any]]] = {
    "upload_feedback": lambda own: {
        "content": jsonl(pairwise_records(3, seed=42)),  # same bytes for both
        "headers": {"Content-Type": "application/x-ndjson"},
    },
    "create_run": lambda own: {"json": BODIES["create_run"](own)},
    "create_round": lambda own: {"json": BODIES["create_round"](own)},
    "upload_prompts": lambda own: {
        "content": b'{"prompt_id": "shared", "prompt": [{"role": "user", "content": "Hi"}]}\n',
        "headers": {"Content-Type": "application/x-ndjson"},
    },
    "labelstudio_import": lambda own: {
        "content": LABEL_STUDIO_EXPORT,  # same bytes for both projects
        "headers": {"Content-Type": "application/json"},
    },
}


def test_idempotency_keys_are_per_project(
    app: FastAPI, client: TestClient, client_b: TestClient, projects: tuple[Seeded, Seeded]
) -> None:
    """B used an Idempotency-Key; A using the same key gets its own new resource — never B's
    (a replay) and never a 422 "key reused" (which would tell A that B used it)."""
    a, b = projects
    spec = app.openapi()
    ops = [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if any(p["in"] == "header" and p["name"].lower() == "idempotency-key" for p in op.get("parameters", []))
    ]
    assert ops, "no operation takes an Idempotency-Key?"
    for path, method, op in ops:
        op_id = op.get("operationId")
        assert op_id in IDEMPOTENT, (
            f"{method.upper()} {path}: idempotent request not covered by the S2 matrix (IDEMPOTENT)"
        )
        key = f"shared-{op_id}"

        def send(c: TestClient, who: Seeded) -> Any:
            req = IDEMPOTENT[op_id](who)
            url = path.format(**{p: who.id_for(p) for p in _params(path)})
            return c.request(
                method.upper(), url, **{**req, "headers": {**req.get("headers", {}), "Idempotency-Key": key}}
            )

        theirs = send(client_b, b)
        assert theirs.status_code == 201, (op_id, theirs.text)
        b_ids = b.ids() | {v for v in _strings(theirs.json()) if SERVER_ID.fullmatch(v)}
        mine = send(client, a)
        assert mine.status_code == 201, (op_id, "A's request with B's key", mine.status_code, mine.text)
        assert "idempotent-replayed" not in {h.lower() for h in mine.headers}, (op_id, mine.headers)
        leaked = set(_strings(mine.json())) & b_ids
        assert not leaked, (op_id, leaked)
        again = send(client_b, b)  # the key still works for its owner: B's own resource again
        assert again.status_code == 201 and again.headers.get("Idempotent-Replayed") == "true", (op_id, again.text)
        assert again.json() == theirs.json()


# --------------------------------------------------------------------------- S3 through the CLI


def _halos() -> list[str]:
    exe = Path(sys.executable).with_name("halos")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("halos")
    return [found] if found else [sys.executable, "-m", "server.cli"]


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_halos() + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_cli_keys_are_stored_hashed_and_a_revoked_key_is_refused_at_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HALOS_")}
    env["HALOS_DATA_DIR"] = str(data)  # nothing else: SQLite under the data dir
    created = [_cli(["keys", "create", "--project", "s3"], env, tmp_path) for _ in range(2)]
    for out in created:
        assert out.returncode == 0, out.stderr
    secret, other = (out.stdout.strip() for out in created)
    assert secret != other and secret.startswith("hk_")
    for out in created:  # shown once, on stdout only: never logged
        assert secret not in out.stderr and other not in out.stderr

    # the API in process on the same database (explicit, so no HALOS_* of this process interferes)
    settings = Settings(
        data_dir=data,
        database_url=f"sqlite:///{(data / 'halos.db').resolve()}",
        broker_url=f"sqla+sqlite:///{(data / 'broker.db').resolve()}",
        auth_enabled=True,
        rate_limit_per_minute=0,
    )
    app = create_app(settings)
    with (
        TestClient(app, headers={"Authorization": f"Bearer {secret}"}) as client,
        TestClient(app, headers={"Authorization": f"Bearer {other}"}) as client2,
    ):
        assert client.get("/v1/runs").status_code == 200
        assert client2.get("/v1/runs").status_code == 200

        revoked = _cli(["keys", "revoke", secret[:PREFIX_CHARS]], env, tmp_path)  # by the displayed prefix
        assert revoked.returncode == 0, revoked.stderr
        assert secret[PREFIX_CHARS:] not in revoked.stdout + revoked.stderr

        # at once: the same running app, the next request, no cache to expire
        for path in ("/v1/runs", "/v1/feedback", "/v1/jobs/job_x"):
            resp = client.get(path)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.json()["error"]["code"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert client2.get("/v1/runs").status_code == 200  # only that key
        again = _cli(["keys", "revoke", secret[:PREFIX_CHARS]], env, tmp_path)  # idempotent
        assert again.returncode == 0, again.stderr
        assert client.get("/v1/runs").status_code == 401

    # every column of every table, as text: the hash is there, the secrets are not
    engine = create_engine(settings.db_url)
    try:
        dump: list[str] = []
        insp = inspect(engine)
        with engine.connect() as conn:
            for name in insp.get_table_names():
                cols = [c["name"] for c in insp.get_columns(name)]
                rows = conn.execute(select(*[column(c) for c in cols]).select_from(table(name))).all()
                dump += [repr(v) for row in rows for v in row]
    finally:
        engine.dispose()
    from server.db import get_engine

    get_engine(settings).dispose()  # the app's engine: flush the WAL into the file scanned below
    text = "\n".join(dump)
    for s in (secret, other):
        assert hashlib.sha256(s.encode()).hexdigest() in text
        assert s[PREFIX_CHARS:] not in text and s not in text
    # nor anywhere on disk under the data dir (database files, WAL, broker, logs)
    for path in data.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            for s in (secret, other):
                assert s[PREFIX_CHARS:].encode() not in raw, path

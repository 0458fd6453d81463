"""Drive a REAL Label Studio server once and record what it produces, as test fixtures.

    python -m venv /tmp/lsvenv && /tmp/lsvenv/bin/pip install label-studio label-studio-sdk
    label-studio start --no-browser --port 8089 --username admin@example.com --password … --user-token TOKEN
    /tmp/lsvenv/bin/python scripts/labelstudio_roundtrip.py --url http://localhost:8089 --token TOKEN

(Label Studio pins Django and friends that the project does not need, so it lives in its own venv.)
For each shipped labelling config (pairwise, rating) it creates a project with that config, a
webhook (ANNOTATION_CREATED / UPDATED / ANNOTATIONS_DELETED) to a local capture server with the
`X-Halos-Webhook-Secret` header, imports the tasks this server exports
(tests/fixtures/labelstudio/tasks_<config>.json, made by `halos_core.feedback.labelstudio`),
annotates every task through the SDK, updates one annotation and deletes another, then exports
the project as JSON. The webhook deliveries (in arrival order) and the export are written to
tests/fixtures/labelstudio/, where tests/loop/test_labelstudio.py replays them against the API.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from label_studio_sdk import LabelStudio

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "labelstudio"
SECRET = "fixture-secret-0123456789"
CAPTURED: list[dict] = []


class Capture(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        CAPTURED.append(
            {
                "headers": {"x-halos-webhook-secret": self.headers.get("X-Halos-Webhook-Secret")},
                "payload": json.loads(body),
            }
        )
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def result(config: str, i: int) -> list[dict]:
    if config == "pairwise":
        return [
            {
                "from_name": "comparison",
                "to_name": "answer1,answer2",
                "type": "pairwise",
                "value": {"selected": "left" if i % 2 == 0 else "right"},
            }
        ]
    return [{"from_name": "rating", "to_name": "answer", "type": "rating", "value": {"rating": 1 + i % 5}}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://localhost:8089")
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    ls = LabelStudio(base_url=args.url, api_key=args.token)
    sys.path.insert(0, str(FIXTURES.parents[2]))  # the configs as this repository ships them (pydantic only)
    from halos_core.feedback.labelstudio import CONFIGS

    for config in ("pairwise", "rating"):
        CAPTURED.clear()
        project = ls.projects.create(title=f"halos {config} {int(time.time())}", label_config=CONFIGS[config])
        ls.webhooks.create(
            url=hook_url,
            project=project.id,
            send_payload=True,
            send_for_all_actions=False,
            headers={"X-Halos-Webhook-Secret": SECRET},
            actions=["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"],
        )
        tasks = json.loads((FIXTURES / f"tasks_{config}.json").read_text())
        ls.projects.import_tasks(project.id, request=tasks)
        created = []
        for i, task in enumerate(ls.tasks.list(project=project.id)):
            created.append(ls.annotations.create(id=task.id, result=result(config, i), project=project.id))
        ls.annotations.update(id=created[0].id, result=result(config, 1))  # change the first annotator's mind
        ls.annotations.delete(id=created[1].id)
        time.sleep(3)  # deliveries are sent synchronously by the dev server; leave a margin
        export = ls.projects.exports.as_json(project.id) if hasattr(ls.projects.exports, "as_json") else None
        (FIXTURES / f"export_{config}.json").write_text(json.dumps(export, indent=1, default=str))
        (FIXTURES / f"webhooks_{config}.json").write_text(json.dumps(CAPTURED, indent=1))
        print(
            f"{config}: {len(created)} annotations, {len(CAPTURED)} webhook deliveries, "
            f"{len(export or [])} exported tasks"
        )
    server.shutdown()


if __name__ == "__main__":
    main()

"""A real webhook receiver for the tests: an HTTP server on 127.0.0.1 (a thread of the test process)
that verifies every request with the Standard Webhooks reference verifier and deduplicates on
`webhook-id`, as a receiver following the spec does.

`mode` decides the answer: "ok" (204), "fail" (500), "redirect" (302 to `redirect_to`), "hang"
(the next request is accepted — counted as received — and answered only after `hang_s`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    error: str | None
    answered: int


@dataclass
class Receiver:
    secret: str = ""
    mode: str = "ok"
    redirect_to: str = ""
    hang_s: float = 5.0
    raw: list[Received] = field(default_factory=list)  # every request, in arrival order
    accepted: dict[str, bytes] = field(default_factory=dict)  # webhook-id -> body, first verified delivery
    duplicates: list[str] = field(default_factory=list)
    truncated: int = 0  # requests whose body ended before its Content-Length (the sender was killed)
    hung: threading.Event = field(default_factory=threading.Event)
    hung_id: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        with self.lock:
            mode = self.mode
            if mode == "hang":
                self.mode = "hung"
        webhook_id = headers.get("webhook-id", "")
        try:
            Webhook(self.secret).verify(body, headers)
            verified, error = True, None
        except WebhookVerificationError as exc:
            verified, error = False, str(exc)
        status, extra = {
            "ok": (204, {}),
            "hang": (204, {}),
            "hung": (500, {}),
            "fail": (500, {}),
            "redirect": (302, {"Location": self.redirect_to}),
        }[mode]
        with self.lock:
            self.raw.append(Received(webhook_id, headers, body, verified, error, status))
            if verified and status < 300:
                if webhook_id in self.accepted:
                    self.duplicates.append(webhook_id)  # a replay or a redelivery: processed once only
                else:
                    self.accepted[webhook_id] = body
        if mode == "hang":
            self.hung_id = webhook_id
            self.hung.set()
            time.sleep(self.hang_s)
        return status, extra

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                if len(body) < length:
                    # the sender died mid-request (a test SIGKILLs the server while deliveries are
                    # in flight; the headers and the body are separate writes): no request came, as
                    # for any HTTP server; nothing is recorded or answered
                    with receiver.lock:
                        receiver.truncated += 1
                    self.close_connection = True
                    return
                status, extra = receiver.handle({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

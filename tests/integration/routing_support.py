"""A real lookup service for the routing tests: an HTTP server on loopback (the standard
library's, in a thread) answering nginx auth_http requests from a table the test fills, and
recording every request's headers."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote


class LookupService:
    """`answers[account]`: the headers to answer for Auth-User `account` (unknown accounts:
    "Auth-Status: unknown user"). `hang`: requests wait until the service stops (a service
    that never answers); `http_status`: answer with that status instead."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, str]] = {}
        self.requests: list[dict[str, str]] = []
        self.hang = False
        self.http_status = 200
        self._stopping = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                headers = {name: value for name, value in self.headers.items()}
                service.requests.append(headers)
                if service.hang:
                    service._stopping.wait(60)
                    return
                answer = service.answers.get(unquote(headers.get("Auth-User", "")), {"Auth-Status": "unknown user"})
                self.send_response(service.http_status)
                for name, value in answer.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="lookup-service", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/pop3-route"

    def route(self, account: str, port: int, *, tls: str = "none", login: str | None = None, mailbox: str | None = None) -> None:
        answer = {"Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": str(port), "Auth-TLS": tls}
        if login is not None:
            answer["Auth-User"] = login
        if mailbox is not None:
            answer["Auth-Mailbox"] = mailbox
        self.answers[account] = answer

    def requests_for(self, account: str) -> list[dict[str, str]]:
        return [r for r in self.requests if unquote(r.get("Auth-User", "")) == account]

    def __enter__(self) -> LookupService:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

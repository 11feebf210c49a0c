"""A Prometheus HTTP API stand-in for the operator's unit tests (the e2e tests use a real one)."""

from __future__ import annotations

import contextlib
import json
import ssl
from datetime import datetime
from typing import Any


class FakePrometheus:
    """Answers every ``/api/v1/query`` or ``/api/v1/query_range`` with a fixed result (an
    instant ``vector`` or a range ``matrix``); records the queries it got. ``by_query`` maps a
    substring of the query to its own (instant vector) result, first match wins."""

    def __init__(
        self,
        result: list[dict[str, Any]],
        result_type: str = "vector",
        by_query: dict[str, list[dict[str, Any]]] | None = None,
        reply: tuple[int, bytes, dict[str, str]] | None = None,
        authorization: str | None = None,
        tls: ssl.SSLContext | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """``reply``: (status, body, headers) sent instead of the result; ``authorization``:
        the only Authorization header answered (others get 401 with a body that echoes it,
        like a verbose proxy); ``tls``: serve https with this server context; ``delay_s``:
        wait that long before each answer (a slow Prometheus)."""
        import http.server
        import threading
        import time
        import urllib.parse

        queries = self.queries = []
        headers_seen = self.authorizations = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(delay_s)
                url = urllib.parse.urlparse(self.path)
                params = urllib.parse.parse_qs(url.query)
                queries.append(params)
                query = params.get("query", [""])[0]
                headers_seen.append(self.headers.get("Authorization"))
                if authorization is not None and self.headers.get("Authorization") != authorization:
                    echoed = f"denied: {self.headers.get('Authorization')}".encode()
                    return self.answer(401, echoed, {"Content-Type": "text/plain"})
                if reply is not None:
                    return self.answer(*reply)
                kind, answer = result_type, result
                for part, special in (by_query or {}).items():
                    if part in query:
                        kind, answer = "vector", special
                        break
                body = json.dumps(
                    {"status": "success", "data": {"resultType": kind, "result": answer}}
                ).encode()
                self.answer(200, body, {"Content-Type": "application/json"})

            def answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError):  # a client that timed out
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def load_matrix(now: datetime) -> list[dict[str, Any]]:
    """A steady range answer: 2 layers x 4 experts, 100 tokens in each of three 10-minute
    sub-windows ending at ``now``."""
    points = [[now.timestamp() - 600 * k, "100"] for k in range(3)]
    return [
        {"metric": {"layer": str(layer), "expert": str(e)}, "values": points}
        for layer in range(2)
        for e in range(4)
    ]

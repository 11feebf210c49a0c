"""A Prometheus HTTP API stand-in for the operator's unit tests (the e2e tests use a real one)."""

from __future__ import annotations

import json
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
    ) -> None:
        import http.server
        import threading
        import urllib.parse

        queries = self.queries = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                params = urllib.parse.parse_qs(url.query)
                queries.append(params)
                query = params.get("query", [""])[0]
                kind, answer = result_type, result
                for part, special in (by_query or {}).items():
                    if part in query:
                        kind, answer = "vector", special
                        break
                body = json.dumps(
                    {"status": "success", "data": {"resultType": kind, "result": answer}}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

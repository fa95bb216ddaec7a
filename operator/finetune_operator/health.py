"""`/healthz` and `/readyz` for the kubelet's probes, served while the replica waits for the Lease too.

/healthz fails when the work queue holds work that has not moved for `health_stall_seconds`: Kubernetes then
restarts a wedged operator. /readyz is ready on the replica that leads (the standby is alive, not ready).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class Health:
    def __init__(self) -> None:
        self.stalled: Callable[[], bool] = lambda: False
        self.leading = False

    def serve(self, url: str) -> ThreadingHTTPServer:
        """Serve the probes at the host and port of `url` (e.g. http://0.0.0.0:8081/healthz) on a daemon thread."""
        parts = urlsplit(url)
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    ok, text = (False, "the work queue is stalled") if health.stalled() else (True, "ok")
                elif self.path == "/readyz":
                    ok, text = (True, "leading") if health.leading else (False, "standing by")
                else:
                    self.send_error(404)
                    return
                body = text.encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # probes every few seconds are not news

        server = ThreadingHTTPServer((parts.hostname or "0.0.0.0", parts.port or 8081), Handler)
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return server

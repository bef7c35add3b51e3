"""A fault-injecting HTTP proxy for tests: it sits on 127.0.0.1 between Quiver and an
S3-compatible server (moto) and answers chosen requests with a 503 instead of passing
them on, so that tests see how Lance's uploads and commits behave when the store fails.

A rule is a predicate on (method, path) plus how many times it may still fire; the proxy
counts what it injected and logs every request it saw.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>injected by the test proxy</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection"}


@dataclass
class Rule:
    """Fail requests that `matches` accepts, `times` times (None: every time)."""

    matches: Callable[[str, str], bool]
    times: int | None = 1
    fired: int = 0

    def take(self, method: str, path: str) -> bool:
        if not self.matches(method, path):
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


@dataclass
class FaultProxy:
    """Forward to `upstream_port` on 127.0.0.1, failing what the current rules match."""

    upstream_port: int
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> int:
        """Serve in a background thread; returns the proxy's port."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: tests read `seen` instead
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    raw = b""
                    while True:  # forward the chunked framing as it came
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers, then the blank line
                                t = self.rfile.readline()
                                raw += t
                                if t in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                with proxy._lock:
                    inject = any(r.take(self.command, self.path) for r in proxy.rules)
                status = 503 if inject else self._forward(body)
                with proxy._lock:
                    proxy.seen.append((self.command, self.path, status))
                if inject:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)

            def _forward(self, body: bytes) -> int:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port,
                                                  timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in HOP_BY_HOP or k.lower() == "transfer-encoding"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                self.send_response(resp.status, resp.reason)
                head = self.command == "HEAD"  # a HEAD keeps the object's own length
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if not head:
                    self.wfile.write(payload)
                conn.close()
                return resp.status

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self._server.server_address[1]

    def injected(self) -> int:
        with self._lock:
            return sum(r.fired for r in self.rules)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

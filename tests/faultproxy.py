"""A fault-injecting HTTP proxy for the moto S3 server, for tests.

It sits between s3fs/pyarrow and the real moto server on 127.0.0.1 and forwards every request
unchanged, except those matching a rule, which it can:

* answer ``503 SlowDown`` (S3's throttling reply) instead of forwarding;
* forward, then cut the response body after ``after_bytes`` bytes and drop the connection
  (a reset mid-stream, which botocore reports as a read error);
* delay the request by ``delay_s`` before forwarding;
* hold the request until the test releases it (``hold``), so a test can SIGKILL a run at a
  known point, e.g. after a shard's files are published and before its ledger record lands.

Only the network boundary is faked: the client libraries and the S3 server are real. Point a
pipeline at ``proxy.url`` as its ``endpoint_url``.

Example::

    proxy = FaultProxy(s3_server)
    proxy.add_rule(method="GET", path=r"/in/00001\\.tar$", action="cut", after_bytes=4096, times=2)
    ...  # run with storage_options={"endpoint_url": proxy.url, ...}
    assert proxy.fired("cut") == 2
    proxy.stop()
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ACTIONS = ("503", "cut", "delay", "hold")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")
# Hop-by-hop headers are the proxy's own business, never forwarded (RFC 9110 7.6.1).
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Rule:
    """Requests matching ``method`` and the ``path`` regex (searched in path?query) get ``action``.

    ``times`` bounds how often it fires (None: always); ``skip`` lets that many matches through
    first.
    """

    action: str
    method: str | None = None
    path: str = ""
    times: int | None = 1
    skip: int = 0
    after_bytes: int = 0
    delay_s: float = 0.0
    fired: int = 0
    seen: int = 0
    released: threading.Event = field(default_factory=threading.Event)
    waiting: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, target: str) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        return re.search(self.path, target) is not None


class FaultProxy:
    """A threaded HTTP proxy in front of ``upstream`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, upstream: str, host: str = "127.0.0.1"):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, str]] = []  # (method, target, action or "pass")
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: tests read proxy.log instead
                pass

            def _handle(self):
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    # -- rules ----------------------------------------------------------------------
    def add_rule(self, action: str, method: str | None = None, path: str = "", times: int | None = 1,
                 skip: int = 0, after_bytes: int = 0, delay_s: float = 0.0) -> Rule:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}")
        rule = Rule(action=action, method=method, path=path, times=times, skip=skip,
                    after_bytes=after_bytes, delay_s=delay_s)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            for rule in self.rules:
                rule.released.set()
            self.rules.clear()

    def fired(self, action: str | None = None) -> int:
        return sum(r.fired for r in self.rules if action is None or r.action == action)

    def stop(self) -> None:
        self.clear()
        self.server.shutdown()
        self.server.server_close()

    def _pick(self, method: str, target: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(method, target):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip or (rule.times is not None and rule.fired >= rule.times):
                    continue
                rule.fired += 1
                return rule
        return None

    # -- forwarding -----------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            body = _read_chunked(h.rfile)
        rule = self._pick(h.command, h.path)
        self.log.append((h.command, h.path, rule.action if rule else "pass"))
        if rule and rule.action == "503":
            h.send_response(503, "Slow Down")
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
            h.end_headers()
            h.wfile.write(SLOWDOWN_BODY)
            return
        if rule and rule.action == "delay":
            time.sleep(rule.delay_s)
        if rule and rule.action == "hold":
            rule.waiting.set()
            rule.released.wait()
            if _client_gone(h.connection):
                # The client died while held (a test SIGKILLed it): the request must not land
                # after its sender is dead, or a "killed before the ledger PUT" would commit.
                self.log.append((h.command, h.path, "dropped"))
                h.close_connection = True
                return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_HEADERS}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_HEADERS and (k.lower() != "content-length" or h.command == "HEAD"):
                h.send_header(k, v)
        if h.command == "HEAD":  # a HEAD reply states the object's length but carries no body
            h.end_headers()
            return
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if rule and rule.action == "cut" and len(data) > rule.after_bytes:
            # Promise the whole body, send part of it, then reset the connection.
            h.wfile.write(data[: rule.after_bytes])
            h.wfile.flush()
            try:
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            h.close_connection = True
            return
        h.wfile.write(data)


def _client_gone(sock: socket.socket) -> bool:
    """True when the peer closed the connection (a dead process's sockets read EOF or reset)."""
    try:
        sock.setblocking(False)
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        finally:
            sock.setblocking(True)
    except BlockingIOError:
        return False  # still open, nothing to read
    except OSError:
        return True


def _read_chunked(rfile) -> bytes:
    out = bytearray()
    while True:
        line = rfile.readline().strip()
        size = int(line.split(b";", 1)[0] or b"0", 16)
        if size == 0:
            rfile.readline()
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()

"""A fault-injecting HTTP proxy for S3: forwards to a real S3 server, fails a share of requests on purpose.

Point AWS_ENDPOINT_URL at `FaultProxy(upstream).start().endpoint_url` and every S3 client (boto3, s3fs,
Ray workers that inherit the variable) goes through it. Each request is, with probability `rate`, answered
with one of the faults instead of being forwarded:

- "slowdown": 503 with S3's SlowDown error document (throttling),
- "internal": 500 with S3's InternalError error document,
- "reset":    the connection is closed with a TCP RST and no response,
- "truncate": the request is forwarded, but the response is cut off halfway through its body, then RST
              (a GET whose download dies midway; other requests get "reset").

`deny=True` answers every request with 403 AccessDenied (a permanent error that must not be retried).
`counts` says how many requests were forwarded and how many of each fault were injected.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset", "truncate")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>"
)
ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "deny": (403, "AccessDenied", "Access Denied"),
}


@dataclass
class FaultProxy:
    upstream: str  # e.g. http://127.0.0.1:9000
    rate: float = 0.0
    faults: tuple[str, ...] = FAULTS
    deny: bool = False
    seed: int = 0
    host: str = "127.0.0.1"
    counts: Counter = field(default_factory=Counter)
    _server: ThreadingHTTPServer | None = field(default=None, init=False, repr=False)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def injected(self) -> int:
        return sum(self.counts[f] for f in (*FAULTS, "deny"))

    def start(self) -> FaultProxy:
        rng, lock, proxy = random.Random(self.seed), threading.Lock(), self

        class Handler(ProxyHandler):
            def choose_fault(self) -> str | None:
                with lock:
                    if proxy.deny:
                        fault = "deny"
                    elif rng.random() < proxy.rate:
                        fault = rng.choice(proxy.faults)
                    else:
                        fault = None
                    proxy.counts[fault or "forwarded"] += 1
                    proxy.counts["requests"] += 1
                return fault

        Handler.upstream = urlsplit(self.upstream)
        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="faultproxy").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    upstream = None

    def choose_fault(self) -> str | None:
        return None

    def log_message(self, *args) -> None:  # no access log
        pass

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def handle_one(self) -> None:
        body = self.read_body()
        fault = self.choose_fault()
        if fault == "reset" or (fault == "truncate" and self.command != "GET"):
            self.reset()
            return
        if fault in ERRORS:
            status, code, message = ERRORS[fault]
            self.reply(status, [("Content-Type", "application/xml")], ERROR_XML.format(code=code, message=message).encode())
            return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"expect"}}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            if fault == "truncate" and len(data) > 1:
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                self.reply(
                    response.status, headers + [("Content-Length", str(len(data)))], data[: len(data) // 2], keep_length=True
                )
                self.reset()
                return
            self.reply(response.status, headers, data)
        finally:
            conn.close()

    def reset(self) -> None:
        """SO_LINGER 0: close() sends RST, as an overloaded load balancer or a dropped connection does."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def reply(self, status: int, headers: list[tuple[str, str]], data: bytes, keep_length: bool = False) -> None:
        self.send_response_only(status)
        has_length = False
        for key, value in headers:
            if key.lower() == "content-length":
                if self.command == "HEAD" or keep_length:
                    has_length = True
                    self.send_header(key, value)
                continue
            self.send_header(key, value)
        if not has_length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

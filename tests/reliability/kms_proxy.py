"""A fault-injecting HTTP proxy in front of moto's KMS server.

moto answers every call correctly and instantly, and it does not enforce a
disabled or pending-deletion CMK. Real KMS throttles, refuses, times out and
drops connections. This proxy sits on 127.0.0.1 between boto3 and moto and,
per KMS operation (read from the ``X-Amz-Target`` header), answers with the
fault a test planned instead of forwarding::

    with KmsFaultProxy(kms_server) as proxy:
        proxy.plan("GenerateDataKey", THROTTLE, times=3)   # a burst, then normal
        proxy.plan("Decrypt", SERVER_ERROR)                 # an outage until cleared
        proxy.clear()

Faults are the error bodies KMS really sends (``{"__type": ..., "message":
...}`` with HTTP 400), 500s, a dropped connection and a delay before
forwarding. ``proxy.injected`` counts what was injected, by fault name.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "ACCESS_DENIED",
    "ALL_OPERATIONS",
    "DISABLED",
    "DROP",
    "Fault",
    "KmsFaultProxy",
    "PENDING_DELETION",
    "SERVER_ERROR",
    "THROTTLE",
    "delay",
    "proxied_client",
]

ALL_OPERATIONS = "*"


@dataclass(frozen=True)
class Fault:
    """One injected answer. ``status`` 0 means: drop the connection;
    ``delay`` > 0 with no ``error`` means: wait, then forward to moto."""

    name: str
    status: int = 400
    error: str | None = None
    message: str = ""
    delay: float = 0.0


THROTTLE = Fault("throttle", 400, "ThrottlingException", "Rate exceeded")
ACCESS_DENIED = Fault(
    "access_denied", 400, "AccessDeniedException", "User is not authorized to perform: kms:*"
)
DISABLED = Fault("disabled", 400, "DisabledException", "arn:aws:kms:... is disabled.")
PENDING_DELETION = Fault(
    "pending_deletion", 400, "KMSInvalidStateException", "arn:aws:kms:... is pending deletion."
)
SERVER_ERROR = Fault("server_error", 500, "KMSInternalException", "Internal failure")
DROP = Fault("drop", 0)


def delay(seconds: float) -> Fault:
    """A slow answer: wait ``seconds``, then forward to moto."""
    return Fault(f"delay_{seconds:g}s", delay=seconds)


@dataclass
class _Plan:
    fault: Fault
    remaining: int | None  # None: until cleared


class KmsFaultProxy:
    """A threaded HTTP proxy to ``upstream`` (moto) that injects planned faults."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._plans: dict[str, _Plan] = {}
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- planning ------------------------------------------------------------------

    def plan(self, operation: str, fault: Fault, times: int | None = None) -> None:
        """Answer the next ``times`` calls of ``operation`` (``"*"``: any) with
        ``fault``; ``times=None`` keeps doing it until :meth:`clear`."""
        with self._lock:
            self._plans[operation] = _Plan(fault, times)

    def clear(self) -> None:
        """Forward everything from now on."""
        with self._lock:
            self._plans.clear()

    def _take(self, operation: str) -> Fault | None:
        with self._lock:
            key = operation if operation in self._plans else ALL_OPERATIONS
            plan = self._plans.get(key)
            if plan is None:
                return None
            if plan.remaining is not None:
                plan.remaining -= 1
                if plan.remaining <= 0:
                    del self._plans[key]
            return plan.fault

    def _record(self, counter: Counter[str], name: str) -> None:
        with self._lock:
            counter[name] += 1

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> KmsFaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> KmsFaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                operation = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2]
                try:
                    self._answer(operation, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (read timeout): as with real KMS

            def _answer(self, operation: str, body: bytes) -> None:
                fault = proxy._take(operation)
                if fault is not None and fault.delay:
                    proxy._record(proxy.injected, fault.name)
                    time.sleep(fault.delay)
                    fault = None
                if fault is None:
                    proxy._record(proxy.forwarded, operation)
                    self._forward(body)
                    return
                proxy._record(proxy.injected, fault.name)
                if fault.status == 0:
                    self._drop()
                else:
                    self._reply(fault.status, {"__type": fault.error, "message": fault.message})

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    conn.request("POST", self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    conn.close()

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("x-amzn-RequestId", "sa-envelope-fault")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drop(self) -> None:
                """Close the TCP connection without a byte of answer."""
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        return Handler


def proxied_client(
    url: str,
    *,
    max_attempts: int = 4,
    read_timeout: float = 5.0,
    jitter: float | None = 0.01,
) -> Any:
    """A boto3 KMS client to ``url`` with botocore's ``standard`` retry mode
    and ``max_attempts`` attempts in all (the first one included).

    ``jitter`` pins the random factor of botocore's own exponential backoff
    (``rand() * base * 2**i``, base 1 s for throttling) so that a burst of
    retries takes milliseconds, not seconds; the retry decisions, the
    attempt limit and the retry quota are botocore's. ``None`` keeps the
    real backoff.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=2,
        read_timeout=read_timeout,
    )
    client = boto3.client("kms", endpoint_url=url, region_name="us-east-1", config=config)
    if jitter is not None:
        _retry_handler(client)._retry_policy._retry_backoff._random = lambda: jitter
    return client


def _retry_handler(client: Any) -> Any:
    """botocore's RetryHandler registered on ``client`` (standard mode)."""
    emitter = getattr(client.meta.events, "_emitter", client.meta.events)
    entry = emitter._unique_id_handlers["retry-config-kms"]
    return entry["handler"].__self__

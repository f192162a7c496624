"""A real KMS for the benchmark: moto's server on 127.0.0.1, over HTTP.

Each sa-envelope variant gets its own boto3 client, so its KMS calls are
counted apart (``before-call`` fires once per operation, not per retry).
Latency is injected per HTTP request with a ``before-send`` hook, which is
where a real network round trip would be spent.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KmsClient", "MotoKms"]

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@dataclass
class KmsClient:
    """A counted boto3 KMS client with adjustable injected latency."""

    client: Any
    calls: Counter[str] = field(default_factory=Counter)
    latency: float = 0.0  # seconds slept before each request is sent
    seconds: float = 0.0  # wall time spent inside KMS calls (latency included)
    _started: float = 0.0

    def total(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()
        self.seconds = 0.0


class MotoKms:
    """Starts moto's KMS server; stop it with :meth:`stop` (or ``with``)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self._admin = self._boto()

    def _boto(self) -> Any:
        import boto3

        session = boto3.session.Session(region_name=REGION, **CREDENTIALS)
        return session.client("kms", endpoint_url=self.endpoint)

    def create_cmk(self) -> str:
        """ARN of a fresh symmetric CMK (created uncounted)."""
        meta = self._admin.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")
        return str(meta["KeyMetadata"]["Arn"])

    def client(self) -> KmsClient:
        """A new counted client (one per simulated process)."""
        counted = KmsClient(self._boto())

        def count(model: Any, **_: Any) -> None:
            counted.calls[model.name] += 1
            counted._started = time.perf_counter()

        def done(**_: Any) -> None:
            counted.seconds += time.perf_counter() - counted._started

        def delay(**_: Any) -> None:
            if counted.latency:
                time.sleep(counted.latency)

        counted.client.meta.events.register("before-call.kms", count)
        counted.client.meta.events.register("before-send.kms", delay)
        counted.client.meta.events.register("after-call.kms", done)
        return counted

    def provider(self, cmk: str) -> tuple[Any, KmsClient]:
        """An ``AwsKmsProvider`` for ``cmk`` and the counted client behind it."""
        from sa_envelope import AwsKmsProvider

        counted = self.client()
        return AwsKmsProvider(cmk, client=counted.client), counted

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> MotoKms:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

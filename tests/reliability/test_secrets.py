"""Secrets hygiene: no key material and no plaintext outside the process's
memory: not in exception messages or tracebacks, not in any log record at
DEBUG (sqlalchemy.engine, botocore, urllib3, ours), not in reprs, not in
SQL echo output (``echo="debug"`` shows ciphertext parameters and rows only).

Each test runs a realistic session with everything turned up, collects all
that text, then searches it for every secret in every encoding it could
appear in: the plaintexts, the master key, and every data key (unwrapped
from the key table after the fact).
"""

from __future__ import annotations

import base64
import logging
import os
import traceback
import uuid
from typing import Any, Callable, Iterable, Iterator

import pytest
from sqlalchemy import LargeBinary, bindparam, create_engine, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from reliability.kms_proxy import ACCESS_DENIED, KmsFaultProxy, proxied_client
from sa_envelope import (
    AwsKmsProvider,
    EncryptionError,
    EnvelopeError,
    KeyProvider,
    LocalKeyProvider,
)
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from sa_envelope.providers.base import key_context
from support.keyrows import context_of
from support.models import Schema, schema

pytestmark = pytest.mark.reliability

SERVER_SIDE = ("moto", "werkzeug")  # the test's fake KMS logs its own traffic


class Transcript:
    """Everything a secret could leak into, gathered as text."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, *texts: Any) -> None:
        self.parts.extend(str(t) for t in texts)

    def error(self, fn: Callable[[], Any], expected: type[BaseException] = EnvelopeError) -> BaseException:
        """Run ``fn``, which must raise ``expected``; keep its message and traceback."""
        with pytest.raises(expected) as info:
            fn()
        self.add(str(info.value), repr(info.value), "".join(traceback.format_exception(info.value)))
        return info.value

    def leaks(self, secrets: dict[str, bytes]) -> list[str]:
        """Names of the secrets found, in any of their encodings."""
        haystack = "\n".join(self.parts)
        if os.environ.get("SA_ENVELOPE_SHOW_LEAKS"):  # debugging aid: where is it?
            for name, secret in secrets.items():
                for line in haystack.splitlines():
                    if any(f in line for f in _forms(secret)):
                        print(f"LEAK {name}: {line[:300]}")
        return [name for name, secret in secrets.items() if any(f in haystack for f in _forms(secret))]


def _forms(secret: bytes) -> Iterable[str]:
    yield secret.hex()
    yield base64.b64encode(secret).decode()
    yield repr(secret)[2:-1]
    try:
        yield secret.decode("utf-8")
    except UnicodeDecodeError:
        pass


@pytest.fixture
def transcript(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Iterator[Transcript]:
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy", "botocore", "urllib3", "sa_envelope"):
        caplog.set_level(logging.DEBUG, logger=name)
    t = Transcript()
    yield t


def _collect_logs(t: Transcript, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> int:
    formatter = logging.Formatter()
    records = [r for r in caplog.records if not r.name.startswith(SERVER_SIDE)]
    for record in records:
        t.add(formatter.format(record))
    out, err = capsys.readouterr()
    t.add(out, err)
    return len(records)


def _data_keys(engine: Engine, s: Schema, provider: KeyProvider) -> dict[str, bytes]:
    with engine.connect() as conn:
        records = [kt.KeyRecord.from_row(r) for r in conn.execute(select(s.keys.table))]
    return {
        f"data key {r.id:016x}": provider.unwrap(r.wrapped_key, context_of(r), r.wrapping_key_id)  # type: ignore[arg-type]
        for r in records
    }


def _session(t: Transcript, engine: Engine, s: Schema, plain: dict[str, str]) -> None:
    """Write, query (deterministic equality), read, and hit every error path."""
    s.create()
    model, table = s.models["patients"], s.tables["patients"]
    with Session(engine) as session:
        row = model()
        row.id, row.n, row.name, row.ssn, row.note = 1, 1, plain["name"], plain["ssn"], plain["note"]
        session.add(row)
        session.commit()
        assert session.scalars(select(model).where(table.c.ssn == plain["ssn"])).one().name == plain["name"]
        t.add(repr(session.get(model, 1)))
    with Session(engine) as session:  # a duplicate key: the driver's message shows parameters
        dup = model()
        dup.id, dup.n, dup.name = 1, 2, plain["name"]
        session.add(dup)
        t.error(session.commit, IntegrityError)
    with Session(engine) as session:
        bad = model()
        bad.n, bad.name = 3, {"secret": plain["name"]}
        session.add(bad)
        t.error(session.commit, EncryptionError)
    with engine.begin() as conn:  # tamper: flip the last byte of the stored name
        stored = bytes(conn.execute(text("SELECT name FROM patients WHERE id = 1")).scalar_one())
        conn.execute(
            text("UPDATE patients SET name = :v WHERE id = 1").bindparams(bindparam("v", type_=LargeBinary)),
            {"v": stored[:-1] + bytes([stored[-1] ^ 1])},
        )
    with engine.connect() as conn:
        t.error(lambda: conn.execute(select(table.c.name)).all())
    t.add(repr(s.keys), repr(s.keys.provider), repr(table.c.name.type), repr(table.c.ssn.type))
    t.add(*(repr(entry) for entry in s.keys.store.cache._entries.values()))
    with engine.connect() as conn:
        t.add(*(repr(kt.KeyRecord.from_row(r)) for r in conn.execute(select(s.keys.table))))
    t.add(repr(s.keys.provider.generate(key_context("patients", fmt.format_key_id(1)))))


def _plaintexts() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"name": f"Name-{tag}-Zoë", "ssn": f"{tag[:3]}-{tag[3:5]}-{tag[5:8]}9", "note": f"diagnosis {tag} confidential"}


def _assert_clean(t: Transcript, records: int, secrets: dict[str, bytes], reliability: Any) -> None:
    assert records > 20  # the logs really were on
    assert t.leaks(secrets) == []
    reliability.secret(len(secrets))


def test_local_provider_leaks_nothing(
    db_url: str, engine: Engine, transcript: Transcript, caplog: Any, capsys: Any, reliability: Any
) -> None:
    master = os.urandom(32)
    provider = LocalKeyProvider(master)
    echo = create_engine(db_url, echo="debug")
    try:
        s = schema(echo, provider)
        plain = _plaintexts()
        _session(transcript, echo, s, plain)
        secrets = {f"plaintext {k}": v.encode() for k, v in plain.items()}
        secrets |= {"master key": master, **_data_keys(echo, s, provider)}
    finally:
        echo.dispose()
    _assert_clean(transcript, _collect_logs(transcript, caplog, capsys), secrets, reliability)


def test_aws_provider_leaks_nothing(
    db_url: str, engine: Engine, kms_server: str, cmk: str, transcript: Transcript, caplog: Any, capsys: Any,
    reliability: Any,
) -> None:
    """botocore logs request parameters and response bodies at DEBUG, which
    for KMS are data keys: sa_envelope.redact filters them out."""
    provider = AwsKmsProvider(cmk, client=proxied_client(kms_server))
    echo = create_engine(db_url, echo="debug")
    try:
        s = schema(echo, provider)
        plain = _plaintexts()
        _session(transcript, echo, s, plain)
        provider.wrap(b"W" * 32, key_context("patients", fmt.format_key_id(2)))  # Encrypt sends a plaintext
        with KmsFaultProxy(kms_server) as proxy:
            proxy.plan("*", ACCESS_DENIED)
            refused = AwsKmsProvider(cmk, client=proxied_client(proxy.url))
            transcript.error(lambda: refused.generate(key_context("patients", fmt.format_key_id(3))))
        secrets = {f"plaintext {k}": v.encode() for k, v in plain.items()}
        secrets |= {"wrapped plaintext": b"W" * 32, **_data_keys(echo, s, provider)}
    finally:
        echo.dispose()
    _assert_clean(transcript, _collect_logs(transcript, caplog, capsys), secrets, reliability)

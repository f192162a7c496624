"""KMS faults, injected for real by an HTTP proxy in front of moto.

Promises (docs/threat-model.md, "What the tests prove"):

* a burst of throttling is absorbed by botocore's retries (``standard`` mode,
  configurable through ``AwsKmsProvider(..., config=)`` or your own client);
* a sustained outage or a refusal (access denied, disabled or pending-deletion
  CMK) is a ``KeyProviderError`` naming the table; the transaction does not
  commit, no key row and no data row remain, and the next write works;
* a slow KMS completes, or times out into ``KeyProviderError`` when the
  client's ``read_timeout`` says so.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from botocore.config import Config
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from reliability.kms_proxy import (
    ACCESS_DENIED,
    DISABLED,
    DROP,
    PENDING_DELETION,
    SERVER_ERROR,
    THROTTLE,
    Fault,
    KmsFaultProxy,
    delay,
    proxied_client,
)
from reliability.rows import add_rows, check_rows, count_key_rows, count_rows, insert_rows
from sa_envelope import AwsKmsProvider, KeyProviderError
from support.models import schema

pytestmark = pytest.mark.reliability

ROWS = 20
REFUSALS = {  # fault -> the KMS error code the message must name
    ACCESS_DENIED: "AccessDeniedException",
    DISABLED: "DisabledException",
    PENDING_DELETION: "KMSInvalidStateException",
}
OUTAGES = [SERVER_ERROR, DROP, THROTTLE, *REFUSALS]


@pytest.fixture
def proxy(kms_server: str) -> Iterator[KmsFaultProxy]:
    with KmsFaultProxy(kms_server) as p:
        yield p


def via(proxy: KmsFaultProxy, cmk: str, **client_kw: Any) -> AwsKmsProvider:
    return AwsKmsProvider(cmk, client=proxied_client(proxy.url, **client_kw))


def assert_names_table(err: KeyProviderError, table: str, fault: Fault) -> None:
    assert err.table == table
    assert f"table {table}" in str(err)
    if fault in REFUSALS:
        assert REFUSALS[fault] in str(err)


def test_throttling_bursts_are_retried(engine: Engine, cmk: str, proxy: KmsFaultProxy, reliability: Any) -> None:
    s = schema(engine, via(proxy, cmk, max_attempts=4))
    s.create()
    proxy.plan("GenerateDataKey", THROTTLE, times=3)
    insert_rows(s, "patients", range(ROWS))
    proxy.plan("Decrypt", THROTTLE, times=3)  # a cold reader unwraps through the burst
    assert check_rows(engine, via(proxy, cmk, max_attempts=4), "patients", range(ROWS)) == (ROWS, 0)
    assert proxy.injected["throttle"] == 6
    reliability.fault("throttle burst", 6)
    reliability.rows(ROWS)


def test_default_client_uses_standard_retries(
    proxy: KmsFaultProxy, cmk: str, monkeypatch: pytest.MonkeyPatch, reliability: Any
) -> None:
    """The client AwsKmsProvider makes itself retries a burst with botocore's
    real backoff; ``config=`` replaces that policy (here: no retries)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", proxy.url)
    context = {"sa_envelope:table": "t", "sa_envelope:key": "00"}
    default = AwsKmsProvider(cmk)
    assert default.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 4}
    proxy.plan("GenerateDataKey", THROTTLE, times=2)
    assert len(default.generate(context).plaintext) == 32
    no_retries = AwsKmsProvider(cmk, config=Config(retries={"mode": "standard", "total_max_attempts": 1}))
    proxy.plan("GenerateDataKey", THROTTLE, times=1)
    with pytest.raises(KeyProviderError, match="ThrottlingException"):
        no_retries.generate(context)
    assert proxy.injected["throttle"] == 3
    reliability.fault("throttle burst", 3)


@pytest.mark.parametrize("fault", OUTAGES, ids=lambda f: f.name)
def test_outage_on_write_commits_nothing(
    engine: Engine, cmk: str, proxy: KmsFaultProxy, fault: Fault, reliability: Any
) -> None:
    """One transaction adds rows to a keyed table (no KMS call: its key is
    cached) and the first rows of a new table (needs KMS, which fails)."""
    s = schema(engine, via(proxy, cmk, max_attempts=3), ["patients", "visits"])
    s.create()
    insert_rows(s, "patients", range(ROWS))
    proxy.plan("*", fault)
    with Session(engine) as session:
        add_rows(s, session, "patients", range(ROWS, 2 * ROWS))
        add_rows(s, session, "visits", range(ROWS))
        with pytest.raises(KeyProviderError) as info:
            session.commit()
        session.rollback()
    assert_names_table(info.value, "visits", fault)
    assert count_key_rows(engine, "visits") == 0  # nothing half-written
    assert (count_rows(engine, "patients"), count_rows(engine, "visits")) == (ROWS, 0)
    injected = proxy.injected[fault.name]
    proxy.clear()
    insert_rows(s, "visits", range(ROWS))  # the next write works
    assert check_rows(engine, via(proxy, cmk), "patients", range(ROWS)) == (ROWS, 0)
    assert check_rows(engine, via(proxy, cmk), "visits", range(ROWS)) == (ROWS, 0)
    reliability.fault(f"outage on write: {fault.name}", injected)
    reliability.rows(2 * ROWS)


def test_outage_on_read_is_a_clear_error(engine: Engine, cmk: str, proxy: KmsFaultProxy, reliability: Any) -> None:
    s = schema(engine, via(proxy, cmk))
    s.create()
    insert_rows(s, "patients", range(ROWS))
    for fault in OUTAGES:
        proxy.plan("Decrypt", fault)
        with pytest.raises(KeyProviderError) as info:
            check_rows(engine, via(proxy, cmk, max_attempts=2), "patients")
        assert_names_table(info.value, "patients", fault)
        reliability.fault(f"outage on read: {fault.name}", proxy.injected[fault.name])
        proxy.clear()
    assert count_rows(engine, "patients") == ROWS  # a failed read changes nothing
    assert check_rows(engine, via(proxy, cmk), "patients", range(ROWS)) == (ROWS, 0)
    reliability.rows(ROWS)


def test_slow_kms_completes_or_times_out(engine: Engine, cmk: str, proxy: KmsFaultProxy, reliability: Any) -> None:
    s = schema(engine, via(proxy, cmk, max_attempts=1, read_timeout=0.3))
    s.create()
    proxy.plan("GenerateDataKey", delay(1.0))
    with Session(engine) as session:
        with pytest.raises(KeyProviderError, match="ReadTimeoutError") as info:
            insert_rows(s, "patients", range(ROWS), session=session)
    assert info.value.table == "patients"
    assert (count_key_rows(engine), count_rows(engine, "patients")) == (0, 0)
    slow = schema(engine, via(proxy, cmk, read_timeout=5))
    proxy.clear()
    proxy.plan("*", delay(0.1))  # slower than usual, within the timeout
    insert_rows(slow, "patients", range(ROWS))
    assert check_rows(engine, via(proxy, cmk, read_timeout=5), "patients", range(ROWS)) == (ROWS, 0)
    reliability.fault("slow KMS", sum(v for k, v in proxy.injected.items() if k.startswith("delay")))
    reliability.rows(ROWS)

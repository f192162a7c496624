"""Issue 11: roll-over counts every AES-GCM encryption under a table key.

Each value sealed, also inside the transaction that created or rolled over
the key, and each row key wrapped under it count toward
``RolloverPolicy.max_encryptions`` (before, 10,001 row keys went under one
table key with ``max_encryptions=100``, and 5,000 values in one transaction).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import Column, Engine, Integer, LargeBinary, MetaData, String, Table, select, type_coerce
from sqlalchemy.orm import Session

from support.models import row_scope_model
from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider, RolloverPolicy
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt

LIMIT = 100


def _manager(engine: Engine) -> KeyManager:
    keys = KeyManager(engine, LocalKeyProvider(b"\x05" * 32), rollover=RolloverPolicy(max_encryptions=LIMIT))
    keys.create_table()
    return keys


def _headers(engine: Engine, column: Any) -> Counter[int]:
    with engine.connect() as conn:
        values = conn.execute(select(type_coerce(column, LargeBinary))).scalars().all()
    return Counter(fmt.read_header(bytes(v))[1] for v in values)


def test_values_sealed_in_one_transaction_roll_over(engine: Engine) -> None:
    keys = _manager(engine)
    t = Table("exact_values", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
              Column("v", EncryptedType(String(20), keys)))
    t.metadata.create_all(engine)
    with engine.begin() as conn:  # the first key is made inside this transaction
        conn.execute(t.insert(), [{"id": i, "v": f"value {i}"} for i in range(1_000)])
    per_key = _headers(engine, t.c.v)
    assert sum(per_key.values()) == 1_000 and max(per_key.values()) <= LIMIT and len(per_key) >= 10
    with engine.connect() as conn:
        statuses = Counter(conn.execute(select(keys.table.c.status).where(keys.table.c.scope == "table")).scalars())
    assert statuses[kt.ACTIVE] == 1 and statuses[kt.RETIRED] == len(per_key) - 1
    with engine.connect() as conn:
        assert conn.execute(select(t.c.v).where(t.c.id == 999)).scalar_one() == "value 999"


def test_row_keys_count_as_encryptions_under_their_table_key(engine: Engine) -> None:
    keys = _manager(engine)
    Patient = row_scope_model(keys)
    Patient.metadata.create_all(engine)
    with Session(engine) as s:  # 1,000 row keys and 1,000 table-scoped names, one transaction
        s.add_all([Patient(id=i, name=f"name {i}", notes={"i": i}, ssn=f"{i:09d}") for i in range(1_000)])
        s.commit()
    uses = _headers(engine, Patient.__table__.c.name)
    with engine.connect() as conn:
        t = keys.table
        uses.update(conn.execute(select(t.c.parent_id).where(t.c.scope == kt.SCOPE_ROW)).scalars())
    assert sum(uses.values()) == 2_000
    assert max(uses.values()) <= LIMIT, uses.most_common(3)
    with Session(engine) as s:
        got = {p.id: (p.name, p.notes) for p in s.scalars(select(row_scope_model(_manager(engine))))}
    assert got == {i: (f"name {i}", {"i": i}) for i in range(1_000)}

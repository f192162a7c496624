"""Issue 12: a key table made before row keys were bound gets ``row_digest``
with ``op.add_row_digest()``; its old (unbound) row keys keep working and new
rows are bound."""

from __future__ import annotations

from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Engine, MetaData, Table, inspect, select
from sqlalchemy.orm import Session

import sa_envelope.alembic  # noqa: F401  (registers the operations)
from support.models import row_scope_model
from support.row_scope import LOCAL
from sa_envelope import KeyManager
from sa_envelope.keys import table as kt


def test_add_row_digest_upgrades_an_old_key_table(engine: Engine) -> None:
    new = kt.key_table(MetaData())
    old = Table(kt.KEY_TABLE_NAME, MetaData(), *(c._copy() for c in new.columns if c.name != "row_digest"))
    old.create(engine)
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).add_row_digest()
    columns = {c["name"] for c in inspect(engine).get_columns(kt.KEY_TABLE_NAME)}
    assert "row_digest" in columns
    assert "ix_sa_envelope_keys_row_digest" in {i["name"] for i in inspect(engine).get_indexes(kt.KEY_TABLE_NAME)}
    keys = KeyManager(engine, LOCAL)
    Patient = row_scope_model(keys)
    Patient.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Patient(id=1, name="A", notes={"a": 1}, ssn="1"))
        s.commit()
    with engine.connect() as conn:
        digests = conn.execute(select(keys.table.c.row_digest).where(keys.table.c.scope == "row")).scalars().all()
    assert len(digests) == 1 and digests[0] is not None
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).drop_row_digest()
    assert "row_digest" not in {c["name"] for c in inspect(engine).get_columns(kt.KEY_TABLE_NAME)}

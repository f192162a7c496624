"""Crash scenarios of the rotation jobs: rewrap, roll-over, re-encryption,
and encrypting / decrypting a column in place (Alembic operations).

Each job is small (two keys, two rows, batches of one) so that every fault
point is passed twice or once, and each verify accepts exactly the states
the job may leave: nothing done, done in committed steps, or finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, inspect, select, text, type_coerce

from sa_envelope import EncryptedType, KeyManager, KeyProvider, LocalKeyProvider
from sa_envelope.alembic import ENCRYPT_SUFFIX
from sa_envelope.envelope import format as fmt
import sa_envelope.alembic  # noqa: F401 - registers op.encrypt_column / decrypt_column

from .crash import CrashContext, CrashScenario, count_checked_rows, orphan_values, register
from .rows import insert_rows

__all__ = ["COLUMN_JOBS", "REENCRYPT", "REWRAP", "ROLLOVER"]

BEFORE = range(0, 20)
DURING = range(20, 30)
PEOPLE = {1: "ada@example.org", 2: "alan@example.org", 3: None}


def _prepare_patients(ctx: CrashContext, rows: range = BEFORE) -> None:
    s = ctx.schema()
    s.create()
    insert_rows(s, "patients", rows)


def _count_checked_patients(ctx: CrashContext, provider: Any, ns: range) -> int:
    """Asserts no orphan value and all of patients ``ns`` intact; returns how many."""
    assert orphan_values(ctx.engine, ctx.tables) == 0
    return count_checked_rows(ctx, "patients", ns, provider)


def _key_rows(ctx: CrashContext, where: str) -> list[Any]:
    """(id, wrapping_key_id, status) of the key rows ``where`` selects."""
    with ctx.engine.connect() as conn:
        return list(conn.execute(text(f"SELECT id, wrapping_key_id, status FROM sa_envelope_keys WHERE {where}")))


# -- rewrap ------------------------------------------------------------------------------


class _EitherKey(KeyProvider):
    """Unwraps with whichever of two key files wrapped the key (for checks)."""

    def __init__(self, first: LocalKeyProvider, second: LocalKeyProvider) -> None:
        self._by_id = {first.wrapping_key_id: first, second.wrapping_key_id: second}
        self._first = first

    @property
    def wrapping_key_id(self) -> str:
        return self._first.wrapping_key_id

    def wrap(self, plaintext: bytes, context: Any) -> Any:
        return self._first.wrap(plaintext, context)

    def trusted_wrapping_keys(self) -> frozenset[str]:
        return frozenset(self._by_id)

    def unwrap(self, wrapped: bytes, context: Any, wrapping_key_id: str) -> bytes:
        return self._by_id[wrapping_key_id].unwrap(wrapped, context, wrapping_key_id)


def _new_provider(ctx: CrashContext) -> LocalKeyProvider:
    return LocalKeyProvider.from_file(ctx.keyfile + ".new")


def _prepare_rewrap(ctx: CrashContext) -> None:
    _prepare_patients(ctx)
    _new_provider(ctx)  # creates the target key file before any worker runs


def _run_rewrap(ctx: CrashContext) -> None:
    """Two keys (the table key, the deterministic key), one per batch."""
    report = KeyManager(ctx.engine, ctx.provider).rewrap(to=_new_provider(ctx), source=ctx.provider, batch_size=1)
    assert report.complete, report


def _verify_rewrap(ctx: CrashContext, crashed: bool | None) -> int:
    old, new = ctx.provider, _new_provider(ctx)
    wrapped_by = {r.wrapping_key_id for r in _key_rows(ctx, "parent_id IS NULL")}
    assert wrapped_by <= {old.wrapping_key_id, new.wrapping_key_id}
    if crashed is False:
        assert wrapped_by == {new.wrapping_key_id}
    return _count_checked_patients(ctx, _EitherKey(old, new), BEFORE)


REWRAP = register(CrashScenario(
    name="rewrap",
    points=("rewrap.key.before_update", "rewrap.key.after_update",
            "rewrap.batch.before_commit", "rewrap.batch.after_commit"),
    prepare=_prepare_rewrap, run=_run_rewrap, verify=_verify_rewrap, occurrences=2,
))


# -- table-key roll-over ---------------------------------------------------------------------


def _run_rollover(ctx: CrashContext) -> None:
    """Roll the patients key over, then write rows under the new key (once)."""
    s = ctx.schema()
    s.keys.rotate_table_key("patients")
    if not _count_rows_during(ctx):
        insert_rows(s, "patients", DURING)


def _count_rows_during(ctx: CrashContext) -> int:
    """Patients rows the roll-over job wrote (numbered from ``DURING``)."""
    with ctx.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM patients WHERE n >= {DURING.start}")).scalar_one())


def _verify_rollover(ctx: CrashContext, crashed: bool | None) -> int:
    table_keys = _key_rows(ctx, "owner_table = 'patients' AND scope = 'table'")
    assert [k.status for k in table_keys].count("active") == 1
    during = _count_rows_during(ctx)
    if crashed is True:  # the roll-over shares one transaction: undone whole
        assert during == 0 and len(table_keys) == 1
    if crashed is False:
        assert during == len(DURING) and len(table_keys) >= 2
    return _count_checked_patients(ctx, ctx.provider, range(BEFORE.start, DURING.stop if during else BEFORE.stop))


ROLLOVER = register(CrashScenario(
    name="rollover",
    points=("rollover.before_retire", "rollover.after_retire"),
    prepare=_prepare_patients, run=_run_rollover, verify=_verify_rollover,
))


# -- re-encryption -----------------------------------------------------------------------------


def _first_table_key(ctx: CrashContext) -> int:
    """The key the job moves values off: the patients table key made by
    prepare, remembered in a file beside the key file (created_at has whole
    seconds only on MariaDB, so it cannot tell two keys apart)."""
    path = Path(ctx.keyfile + ".reencrypt-key")
    if not path.exists():
        with ctx.engine.connect() as conn:
            (key_id,) = conn.execute(text(
                "SELECT id FROM sa_envelope_keys WHERE owner_table = 'patients' AND scope = 'table'")).scalars().all()
        path.write_text(str(key_id))
    return int(path.read_text())


def _names_under(ctx: CrashContext, key_id: int) -> int:
    table = Table("patients", MetaData(), Column("id", Integer, primary_key=True), Column("name", LargeBinary))
    with ctx.engine.connect() as conn:
        values = conn.execute(select(type_coerce(table.c.name, LargeBinary))).scalars().all()
    return sum(1 for v in values if fmt.read_header(bytes(v))[1] == key_id)


def _prepare_reencrypt(ctx: CrashContext) -> None:
    _prepare_patients(ctx, range(2))
    _first_table_key(ctx)


def _run_reencrypt(ctx: CrashContext) -> None:
    """Two rows, one per batch, off the first table key (rolled over first)."""
    s = ctx.schema()
    report = s.keys.reencrypt([s.tables["patients"].c.name], key_id=_first_table_key(ctx), batch_size=1)
    assert report.failed == report.remaining == 0, report


def _verify_reencrypt(ctx: CrashContext, crashed: bool | None) -> int:
    if crashed is False:
        assert _names_under(ctx, _first_table_key(ctx)) == 0
    return _count_checked_patients(ctx, ctx.provider, range(2))


REENCRYPT = register(CrashScenario(
    name="reencrypt",
    points=("reencrypt.row.before_update", "reencrypt.row.after_update",
            "reencrypt.batch.before_commit", "reencrypt.batch.after_commit"),
    prepare=_prepare_reencrypt, run=_run_reencrypt, verify=_verify_reencrypt,
    occurrences=2,
))


# -- encrypting / decrypting a column in place ------------------------------------------------------


def _column_op(ctx: CrashContext, name: str) -> None:
    """Run ``op.<name>`` as Alembic runs one revision (its own transaction)."""
    keys = KeyManager(ctx.engine, ctx.provider)
    with ctx.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"transaction_per_migration": True})
        with context.begin_transaction(_per_migration=True):
            getattr(Operations(context), name)("people", "email", EncryptedType(String(200)), keys=keys, batch_size=1)


def _prepare_people(ctx: CrashContext, encrypted: bool) -> None:
    ctx.schema().create()
    people = Table("people", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
                   Column("email", String(200)))
    people.create(ctx.engine)
    with ctx.engine.begin() as conn:
        conn.execute(people.insert(), [{"id": i, "email": e} for i, e in PEOPLE.items()])
    if encrypted:
        _column_op(ctx, "encrypt_column")


def _verify_people(ctx: CrashContext, crashed: bool | None, encrypting: bool) -> int:
    """Every row holds its email, in the old form, the new one, or both (in the
    temporary column) as far as the copy got; nothing else."""
    keys = KeyManager(ctx.engine, ctx.provider)
    enc = EncryptedType(String(200), keys, context="people.email")
    names = {c["name"] for c in inspect(ctx.engine).get_columns("people")}
    people = Table("people", MetaData(), autoload_with=ctx.engine)
    with ctx.engine.connect() as conn:
        rows = conn.execute(select(people).order_by(people.c.id)).all()

    def read(value: Any) -> Any:
        return enc.decrypt(bytes(value)) if isinstance(value, (bytes, memoryview)) else value

    temp = "email" + ENCRYPT_SUFFIX
    for row in rows:
        m = row._mapping
        if "email" in names:
            assert read(m["email"]) == PEOPLE[m["id"]]
        if temp in names and m[temp] is not None:
            assert read(m[temp]) == PEOPLE[m["id"]]
    if crashed is False:
        assert names == {"id", "email"}
        stored = [r._mapping["email"] for r in rows]
        assert all(isinstance(v, (bytes, memoryview)) == encrypting for v in stored if v is not None)
    assert orphan_values(ctx.engine, ctx.tables) == 0
    return len(rows)


def _column_scenarios(name: str, encrypting: bool) -> list[CrashScenario]:
    """Two scenarios per operation: its batch points are passed once per row
    (two rows), its swap points once."""
    common: dict[str, Any] = {
        "prepare": lambda ctx: _prepare_people(ctx, encrypted=not encrypting),
        "run": lambda ctx: _column_op(ctx, name),
        "verify": lambda ctx, crashed: _verify_people(ctx, crashed, encrypting),
    }
    batch = (f"{name}.batch.before_update", f"{name}.batch.after_update",
             f"{name}.batch.before_commit", f"{name}.batch.after_commit")
    return [
        register(CrashScenario(name=f"{name}.batch", points=batch, occurrences=2, **common)),
        register(CrashScenario(name=f"{name}.swap", points=(f"{name}.before_swap", f"{name}.after_swap"), **common)),
    ]


COLUMN_JOBS = _column_scenarios("encrypt_column", True) + _column_scenarios("decrypt_column", False)

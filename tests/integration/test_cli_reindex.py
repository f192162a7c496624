"""Moving a table off its blind-index key: ``sa-envelope reencrypt --key`` (real
subprocesses) and ``keys.reencrypt`` (the Python API), every backend.

After ``rotate_table_key(table, scope="blind-index")`` the job recomputes,
from the decrypted values, the equality digests of a ``BlindIndexType``
column and the tokens of the table's prefix, substring and range indexes
(PostgreSQL: the rows' ``BIGINT[]`` arrays; MariaDB and SQLite: the token
table) under the new key, in compare-and-set batches. The CLI runs no
application code, so each index is described with ``--index`` (as for
``verify``); an index left undescribed is refused, since the key is retired
at the end and that index would stay under it. Half-way (``--max-batches``
/ ``max_batches=``) every lookup returns exactly what the plaintext twin
does; once done the old key is retired and lookups use one key; a rerun
writes nothing; KMS calls follow the keys, not the rows.
"""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Date, Integer, String, Table, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import (
    BlindIndexType,
    EncryptedType,
    KeyManager,
    LivePolicy,
    LocalKeyProvider,
    PrefixIndex,
    RangeIndex,
    SubstringIndex,
    lookup,
)
from sa_envelope.columns.normalizers import normalize_email
from sa_envelope.keys import table as kt
from support.models import new_base
from support.rotation import PYTHON, key_statuses, stored_hash, subprocess_env
from support.search import TEXT, case_sensitive_like, rows, twin_ids

FAST = LivePolicy(ttl=0.2, grace=1.0)
OWNER = "reindex_patients"
SPECS = [
    f"{OWNER}.name=prefix:max_length=4,bits=12",
    f"{OWNER}.notes=substring:n=3,bits=12",
    f"{OWNER}.born=range:granularities=year/month/day,bits=12,type=date",
    f"{OWNER}.email_index=blind:source=email,bits=16,normalizer=email",
]
COUNT = 300


def _models(keys: KeyManager) -> tuple[Any, Table]:
    Base = new_base()

    class Patient(Base):
        __tablename__ = OWNER
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        name: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys))
        notes: Mapped[str | None] = mapped_column(EncryptedType(String(300), keys))
        born: Mapped[dt.date | None] = mapped_column(EncryptedType(Date, keys))
        email: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys))
        email_index: Mapped[bytes | None] = mapped_column(
            BlindIndexType("email", keys, normalizer=normalize_email, bits=16)
        )
        __table_args__ = (
            PrefixIndex("name", keys, max_length=4, bits=12),
            SubstringIndex("notes", keys, n=3, bits=12),
            RangeIndex("born", keys, granularities=("year", "month", "day"), bits=12),
        )

    twin = Table(
        "reindex_twin", Base.metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", TEXT), Column("notes", TEXT), Column("born", Date), Column("email", TEXT),
    )  # fmt: skip
    return Patient, twin


def _fill(engine: Engine, Patient: Any, twin: Table) -> list[dict[str, Any]]:
    data = rows(COUNT)
    for row in data:
        row["email"] = None if row["id"] % 17 == 0 else f"User{row['id'] % 40}@Example.com"
    with Session(engine) as session:  # the ORM computes the blind index
        session.add_all([Patient(**row) for row in data])
        session.commit()
    with engine.begin() as conn:
        conn.execute(insert(twin), data)
    return data


def _needles(data: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    rng = random.Random(11)
    names = [r["name"] for r in data if r["name"]]
    notes = [r["notes"] for r in data if r["notes"]]
    out: list[tuple[str, Any]] = []
    for _ in range(12):
        name = rng.choice(names)
        out.append(("startswith", name[: rng.randrange(1, len(name) + 1)]))
        note = rng.choice(notes)
        start = rng.randrange(0, max(1, len(note) - 3))
        piece = note[start : start + rng.randrange(3, 10)]
        out.append(("contains", piece if len(piece) >= 3 else "penicillin"))
        low = dt.date(1850, 1, 1) + dt.timedelta(days=rng.randrange(180 * 365))
        out.append(("between", (low, low + dt.timedelta(days=rng.choice([0, 31, 400, 20 * 365])))))
    return out


def _assert_like_twin(engine: Engine, keys: KeyManager, Patient: Any, twin: Table, data: list[dict[str, Any]]) -> None:
    """Every lookup kind against the twin's SQL; equality against the normalised emails."""
    keys.live.invalidate()
    attribute = {"startswith": Patient.name, "contains": Patient.notes, "between": Patient.born}
    with Session(engine) as session, engine.connect() as plain:
        case_sensitive_like(plain)
        for kind, needle in _needles(data):
            expected = twin_ids(plain, twin, **{kind: needle})
            assert {p.id for p in lookup(session, attribute[kind], **{kind: needle})} == expected, (kind, needle)
        for asked in ("user3@example.com", "USER7@EXAMPLE.COM", "nobody@example.com"):
            expected = {r["id"] for r in data if r["email"] and normalize_email(r["email"]) == normalize_email(asked)}
            assert {p.id for p in lookup(session, Patient.email, asked)} == expected, asked


def _digests_under(engine: Engine, keys: KeyManager, Patient: Any, key_id: int) -> int:
    """How many stored email digests are those of the key ``key_id``."""
    itype = Patient.__table__.c.email_index.type
    entry = next(k for k in keys.live.keys(OWNER, kt.SCOPE_BLIND_INDEX) if k.key_id == key_id)
    with Session(engine) as session:
        found = session.execute(select(Patient.email, Patient.email_index).where(Patient.email.is_not(None))).all()
    return sum(itype.digest(email, key=entry) == stored for email, stored in found)


def _blind_key(engine: Engine, keys: KeyManager) -> int:
    t = keys.table
    with engine.connect() as conn:
        return int(conn.execute(select(t.c.id).where(t.c.owner_table == OWNER, t.c.scope == "blind-index")).scalar_one())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(None), capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("via", ["cli", "api"])
def test_a_blind_index_key_is_moved_off_with_lookups_exact(engine: Engine, db_url: str, tmp_path: Path, via: str) -> None:
    master = tmp_path / "master.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(master), live=FAST)
    keys.create_table()
    Patient, twin = _models(keys)
    Patient.metadata.create_all(engine)
    data = _fill(engine, Patient, twin)
    table = Patient.__table__
    old = _blind_key(engine, keys)
    new = keys.rotate_table_key(OWNER, scope="blind-index")
    time.sleep(max(0.0, keys.live.switched_at(OWNER, kt.SCOPE_BLIND_INDEX) - time.time()))
    base = ["reencrypt", "--database-url", db_url, "--cmk", f"local:{master}", "--key", f"{old:016x}"]
    base += ["--grace", "1", "--batch-size", "50"]

    def move(max_batches: int | None = None) -> tuple[Any, str]:
        if via == "api":
            report = keys.reencrypt([table.c.email_index], key_id=old, batch_size=50, max_batches=max_batches)
            return report, str(report)
        more = ["--max-batches", str(max_batches)] if max_batches else []
        result = _cli(*base, *(a for s in SPECS for a in ("--index", s)), *more)
        assert "Traceback" not in result.stderr, result.stderr
        return result, result.stdout

    if via == "cli":  # an index no --index describes would stay under the retired key: refused
        result = _cli(*base, *(a for s in SPECS[:2] for a in ("--index", s)))
        assert result.returncode == 1 and "not described: search index born/range" in result.stderr, result.stderr
        assert "binary column email_index" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert key_statuses(engine, OWNER, kt.SCOPE_BLIND_INDEX)[old] != kt.RETIRED

    half, said = move(max_batches=2)
    if via == "cli":
        assert half.returncode == 1 and "stopped by --max-batches" in said, said + half.stderr
    else:
        assert half.stopped and not half.retired and half.reindexed > 0, said
    assert "key retired" not in said
    moved = _digests_under(engine, keys, Patient, new)
    assert 0 < moved < sum(1 for r in data if r["email"]), moved  # half-way: digests under both keys
    reports = keys.verify_index(table)
    assert all(r.ok and r.moving.get(f"{old:016x}", 0) > 0 for r in reports), [str(r) for r in reports]
    _assert_like_twin(engine, keys, Patient, twin, data)

    done, said = move()
    if via == "cli":
        assert done.returncode == 0 and "key retired" in said, said + done.stderr
        calls = int(said.rsplit("KMS calls: ", 1)[1].split()[0])
        assert calls <= 3, said  # the table key and the two blind-index keys, whatever the row count
    else:
        assert (done.retired, done.failed, done.stopped) == (True, 0, False), said
    assert key_statuses(engine, OWNER, kt.SCOPE_BLIND_INDEX) == {old: kt.RETIRED, new: kt.ACTIVE}
    keys.live.invalidate()
    assert [k.key_id for k in keys.live.keys(OWNER, kt.SCOPE_BLIND_INDEX)] == [new]
    assert _digests_under(engine, keys, Patient, new) == sum(1 for r in data if r["email"])
    reports = keys.verify_index(table)
    assert all(r.ok and not r.moving and r.key_id == f"{new:016x}" for r in reports), [str(r) for r in reports]
    _assert_like_twin(engine, keys, Patient, twin, data)

    before = stored_hash(engine)
    rerun, said = move()
    assert "key retired" in said and " re-indexed" not in said, said
    assert (rerun.returncode == 0) if via == "cli" else rerun.retired
    assert stored_hash(engine) == before  # nothing left to move: nothing written

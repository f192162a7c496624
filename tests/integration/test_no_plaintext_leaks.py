"""Issue 12: no plaintext escapes through errors, compiled SQL or writes.

Each case is reproduced as an attacker or a careless caller would, and ends
with the package's own error; the plaintext of the row is then searched for
in ``str()``, ``repr()``, ``args``, the chained causes, the formatted
traceback *with frame locals* (what Sentry ships), the DEBUG logs, and the
raw bytes of the table. The secrets are module constants, never locals of
the test, so a hit in a frame's locals is the package's (or SQLAlchemy's).
"""

from __future__ import annotations

import decimal
import logging
import os
import subprocess
import traceback
from typing import Any, Callable

import pytest
from sqlalchemy import (
    Column, Float, Integer, LargeBinary, MetaData, Numeric, String, Table, cast, func, insert, literal,
    literal_column, select, text, update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from support.models import new_base
from support.rotation import PYTHON, subprocess_env
from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.errors import DecryptionError, EncryptionError, EnvelopeError, UnsupportedQueryError

SSN = "078-05-1120"
NOTE = "diagnosis-7f3a-confidential"
HUGE = 10**400
SECRETS = (SSN, NOTE, "1" + "0" * 60, "sNaN")


def ours(exc: BaseException) -> list[Any]:
    """The package's frames in the error's traceback."""
    return [f for f, _ in traceback.walk_tb(exc.__traceback__) if "/sa_envelope/" in f.f_code.co_filename]


def core_leaks(exc: BaseException, *secrets: str) -> list[str]:
    """:func:`leaks`, but of the traceback only the package's own frames: a
    Core caller hands SQLAlchemy the plaintext itself (its statement or its
    parameters), and SQLAlchemy's frames above ours keep what they were given."""
    found = [w for w in leaks(exc, *secrets) if not w.startswith("traceback")]
    return found + [f"frame {f.f_code.co_name}: {s[:20]}" for f in ours(exc) for s in secrets if s in repr(f.f_locals)]


def leaks(exc: BaseException, *secrets: str) -> list[str]:
    """Where any secret shows: message, repr, args, causes, traceback with locals."""
    found = []
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    tb = "".join(traceback.TracebackException(type(exc), exc, exc.__traceback__, capture_locals=True).format())
    texts = {"traceback": tb}
    for i, e in enumerate(chain):
        texts.update({f"str[{i}]": str(e), f"repr[{i}]": repr(e), f"args[{i}]": repr(e.args)})
    for where, body in texts.items():
        found += [f"{where}: {s[:20]}" for s in secrets if s in body]
    return found


def raised(fn: Callable[[], Any], expected: type[EnvelopeError]) -> EnvelopeError:
    """The exact package error ``fn`` raises (not a subclass of another kind)."""
    with pytest.raises(EnvelopeError) as info:
        fn()
    assert isinstance(info.value, expected), repr(info.value)
    return info.value


def raw_bytes(engine: Engine, table: str) -> bytes:
    """Every stored byte of ``table``, as the database returns it."""
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT * FROM {table}")).all()
    return repr(rows).encode() + b"".join(v for r in rows for v in r if isinstance(v, (bytes, memoryview)))


def make_models(keys: KeyManager) -> Any:
    Base = new_base()

    class Record(Base):
        __tablename__ = "records"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        ssn: Mapped[str] = mapped_column(EncryptedType(String(11), keys, deterministic=True))
        note: Mapped[str | None] = mapped_column(EncryptedType(String(100), keys))
        plain: Mapped[str | None] = mapped_column(String(100))
        amount: Mapped[float | None] = mapped_column(EncryptedType(Float, keys))
        price: Mapped[Any] = mapped_column(EncryptedType(Numeric(10, 2), keys), nullable=True)
        ratio: Mapped[Any] = mapped_column(EncryptedType(Numeric(asdecimal=False), keys), nullable=True)

    return Record


@pytest.fixture
def model(engine: Engine) -> tuple[KeyManager, Any]:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    Record = make_models(keys)
    Record.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Record(id=1, ssn="000-00-0001", note="first row", plain="p"))
        s.commit()
    return keys, Record


BAD_NUMBERS = [("amount", HUGE), ("amount", decimal.Decimal("sNaN")), ("ratio", decimal.Decimal("sNaN")),
               ("ratio", HUGE), ("price", decimal.Decimal("sNaN"))]


@pytest.mark.parametrize("attr,bad", BAD_NUMBERS, ids=["float-huge", "float-snan", "numeric-float-snan",
                                                       "numeric-float-huge", "numeric-snan"])
def test_orm_values_that_do_not_encode_raise_our_error_without_plaintext(
    model: tuple[KeyManager, Any], engine: Engine, caplog: pytest.LogCaptureFixture, attr: str, bad: Any
) -> None:
    keys, Record = model
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.DEBUG)
    try:
        with Session(engine) as s:
            s.add(Record(id=2, ssn=SSN, note=NOTE, **{attr: bad}))
            exc = raised(s.commit, EncryptionError)
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    assert exc.table == "records" and exc.column == attr
    assert leaks(exc, *SECRETS) == []
    assert not any(secret in caplog.text for secret in SECRETS)
    assert not any(secret.encode() in raw_bytes(engine, "records") for secret in SECRETS)
    with Session(engine) as s:  # nothing written, the other row still reads
        assert [r.note for r in s.scalars(select(Record))] == ["first row"]


def test_orm_update_to_a_value_that_does_not_encode(model: tuple[KeyManager, Any], engine: Engine) -> None:
    keys, Record = model
    with Session(engine) as s:
        row = s.get(Record, 1)
        row.note = NOTE
        row.amount = HUGE
        exc = raised(s.commit, EncryptionError)
        assert leaks(exc, *SECRETS) == []
    with Session(engine) as s:
        assert s.get(Record, 1).note == "first row"


@pytest.mark.parametrize("attr,bad", BAD_NUMBERS[:2], ids=["float-huge", "float-snan"])
def test_core_values_that_do_not_encode_raise_our_error(
    model: tuple[KeyManager, Any], engine: Engine, attr: str, bad: Any
) -> None:
    keys, Record = model
    with engine.begin() as conn:
        exc = raised(lambda: conn.execute(insert(Record.__table__).values(id=3, ssn=SSN, **{attr: bad})), EncryptionError)
    assert exc.__cause__ in (None, exc) and exc.__context__ in (None, exc)  # SQLAlchemy re-raises it "from" itself
    assert ours(exc) and core_leaks(exc, *SECRETS) == []


def test_codec_mismatch_on_read_keeps_the_plaintext_out_of_frames(engine: Engine) -> None:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    meta = MetaData()
    written = Table("leaky", meta, Column("id", Integer, primary_key=True),
                    Column("val", EncryptedType(String(100), keys, context="leaky.val")))
    misread = Table("leaky2", meta, Column("id", Integer, primary_key=True),
                    Column("val", EncryptedType(Integer, keys, context="leaky.val")))
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(written.insert().values(id=1, val=NOTE))
        conn.execute(text("INSERT INTO leaky2 (id, val) SELECT id, val FROM leaky"))  # a raw copy of the bytes
    for _ in range(2):  # the second read takes the per-column memo path
        with engine.connect() as conn:
            exc = raised(lambda: conn.execute(select(misread.c.val)).all(), DecryptionError)
        assert "do not decode as int" in str(exc)
        assert leaks(exc, NOTE) == []


def test_literal_binds_refuse_encrypted_values(model: tuple[KeyManager, Any]) -> None:
    keys, Record = model
    t = Record.__table__
    for stmt in (select(t).where(t.c.ssn == SSN), insert(t).values(id=9, note=NOTE), select(Record).where(Record.ssn == SSN)):
        exc = raised(lambda: stmt.compile(compile_kwargs={"literal_binds": True}), EncryptionError)
        assert "literal" in str(exc) and core_leaks(exc, *SECRETS) == []
    assert "078" not in str(select(t).where(t.c.ssn == SSN).compile())  # bound parameters still compile


def _bypasses(t: Table) -> dict[str, Any]:
    return {
        "literal": update(t).where(t.c.id == 1).values(note=literal(NOTE)),
        "function": update(t).where(t.c.id == 1).values(note=func.upper(NOTE)),
        "cast": update(t).where(t.c.id == 1).values(note=cast(NOTE, String)),
        "other-column": update(t).where(t.c.id == 1).values(note=t.c.plain),
        "literal-column": update(t).where(t.c.id == 1).values({t.c.note: literal_column(f"'{NOTE}'")}),
        "text": update(t).where(t.c.id == 1).values(note=text(f"'{NOTE}'")),
        "typed-bytes": update(t).where(t.c.id == 1).values(note=literal(NOTE.encode(), LargeBinary)),
        "insert-function": insert(t).values(id=5, ssn=func.lower(SSN)),
        "multi-values": insert(t).values([{"id": 6, "ssn": "x", "note": "ok"}, {"id": 7, "ssn": "y", "note": func.upper(NOTE)}]),
        "from-select": insert(t).from_select(["id", "ssn", "note"], select(t.c.id + 10, t.c.plain, t.c.plain)),
        "another-encrypted-type": insert(t).values(id=8, ssn=literal(SSN, EncryptedType(String(11), None, context="other.ssn"))),
    }


BYPASSES = ["literal", "function", "cast", "other-column", "literal-column", "text", "typed-bytes",
            "insert-function", "multi-values", "from-select", "another-encrypted-type"]


@pytest.mark.parametrize("case", BYPASSES)
def test_writes_that_bypass_the_encryption_are_refused(model: tuple[KeyManager, Any], engine: Engine, case: str) -> None:
    keys, Record = model
    with engine.begin() as conn:
        conn.execute(update(Record.__table__).where(Record.id == 1).values(plain=NOTE))
    stmt = _bypasses(Record.__table__)[case]
    with engine.connect() as conn:
        exc = raised(lambda: conn.execute(stmt), UnsupportedQueryError)
        conn.rollback()
    assert exc.table == "records" and exc.column in ("note", "ssn")
    assert core_leaks(exc, NOTE, SSN) == []
    assert raw_bytes(engine, "records").count(NOTE.encode()) == 1  # only the plaintext column's own copy
    with Session(engine) as s:
        assert [(r.id, r.note) for r in s.scalars(select(Record))] == [(1, "first row")]


def test_orm_writes_that_bypass_the_encryption_are_refused(model: tuple[KeyManager, Any], engine: Engine) -> None:
    keys, Record = model
    with Session(engine) as s:
        for stmt in (update(Record).where(Record.id == 1).values(note=func.upper(NOTE)),
                     insert(Record).values(id=4, ssn=literal(SSN)),
                     update(Record).where(Record.id == 1).values({Record.note: cast(NOTE, String)})):
            exc = raised(lambda: s.execute(stmt), UnsupportedQueryError)
            assert core_leaks(exc, NOTE, SSN) == []
            s.rollback()
        row = s.get(Record, 1)
        row.note = func.upper(NOTE)
        exc = raised(s.commit, UnsupportedQueryError)
        assert leaks(exc, NOTE) == []
    assert NOTE.encode() not in raw_bytes(engine, "records")
    with Session(engine) as s:  # ordinary values are still written and read
        s.get(Record, 1).note = "second"
        s.commit()
        assert s.get(Record, 1).note == "second"


def test_cli_escapes_what_it_prints_from_the_database(model: tuple[KeyManager, Any], engine: Engine, db_url: str) -> None:
    t = model[0].table
    with engine.begin() as conn:
        conn.execute(update(t).values(owner_table="\x1b[2J\x1b]0;owned\x07records\u202e", wrapping_key_id="local:\x1b[31m\nFAKE"))
    result = subprocess.run([PYTHON, "-m", "sa_envelope", "keys", "list", "--database-url", db_url],
                            env=subprocess_env(None), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout and "\u202e" not in result.stdout
    assert "\\x1b[2J\\x1b]0;owned\\x07records\\u202e" in result.stdout and "local:\\x1b[31m\\x0aFAKE" in result.stdout
    with engine.connect() as conn:
        count = len(conn.execute(select(t.c.id)).all())
    assert len(result.stdout.strip().splitlines()) == 1 + count  # the header and one line per key: none forged

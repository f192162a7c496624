"""``sa-envelope demo``: the whole idea in one screen, offline.

SQLite in a working folder, a local master key file beside it (created on
first run, mode 0600), a table with encrypted columns. It prints what the
database holds next to what the ORM shows, then the key table. No AWS, no
network. A leaf module: only the CLI's commands import it.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

from sqlalchemy import JSON, Date, Numeric, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ..columns.encrypted import EncryptedType
from ..envelope.format import format_key_id
from ..manager import KeyManager
from ..providers.local import LocalKeyProvider
from .output import say

__all__ = ["run_demo"]

PEOPLE = [
    ("Ada Lovelace", "123-45-6789", Decimal("1843.10"), dt.date(1815, 12, 10), {"allergies": ["penicillin"]}),
    ("Alan Turing", "987-65-4321", Decimal("1936.00"), dt.date(1912, 6, 23), {"allergies": []}),
    ("Grace Hopper", "555-12-3456", Decimal("1952.75"), dt.date(1906, 12, 9), {"notes": "COBOL"}),
]


def _hexdump(value: bytes, width: int = 24) -> str:
    shown = value[:width].hex(" ")
    return f"{shown} ... ({len(value)} bytes)" if len(value) > width else shown


def run_demo(workdir: str) -> int:
    """Write the demo rows afresh and print both views; return an exit code."""
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "demo.db").unlink(missing_ok=True)
    engine = create_engine(f"sqlite:///{folder / 'demo.db'}")
    keys = KeyManager(engine, LocalKeyProvider.from_file(folder / "master.key"))

    class Base(DeclarativeBase):
        pass

    class Patient(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(EncryptedType(String(200), keys))
        ssn: Mapped[str] = mapped_column(EncryptedType(String(11), keys, deterministic=True))
        balance: Mapped[Decimal] = mapped_column(EncryptedType(Numeric(12, 2), keys))
        born: Mapped[dt.date] = mapped_column(EncryptedType(Date, keys))
        notes: Mapped[dict[str, object]] = mapped_column(EncryptedType(JSON, keys))

    keys.create_table()
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(Patient(name=n, ssn=s, balance=b, born=d, notes=j) for n, s, b, d, j in PEOPLE)
        session.commit()

    say(f"Database: {folder / 'demo.db'}   master key file: {folder / 'master.key'}\n")
    say("What the database stores (patients.name and patients.ssn, raw bytes):")
    with engine.connect() as conn:
        for row_id, name, ssn in conn.execute(text("SELECT id, name, ssn FROM patients ORDER BY id")):
            say(f"  {row_id}  name={_hexdump(name)}")
            say(f"     ssn={_hexdump(ssn)}")
    say("\nWhat the ORM shows:")
    with Session(engine) as session:
        for p in session.scalars(select(Patient).order_by(Patient.id)):
            say(f"  {p.id}  {p.name:<13} ssn={p.ssn}  balance={p.balance}  born={p.born}  notes={p.notes}")
        found = session.scalars(select(Patient).where(Patient.ssn == "987-65-4321")).one()
        say(f"\nLookup by the deterministic column: Patient.ssn == '987-65-4321' -> {found.name}")
    say("\nThe key table (sa_envelope_keys holds wrapped keys only):")
    t = keys.table
    with engine.connect() as conn:
        for r in conn.execute(
            select(t.c.id, t.c.scope, t.c.owner_table, t.c.algorithm, t.c.wrapping_key_id, t.c.wrapped_key)
        ):
            say(
                f"  {format_key_id(r.id)}  {r.scope:<13} {r.owner_table:<9} {r.algorithm}  wrapped by {r.wrapping_key_id}  ({len(r.wrapped_key)} bytes)"
            )
    say(f"\nKey provider calls: {keys.stats()['provider_calls']}")
    engine.dispose()
    return 0

"""A small application as a user writes it after a plain ``pip install sa-envelope``.

``python install_app.py URL KEYFILE write|read [CMK]``: with a CMK (then
KEYFILE is unused) keys are wrapped by AWS KMS (the environment says where),
else by the local key file. ``write`` creates the tables
and stores rows (random, deterministic, blind-indexed, row-scoped, and an
empty string in the deterministic column); ``read``, in a fresh process, reads
them back through the key table alone, then drops what ``write`` created.
Prints ``ok <dialect> <mode>`` and, for ``read``, whether greenlet was imported.
"""

import sys

from sqlalchemy import String, Text, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sa_envelope import AwsKmsProvider, BlindIndexType, EncryptedType, KeyManager, LocalKeyProvider, lookup

url, keyfile, mode = sys.argv[1:4]
engine = create_engine(url)
provider = AwsKmsProvider(sys.argv[4]) if len(sys.argv) > 4 else LocalKeyProvider.from_file(keyfile)
keys = KeyManager(engine, provider, table_name="install_app_keys")


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "install_app_patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
    ssn: Mapped[str] = mapped_column(EncryptedType(String(11), keys, deterministic=True))
    email: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
    email_idx: Mapped[bytes] = mapped_column(BlindIndexType("email", keys), index=True)
    notes: Mapped[str] = mapped_column(EncryptedType(Text, keys, scope="row"))


if mode == "write":
    keys.create_table()
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([
            Patient(id=1, name="Ada", ssn="123-45-6789", email="ada@example.org", notes="n1"),
            Patient(id=2, name="Alan", ssn="", email="alan@example.org", notes="n2"),
        ])
        s.commit()
else:
    with Session(engine) as s:
        got = s.scalars(select(Patient).where(Patient.ssn == "")).one()
        assert (got.name, got.notes) == ("Alan", "n2"), (got.name, got.notes)
        by_email = lookup(s, Patient.email_idx, "ada@example.org")
        assert [p.name for p in by_email] == ["Ada"], by_email
    with engine.connect() as c:
        raw = c.execute(text("SELECT name FROM install_app_patients")).scalars().all()
        assert all(b"Ada" not in bytes(r) and b"Alan" not in bytes(r) for r in raw)
    Base.metadata.drop_all(engine)
    keys.table.drop(engine)
print("ok", engine.dialect.name, mode, "greenlet" if "greenlet" in sys.modules else "no-greenlet")

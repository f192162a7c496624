"""Querying encrypted columns: deterministic equality answers exactly what a
plaintext twin answers; every other operator fails loudly, never wrongly."""

from __future__ import annotations

import datetime as dt
import random
import threading
import uuid
from typing import Any, Callable, Iterator

import pytest
from sqlalchemy import Date, Integer, String, Uuid, bindparam, func, inspect, literal, select, text, update
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, aliased, mapped_column

from sa_envelope import EncryptedType, EnvelopeError, KeyManager, UnsupportedQueryError
from sa_envelope.envelope import format as fmt
from support.models import new_base

# The plaintext twin must compare exactly as bytes do: MariaDB's default
# collation ignores case and trailing spaces, so give it a binary no-pad one.
EXACT_TEXT = String(60).with_variant(
    mysql.VARCHAR(60, charset="utf8mb4", collation="utf8mb4_nopad_bin"), "mysql", "mariadb"
)

POOL = [
    "", " ", "a", "A", "a ", " a", "abc", "ABC", "O'Brien", 'say "hi"', "back\\slash",
    "%", "_", "a%b", "semi;colon", "tab\there", "new\nline", "null\x00byte",
    "é", "e\u0301", "ß", "SS", "İ", "i̇", "日本語", "中文", "한국어", "Ελληνικά", "русский",
    "😀", "👩‍👩‍👧", "🇫🇷", "\u200b", "ｆｕｌｌ", "x" * 60, "NULL", "None", "0", "-1",
] + [f"value-{i:03d}" for i in range(90)]
ABSENT = ["not there", "ABSENT", "é " , "😃", "value-999"]


def make_models(keys: KeyManager) -> tuple[type, type]:
    Base = new_base()

    class Person(Base):
        __tablename__ = "people"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        plain: Mapped[str | None] = mapped_column(EXACT_TEXT)
        det: Mapped[str | None] = mapped_column(EncryptedType(String(60), keys, deterministic=True), index=True)
        det2: Mapped[str | None] = mapped_column(EncryptedType(String(60), keys, deterministic=True))
        rnd: Mapped[str | None] = mapped_column(EncryptedType(String(60), keys))

    class Account(Base):
        __tablename__ = "accounts"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str] = mapped_column(EncryptedType(String(11), keys, deterministic=True), unique=True)
        det: Mapped[str | None] = mapped_column(EncryptedType(String(60), keys, deterministic=True))

    return Person, Account


@pytest.fixture
def keys(local_keys: KeyManager) -> KeyManager:
    return local_keys


@pytest.fixture
def models(engine: Engine, keys: KeyManager) -> Iterator[tuple[type, type]]:
    Person, Account = make_models(keys)
    Person.metadata.create_all(engine)
    yield Person, Account


def _values(rng: random.Random, n: int) -> list[str | None]:
    return [None if rng.random() < 0.1 else rng.choice(POOL) for _ in range(n)]


@pytest.fixture
def people(engine: Engine, models: tuple[type, type]) -> tuple[type, list[str | None]]:
    Person, _ = models
    values = _values(random.Random(5), 300)
    with Session(engine) as session:
        session.add_all(Person(id=i, plain=v, det=v, det2=v, rnd=v) for i, v in enumerate(values))
        session.commit()
    return Person, values


def _ids(session: Session, Person: Any, where: Callable[[Any], Any]) -> list[int]:
    return sorted(session.scalars(select(Person.id).where(where)))


def test_every_equality_query_matches_the_plaintext_twin(engine: Engine, people: tuple[type, list[Any]]) -> None:
    Person, values = people
    rng = random.Random(7)
    probes = sorted(set(v for v in values if v is not None)) + ABSENT
    forms: list[Callable[[Any, Any], Any]] = [
        lambda col, v: col == v,
        lambda col, v: col != v,
        lambda col, v: v == col,  # reflected
        lambda col, v: col.is_not_distinct_from(v),
        lambda col, v: col.is_distinct_from(v),
    ]
    with Session(engine) as session:
        for v in probes:
            for form in forms:
                assert _ids(session, Person, form(Person.det, v)) == _ids(session, Person, form(Person.plain, v)), v
        for size in (0, 1, 2, 5, 20, 60):
            for _ in range(4):
                subset = rng.sample(probes, size) + ([None] if size == 5 else [])
                for form in (lambda col: col.in_(subset), lambda col: col.not_in(subset)):
                    assert _ids(session, Person, form(Person.det)) == _ids(session, Person, form(Person.plain)), subset
        for col in (Person.det, Person.rnd):  # NULL tests work on randomised columns too
            for form in (lambda c: c.is_(None), lambda c: c.is_not(None), lambda c: c == None, lambda c: c != None):  # noqa: E711
                assert _ids(session, Person, form(col)) == _ids(session, Person, form(Person.plain))
        expected_nulls = sorted(i for i, v in enumerate(values) if v is None)
        assert _ids(session, Person, Person.det.is_(None)) == expected_nulls


def test_orm_forms_return_decrypted_objects(engine: Engine, people: tuple[type, list[Any]]) -> None:
    Person, values = people
    target = "O'Brien"
    expected = sorted(i for i, v in enumerate(values) if v == target)
    assert expected, "the sample must contain duplicates of the target"
    with Session(engine) as session:
        found = session.scalars(select(Person).where(Person.det == target)).all()
        assert sorted(p.id for p in found) == expected
        assert {p.det for p in found} == {p.rnd for p in found} == {target}
        assert sorted(p.id for p in session.scalars(select(Person).filter_by(det=target))) == expected
        assert sorted(p.id for p in session.query(Person).filter(Person.det == target)) == expected
        by_param = session.scalars(select(Person.id).where(Person.det == bindparam("v")), {"v": target})
        assert sorted(by_param) == expected  # an untyped bindparam takes the column's type
        # a self-join on the same column compares like with like
        other = aliased(Person)
        pairs = session.execute(
            select(Person.id, other.id).join(other, other.det == Person.det).where(Person.det == target)
        ).all()
        assert len(pairs) == len(expected) ** 2
        # subquery on the same column, and GROUP BY a deterministic column
        sub = select(Person.det).where(Person.id == expected[0])
        assert _ids(session, Person, Person.det.in_(sub)) == expected
        counts = dict(session.execute(select(Person.det, func.count()).group_by(Person.det)).all())
        assert counts[target] == len(expected)
        # bulk UPDATE ... WHERE on the deterministic column
        session.execute(update(Person).where(Person.det == target).values(det="renamed"))
        session.commit()
        assert _ids(session, Person, Person.det == "renamed") == expected
        # ORM bulk UPDATE of a randomised column (SQLAlchemy compares the column
        # with itself internally: that comparison is allowed)
        session.execute(update(Person).where(Person.id == expected[0]).values(rnd="bulk"))
        session.commit()
        assert session.get(Person, expected[0]).rnd == "bulk"


def test_duplicate_into_unique_deterministic_column_raises(engine: Engine, models: tuple[type, type]) -> None:
    _, Account = models
    with Session(engine) as session:
        session.add(Account(ssn="123-45-6789"))
        session.commit()
        session.add(Account(ssn="123-45-6789"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        session.add(Account(ssn="123-45-6780"))
        session.commit()
        assert session.scalars(select(Account.id).where(Account.ssn == "123-45-6789")).all() == [1]


def test_index_and_unique_constraint_exist_on_a_bounded_column(engine: Engine, models: tuple[type, type]) -> None:
    Person, Account = models
    assert Account.__table__.c.ssn.type.max_stored_length() == 11 * 4 + fmt.SIV_OVERHEAD
    assert Person.__table__.c.rnd.type.max_stored_length() == 60 * 4 + fmt.GCM_OVERHEAD
    insp = inspect(engine)
    assert any(ix["column_names"] == ["det"] for ix in insp.get_indexes("people"))
    uniques = [u["column_names"] for u in insp.get_unique_constraints("accounts")]
    uniques += [ix["column_names"] for ix in insp.get_indexes("accounts") if ix.get("unique")]
    assert ["ssn"] in uniques
    if engine.dialect.name in ("mysql", "mariadb"):
        col = {c["name"]: c for c in insp.get_columns("accounts")}["ssn"]
        assert isinstance(col["type"], mysql.VARBINARY) and col["type"].length == 69


def test_equal_values_differ_across_columns_and_tables(engine: Engine, models: tuple[type, type]) -> None:
    Person, Account = models
    with Session(engine) as session:
        session.add(Person(id=1, plain="same", det="same", det2="same", rnd="same"))
        session.add(Person(id=2, plain="same", det="same", det2="same", rnd="same"))
        session.add(Account(ssn="x", det="same"))
        session.commit()
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT det, det2, rnd FROM people ORDER BY id")).all()
        other = conn.execute(text("SELECT det FROM accounts")).scalar_one()
    (d1, d1b, r1), (d2, _, r2) = [tuple(bytes(x) for x in row) for row in rows]
    assert d1 == d2  # deterministic within a column
    assert d1 != d1b and d1[fmt.HEADER_LEN:] != d1b[fmt.HEADER_LEN:]  # not across columns
    assert d1 != bytes(other)  # nor across tables
    assert r1 != r2  # randomised


@pytest.mark.parametrize(
    "build",
    [
        lambda P: P.det < "m",
        lambda P: P.det >= "m",
        lambda P: "m" > P.det,
        lambda P: P.det.between("a", "z"),
        lambda P: P.det.like("a%"),
        lambda P: P.det.ilike("a%"),
        lambda P: P.det.contains("a"),
        lambda P: P.det.startswith("a"),
        lambda P: P.det.endswith("a"),
        lambda P: P.det.regexp_match("a"),
        lambda P: P.det.desc(),
        lambda P: P.det + "suffix",
        lambda P: P.rnd == "same",
        lambda P: P.rnd != "same",
        lambda P: P.rnd.in_(["a", "b"]),
        lambda P: P.rnd.like("a%"),
        lambda P: P.rnd < "m",
        lambda P: P.det == P.det2,
        lambda P: P.det == P.plain,
        lambda P: func.coalesce(P.det, "x") == "a",
        lambda P: P.det == literal("a"),
        lambda P: P.det.in_([literal("a"), "b"]),
        lambda P: aliased(P).rnd == P.rnd,
    ],
    ids=[
        "lt", "ge", "reflected-gt", "between", "like", "ilike", "contains", "startswith",
        "endswith", "regexp", "desc", "concat", "rnd-eq", "rnd-ne", "rnd-in", "rnd-like",
        "rnd-lt", "det-vs-other-det", "det-vs-plain", "function-of-column",
        "typed-literal", "typed-literal-in-list", "rnd-self-join",
    ],
)
def test_unsupported_operators_raise_when_built(keys: KeyManager, build: Callable[[Any], Any]) -> None:
    Person, _ = make_models(keys)
    with pytest.raises(UnsupportedQueryError) as info:
        build(Person)
    assert info.value.table == "people" and info.value.column in ("det", "rnd")
    assert f"people.{info.value.column}" in str(info.value)


def test_misleading_statements_raise_when_executed(engine: Engine, people: tuple[type, list[Any]]) -> None:
    Person, _ = people
    misleading = [
        select(Person).order_by(Person.det),
        select(Person.id).order_by(Person.rnd),
        select(Person.id).where(Person.id < 3).union(select(Person.id)).order_by(Person.rnd),
        select(func.max(Person.det)),
        select(func.min(Person.rnd).label("m")),
        select(func.sum(Person.det)),
        select(Person.id, func.avg(Person.rnd)),
        select(Person.rnd, func.count()).group_by(Person.rnd),
    ]
    with Session(engine) as session:
        for stmt in misleading:
            with pytest.raises(UnsupportedQueryError, match="people"):
                session.execute(stmt)
        with engine.connect() as conn:  # Core connections too
            with pytest.raises(UnsupportedQueryError, match="ORDER BY"):
                conn.execute(select(Person.__table__).order_by(Person.__table__.c.det))
        # ordering by plaintext columns, and selecting encrypted ones, is fine
        assert len(session.execute(select(Person.det).order_by(Person.id)).all()) == 300


def test_deterministic_key_is_separate_from_the_table_key(engine: Engine, keys: KeyManager, people: tuple[type, list[Any]]) -> None:
    """Retiring the table key (roll-over) leaves the deterministic key, and so
    equality queries, untouched; new randomised values use a new table key."""
    Person, values = people
    t = keys.table
    with engine.begin() as conn:
        scopes = sorted(conn.execute(select(t.c.scope).where(t.c.owner_table == "people")).scalars())
        assert scopes == ["deterministic", "table"]
        conn.execute(update(t).where(t.c.owner_table == "people", t.c.scope == "table").values(status="retired"))
    keys.clear_cache()
    with Session(engine) as session:
        session.add(Person(id=1000, plain="abc", det="abc", det2="abc", rnd="abc"))
        session.commit()
        expected = sorted([i for i, v in enumerate(values) if v == "abc"] + [1000])
        assert _ids(session, Person, Person.det == "abc") == expected
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.scope, t.c.status).where(t.c.owner_table == "people")).all()
    assert sorted(rows) == [("deterministic", "active"), ("table", "active"), ("table", "retired")]


@pytest.mark.backends("postgresql", "mysql")
def test_concurrent_first_writers_never_split_the_deterministic_key(
    engine: Engine, keys: KeyManager, models: tuple[type, type]
) -> None:
    """Two transactions write the first rows of a table at once. The second's
    key insert collides with the first's and waits for it; it then adopts the
    first's committed key (or, on an error, fails loudly); never do two
    deterministic keys both commit, which would make equal values stop
    comparing equal."""
    Person, _ = models
    outcome: dict[str, Any] = {}

    def second_writer() -> None:
        with Session(engine) as session:
            session.add(Person(id=2, plain="same", det="same"))
            try:
                session.commit()
                outcome["b"] = "committed"
            except EnvelopeError as exc:
                outcome["b"] = exc

    with Session(engine) as first:
        first.add(Person(id=1, plain="same", det="same"))
        first.flush()  # the deterministic key row exists, uncommitted
        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join(timeout=1.0)  # let the second writer reach the key table
        first.commit()
    thread.join(timeout=60)
    assert not thread.is_alive()
    t = keys.table
    with engine.connect() as conn:
        det_keys = conn.execute(
            select(t.c.id).where(t.c.owner_table == "people", t.c.scope == "deterministic")
        ).all()
    assert len(det_keys) == 1
    with Session(engine) as session:
        expected = [1, 2] if outcome["b"] == "committed" else [1]
        assert _ids(session, Person, Person.det == "same") == expected


def test_a_rolled_back_first_key_is_replaced_not_reused(engine: Engine, keys: KeyManager, models: tuple[type, type]) -> None:
    """The first deterministic key has a fixed id; if its transaction rolls
    back, the next writer makes it again, and every process agrees on it."""
    Person, _ = models
    with Session(engine) as session:
        session.add(Person(id=1, plain="v", det="v"))
        session.flush()
        session.rollback()
        session.add(Person(id=2, plain="v", det="v"))
        session.commit()
        assert _ids(session, Person, Person.det == "v") == [2]
    fresh = KeyManager(engine, keys.provider)  # another process: reads the stored key
    Fresh, _ = make_models(fresh)
    assert fresh.warm([Fresh.__table__]) == 1  # sync warming, by Table object
    with Session(engine) as session:
        assert _ids(session, Fresh, Fresh.det == "v") == [2]
        assert session.get(Fresh, 2).det == "v"
    assert fresh.stats()["provider_calls"] == 1  # only the warm-up unwrapped


def test_fixed_size_deterministic_columns_are_indexable(engine: Engine, keys: KeyManager) -> None:
    """Ints, UUIDs and dates get a bounded VARBINARY on MariaDB, so a unique
    deterministic column of those types works there too."""
    Base = new_base()

    class Ticket(Base):
        __tablename__ = "tickets"
        id: Mapped[int] = mapped_column(primary_key=True)
        ref: Mapped[uuid.UUID] = mapped_column(EncryptedType(Uuid, keys, deterministic=True), unique=True)
        seat: Mapped[int] = mapped_column(EncryptedType(Integer, keys, deterministic=True), index=True)
        day: Mapped[dt.date] = mapped_column(EncryptedType(Date, keys, deterministic=True), index=True)

    Base.metadata.create_all(engine)
    refs = [uuid.uuid4() for _ in range(5)]
    with Session(engine) as session:
        session.add_all(Ticket(ref=r, seat=-(2**63) + n, day=dt.date(2026, 1, 1 + n % 2)) for n, r in enumerate(refs))
        session.commit()
        assert session.scalars(select(Ticket.id).where(Ticket.ref == refs[3])).one() == 4
        assert session.scalars(select(Ticket.id).where(Ticket.seat == -(2**63) + 1)).one() == 2
        assert sorted(session.scalars(select(Ticket.id).where(Ticket.day == dt.date(2026, 1, 2)))) == [2, 4]
        session.add(Ticket(ref=refs[0], seat=0, day=dt.date(2026, 1, 1)))
        with pytest.raises(IntegrityError):
            session.commit()

"""Search benchmark: prefix, substring and range lookups on encrypted columns
against the same queries on a plaintext twin; the write cost of a substring
index; the stored index size per row.

Not a test. Run ``python -m benchmarks.search [--rows 100000] [--backends sqlite,postgresql,mysql]``.
Each backend gets a database of its own (``sae_search_bench_<pid>``, dropped
afterwards; SQLite: a temporary file). Keys come from a LocalKeyProvider (no
KMS call is on a lookup's path once the key is cached). Both sides load ORM
objects: ``lookup()`` (token query, decryption, re-check) against
``session.scalars(select(Twin).where(...))``. On PostgreSQL the twin's text
columns have ``pg_trgm`` GIN indexes (if the extension is installed) and its
date a B-tree; on MariaDB and SQLite the twin's ``LIKE '%x%'`` is a full scan.
On PostgreSQL the same lookups are then timed during a blind-index
rotation, with 2 and then 3 live keys (``--no-rotation`` skips it): an array
lookup asks "every token" once per live key (``search/keyring.py``'s
slots, ORed ``@>`` probes), so its cost grows with the keys a rotation
keeps live; ratios are against the single-key lookup and the twin of the
same run. The rows stay under the first key (the rebuild is not run), so
every slot's probe is made and the answers stay the twin's.
Results go to ``benchmarks/results/search-<time>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Date, Integer, String, create_engine, func, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sa_envelope import (
    EncryptedType,
    KeyManager,
    LivePolicy,
    LocalKeyProvider,
    PrefixIndex,
    RangeIndex,
    SubstringIndex,
    lookup,
)

DB = f"sae_search_bench_{os.getpid()}"  # one per run: two runs on one server do not drop each other's
SERVERS = {
    "postgresql": ("postgresql+psycopg://postgres@127.0.0.1:5432/", "postgres"),
    "mysql": ("mysql+pymysql://root@127.0.0.1:3306/", ""),
}
RESULTS = Path(__file__).resolve().parent / "results"
NEEDLES = 15
KINDS = ("prefix", "substring", "range")
ROTATING = LivePolicy(ttl=0.1, grace=3600.0)  # rotated keys stay live for the whole run


def _words(rng: random.Random, count: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ber", "dan", "gor", "hil", "pen", "cil", "lin", "qu"]
    return sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(count)})


class Corpus:
    """Generated names (first + last), notes of ~60 characters and dates."""

    def __init__(self, rows: int, seed: int = 3) -> None:
        rng = random.Random(seed)
        self.first = [w.capitalize() for w in _words(rng, 400)][:200]
        self.last = [w.capitalize() for w in _words(rng, 3000)]
        self.vocab = _words(rng, 2500)
        self.rows = [
            {
                "id": i + 1,
                "name": f"{rng.choice(self.first)} {rng.choice(self.last)}",
                "notes": " ".join(rng.choice(self.vocab) for _ in range(8))[:60],
                "born": dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(120 * 365)),
            }
            for i in range(rows)
        ]
        self.rng = rng

    def prefixes(self) -> list[str]:
        return [self.rng.choice(self.first)[: self.rng.randint(3, 5)] for _ in range(NEEDLES)]

    def substrings(self) -> list[str]:
        return [w for w in (self.rng.choice(self.vocab) for _ in range(NEEDLES * 3)) if len(w) >= 6][:NEEDLES]

    def ranges(self) -> list[tuple[dt.date, dt.date]]:
        starts = [dt.date(1900, 1, 1) + dt.timedelta(days=self.rng.randrange(118 * 365)) for _ in range(NEEDLES)]
        return [(s, s + dt.timedelta(days=438)) for s in starts]  # ~1% of 120 years


def models(keys: KeyManager, notes_length: int = 200) -> tuple[Any, Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Patient(Base):
        __tablename__ = "bench_search_patients"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        notes: Mapped[str] = mapped_column(EncryptedType(String(notes_length), keys))
        born: Mapped[dt.date] = mapped_column(EncryptedType(Date, keys))
        __table_args__ = (
            PrefixIndex("name", keys, max_length=8),
            SubstringIndex("notes", keys, n=3),
            RangeIndex("born", keys, granularities=("year", "month", "day")),
        )

    class Twin(Base):
        __tablename__ = "bench_search_twin"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(100))
        notes: Mapped[str] = mapped_column(String(notes_length))
        born: Mapped[dt.date] = mapped_column(Date, index=True)

    class Plain(Base):  # encrypted, no search index: the write-cost baseline
        __tablename__ = "bench_search_plain"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        notes: Mapped[str] = mapped_column(EncryptedType(String(notes_length), keys))

    class Indexed(Base):  # the same with a substring index
        __tablename__ = "bench_search_indexed"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        notes: Mapped[str] = mapped_column(EncryptedType(String(notes_length), keys))
        __table_args__ = (SubstringIndex("notes", keys, n=3),)

    class Deferred(Base):  # PostgreSQL: a GIN pending list large enough to defer merges to (auto)vacuum
        __tablename__ = "bench_search_deferred"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        notes: Mapped[str] = mapped_column(EncryptedType(String(notes_length), keys))
        __table_args__ = (SubstringIndex("notes", keys, n=3, gin_with={"gin_pending_list_limit": 65536}),)

    return Patient, Twin, (Plain, Indexed, Deferred)


def _paired_ms(
    ours: Callable[[Any], Any], theirs: Callable[[Any], Any], needles: list[Any], repeats: int = 3
) -> tuple[float, float]:
    """The median times of ``ours`` and ``theirs`` over ``repeats`` passes of
    the needles, after one untimed pass (plans, caches), the two timed
    alternately needle by needle: on a shared machine whose load drifts,
    both sides of a ratio see the same load (timing all of one, then all of
    the other, moved ratios by 30-50% between runs)."""
    for needle in needles:
        ours(needle)
        theirs(needle)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for needle in needles:
            for side, run in zip(times, (ours, theirs)):
                start = time.perf_counter()
                run(needle)
                side.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def _trigram_indexes(engine: Engine) -> str:
    with engine.begin() as conn:
        available = conn.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")).first()
        if available is None:
            return "pg_trgm not installed on this server: the twin's LIKE is a plain scan"
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
        for column in ("name", "notes"):
            conn.execute(
                text(f"CREATE INDEX bench_twin_{column}_trgm ON bench_search_twin USING gin ({column} gin_trgm_ops)")
            )
        conn.execute(text("ANALYZE"))
    return "pg_trgm GIN indexes on the twin's name and notes"


def _token_columns(table: Any) -> list[Any]:
    return [c for c in table.c if c.name.endswith("_tokens")]


def _stored(engine: Engine, keys: KeyManager, patient: Any) -> tuple[int, int | None]:
    """(tokens stored, bytes they take with their indexes) for every index of ``patient``."""
    columns = _token_columns(patient.__table__)
    with engine.connect() as conn:
        if columns:  # PostgreSQL arrays: the columns' bytes and their GIN indexes
            count = conn.execute(select(func.sum(sum(func.coalesce(func.cardinality(c), 0) for c in columns)))).scalar()
            heap = conn.execute(
                select(func.sum(sum(func.coalesce(func.pg_column_size(c), 0) for c in columns)))
            ).scalar()
            gin = sum(
                int(conn.execute(text(f"SELECT pg_relation_size('ix_{patient.__tablename__}_{c.name}')")).scalar() or 0)
                for c in columns
            )
            return int(count or 0), int(heap or 0) + gin
        tokens = keys.search_table
        total = conn.execute(select(func.count()).select_from(tokens)).scalar() or 0
        mine = conn.execute(select(func.count()).where(tokens.c.owner == patient.__tablename__)).scalar() or 0
        size = _table_bytes(conn, tokens.name)  # shared by every table: this one's share
        return int(mine), (round(size * mine / total) if size and total else None)


def _table_bytes(conn: Any, table: str) -> int | None:
    if conn.dialect.name in ("mysql", "mariadb"):
        conn.execute(text(f"ANALYZE TABLE {table}"))
        row = conn.execute(
            text(
                "SELECT data_length + index_length FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name = :t"
            ),
            {"t": table},
        ).scalar()
        return int(row or 0)
    try:
        query = f"SELECT sum(pgsize) FROM dbstat WHERE name LIKE '{table}%' OR name LIKE 'ix_{table}%'"
        return int(conn.execute(text(query)).scalar() or 0)
    except Exception:  # noqa: BLE001  (dbstat not compiled in)
        return None


def _write_cost(
    engine: Engine, keys: KeyManager, plain: Any, indexed: Any, deferred: Any, corpus: Corpus, rows: int = 2000
) -> dict[str, float]:
    rng = random.Random(5)
    data = [{"id": i + 1, "notes": " ".join(rng.choice(corpus.vocab) for _ in range(40))[:200]} for i in range(rows)]
    out: dict[str, float] = {}
    models = [("without", plain), ("with", indexed)]
    if _token_columns(deferred.__table__):
        models.append(("with_deferred", deferred))
    for label, model in models:
        times = []
        for _ in range(5):
            with engine.begin() as conn:
                conn.execute(model.__table__.delete())
            start = time.perf_counter()
            with engine.begin() as conn:
                conn.execute(insert(model.__table__), data)
            times.append(time.perf_counter() - start)
        out[f"insert_{label}_index_rows_per_s"] = rows / statistics.median(times)
    out["insert_ratio"] = out["insert_without_index_rows_per_s"] / out["insert_with_index_rows_per_s"]
    if "insert_with_deferred_index_rows_per_s" in out:
        out["insert_deferred_ratio"] = (
            out["insert_without_index_rows_per_s"] / out["insert_with_deferred_index_rows_per_s"]
        )
    tokens, size = _stored(engine, keys, indexed)
    out["substring_200_tokens_per_row"] = tokens / rows
    out["substring_200_bytes_per_row"] = (size or 0) / rows
    return out


def _lookups(session: Session, Patient: Any, Twin: Any, corpus: Corpus) -> list[tuple[str, list[Any], Any, Any]]:
    """(kind, needles, our lookup, the twin's criterion) per lookup kind; the needles drawn once."""
    return [
        ("prefix", corpus.prefixes(), lambda n: lookup(session, Patient.name, startswith=n), Twin.name.startswith),
        ("substring", corpus.substrings(), lambda n: lookup(session, Patient.notes, contains=n), Twin.notes.contains),
        ("range", corpus.ranges(), lambda n: lookup(session, Patient.born, between=n), lambda n: Twin.born.between(*n)),
    ]


def _time_lookups(session: Session, Twin: Any, kinds: Any, result: dict[str, Any], suffix: str = "") -> None:
    """Each kind's median lookup time (and the twin's, once), answers checked against the twin's."""
    for kind, needles, ours, theirs in kinds:
        hits = [len(ours(n)) for n in needles]
        assert hits == [len(session.scalars(select(Twin).where(theirs(n))).all()) for n in needles]
        # the twin again in each phase: ratios taken side by side
        mine, twin = _paired_ms(ours, lambda n: session.scalars(select(Twin).where(theirs(n))).all(), needles)
        result[f"{kind}_ms{suffix}"] = round(mine, 2)
        result[f"{kind}_median_hits"] = statistics.median(hits)
        result[f"{kind}_twin_ms{suffix}"] = round(twin, 2)
        result[f"{kind}_ratio{suffix}"] = round(result[f"{kind}_ms{suffix}"] / result[f"{kind}_twin_ms{suffix}"], 2)
        session.expunge_all()


def _during_rotation(session: Session, keys: KeyManager, Patient: Any, Twin: Any, kinds: Any, result: dict) -> None:
    """The lookups again with 2, then 3 live blind-index keys (PostgreSQL arrays: one slot per key)."""
    owner = Patient.__tablename__
    for live in (2, 3):
        keys.rotate_table_key(owner, scope="blind-index")
        keys.live.invalidate()
        assert len(keys.live.keys(owner, "blind-index")) == live
        _time_lookups(session, Twin, kinds, result, suffix=f"_{live}keys")
        for kind in KINDS:
            result[f"{kind}_vs_1key_{live}keys"] = round(result[f"{kind}_ms_{live}keys"] / result[f"{kind}_ms"], 2)


def run_backend(name: str, url: str, rows: int, rotation: bool = True) -> dict[str, Any]:
    engine = create_engine(url)
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)), table_name="bench_sa_envelope_keys", live=ROTATING)
    keys.create_table()
    Patient, Twin, (Plain, Indexed, Deferred) = models(keys)
    Patient.metadata.create_all(engine)
    corpus = Corpus(rows)
    result: dict[str, Any] = {"backend": name, "rows": rows, "load_average_start": os.getloadavg()}
    start = time.perf_counter()
    for chunk in range(0, rows, 5000):
        with engine.begin() as conn:
            conn.execute(insert(Patient.__table__), corpus.rows[chunk : chunk + 5000])
            conn.execute(insert(Twin.__table__), corpus.rows[chunk : chunk + 5000])
    result["load_seconds"] = round(time.perf_counter() - start, 1)
    result["twin_indexes"] = _trigram_indexes(engine) if name == "postgresql" else "B-tree on born only (LIKE scans)"
    result["storage"] = "BIGINT[] + GIN" if _token_columns(Patient.__table__) else "token table"
    if name == "postgresql":  # both tables vacuumed: GIN pending lists merged, visibility maps set
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE" if name == "sqlite" else f"ANALYZE TABLE {keys.search_table.name}"))
    tokens, size = _stored(engine, keys, Patient)
    result["tokens_per_row"] = round(tokens / rows, 1)
    result["index_bytes_per_row"] = round(size / rows) if size else None
    with Session(engine) as session:
        kinds = _lookups(session, Patient, Twin, corpus)
        _time_lookups(session, Twin, kinds, result)
        if rotation and _token_columns(Patient.__table__):
            _during_rotation(session, keys, Patient, Twin, kinds, result)
    result["load_average_after_lookups"] = os.getloadavg()
    result.update({k: round(v, 2) for k, v in _write_cost(engine, keys, Plain, Indexed, Deferred, corpus).items()})
    engine.dispose()
    return result


def _url(name: str, tmp: str) -> tuple[str, Callable[[], None]]:
    if name == "sqlite":
        return f"sqlite:///{tmp}/search.db", lambda: None
    base, admin_db = SERVERS[name]
    admin = create_engine(base + admin_db, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {DB}"))
        conn.execute(text(f"CREATE DATABASE {DB}"))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {DB}"))
        admin.dispose()

    return base + DB + ("?charset=utf8mb4" if name == "mysql" else ""), drop


def _markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| backend | kind | lookup ms | twin ms | ratio | median hits |", "|---|---|---|---|---|---|"]
    for r in results:
        for kind in KINDS:
            lines.append(
                f"| {r['backend']} | {kind} | {r[kind + '_ms']} | {r[kind + '_twin_ms']} | {r[kind + '_ratio']} | {r[kind + '_median_hits']} |"
            )
    rotating = [r for r in results if "prefix_ms_2keys" in r]
    if rotating:
        lines += [
            "",
            "During a blind-index rotation (array storage: one `@>` probe per live key, ORed; range: one `&&`):",
            "",
            "| backend | kind | 1 key ms | 2 keys ms | 3 keys ms | 2 keys / 1 key | 3 keys / 1 key | 1 key / twin | 2 keys / twin | 3 keys / twin | twin ms (1, 2, 3 keys phases) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rotating:
            for kind in KINDS:
                lines.append(
                    f"| {r['backend']} | {kind} | {r[kind + '_ms']} | {r[kind + '_ms_2keys']} | {r[kind + '_ms_3keys']} | "
                    f"{r[kind + '_vs_1key_2keys']} | {r[kind + '_vs_1key_3keys']} | {r[kind + '_ratio']} | "
                    f"{r[kind + '_ratio_2keys']} | {r[kind + '_ratio_3keys']} | "
                    f"{r[kind + '_twin_ms']}, {r[kind + '_twin_ms_2keys']}, {r[kind + '_twin_ms_3keys']} |"
                )
    lines += [
        "",
        "| backend | rows | storage | tokens/row | index bytes/row | insert rows/s without | with substring index (200 chars) | ratio | ratio, GIN pending list 64 MB | its tokens/row | its bytes/row | twin |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['rows']} | {r['storage']} | {r['tokens_per_row']} | {r['index_bytes_per_row']} | "
            f"{r['insert_without_index_rows_per_s']} | {r['insert_with_index_rows_per_s']} | {r['insert_ratio']} | {r.get('insert_deferred_ratio', '-')} | "
            f"{round(r['substring_200_tokens_per_row'], 1)} | {round(r['substring_200_bytes_per_row'])} | {r['twin_indexes']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--backends", default="sqlite,postgresql,mysql")
    parser.add_argument(
        "--no-rotation", dest="rotation", action="store_false", help="skip the lookups during a rotation"
    )
    parser.add_argument("--label", default="", help="added to the result files' names (search-<time>-LABEL)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends.split(","):
            url, drop = _url(name, tmp)
            try:
                results.append(run_backend(name, url, args.rows, args.rotation))
                print(json.dumps(results[-1]), flush=True)
            finally:
                drop()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + (f"-{args.label}" if args.label else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"search-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"search-{stamp}.md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()

"""Row scope against table scope: insert and select of N rows (issue 3 target: within 1.5x).

    python benchmarks/row_scope.py postgresql+psycopg://postgres@127.0.0.1:5432/test_rows [N]

Uses a local master key (no network), a fresh KeyManager for each select so
that keys are loaded from the key table as in a new process, and the best of
three runs of each measurement.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from sqlalchemy import JSON, MetaData, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider

PROVIDER = LocalKeyProvider(b"\x01" * 32)


def model(keys: KeyManager, scope: str) -> Any:
    class Base(DeclarativeBase):
        metadata = MetaData()

    class Person(Base):
        __tablename__ = f"bench_{scope}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys, scope=scope))
        notes: Mapped[dict] = mapped_column(EncryptedType(JSON, keys, scope=scope))

    return Person


def timed(fn: Any) -> tuple[float, float]:
    """Wall and process CPU seconds of ``fn()`` (CPU time shrugs off a busy machine)."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def one_round(engine: Any, scope: str, n: int) -> dict[str, tuple[float, float]]:
    keys = KeyManager(engine, PROVIDER)
    P = model(keys, scope)
    with engine.begin() as conn:
        conn.execute(P.__table__.delete())

    def insert() -> None:
        with Session(engine) as s:
            s.add_all([P(name=f"person {i}", notes={"i": i, "x": "y" * 20}) for i in range(n)])
            s.commit()

    R = model(KeyManager(engine, PROVIDER), scope)  # a fresh reader: keys come from the table

    def read() -> None:
        with Session(engine) as s:
            rows = s.scalars(select(R)).all()
            assert len(rows) == n and rows[0].notes is not None

    # a new process reads (keys loaded from the table), then reads again (keys cached)
    return {"insert": timed(insert), "select": timed(read), "select again": timed(read)}


def run(url: str, n: int, rounds: int = 5) -> None:
    engine = create_engine(url)
    setup = KeyManager(engine, PROVIDER)
    setup.table.drop(engine, checkfirst=True)
    setup.create_table()
    models = {scope: model(setup, scope) for scope in ("table", "row")}
    for m in models.values():
        m.metadata.drop_all(engine)
        m.metadata.create_all(engine)
    best: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):  # interleaved, so a burst of load hits both scopes
        for scope in models:
            for op, (wall, cpu) in one_round(engine, scope, n).items():
                b = best.setdefault((scope, op), [float("inf"), float("inf")])
                b[0], b[1] = min(b[0], wall), min(b[1], cpu)
    for op in ("insert", "select", "select again"):
        (tw, tc), (rw, rc) = best[("table", op)], best[("row", op)]
        print(f"{op:12s} {n} rows, best of {rounds}: wall table {tw:.3f}s row {rw:.3f}s ratio {rw / tw:.2f}x"
              f" | client CPU table {tc:.3f}s row {rc:.3f}s ratio {rc / tc:.2f}x")
    for m in models.values():
        m.metadata.drop_all(engine)
    engine.dispose()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20_000)

"""Proves the shared fixtures themselves, so a failure elsewhere is about the package."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, Integer, MetaData, Table, inspect, text
from sqlalchemy.engine import Engine


def test_db_url_answers_select_1(engine: Engine, db_url: str) -> None:
    assert engine.url.render_as_string(hide_password=False) == db_url
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


@pytest.mark.backends("sqlite")
def test_sqlite_is_a_file(db_url: str) -> None:
    assert db_url.startswith("sqlite:///") and db_url.endswith("/test.db")


@pytest.mark.backends("postgresql", "mysql")
@pytest.mark.parametrize("round_", [1, 2])
def test_server_database_starts_empty(engine: Engine, round_: int) -> None:
    """Each round creates linked tables; the second would fail on leftovers."""
    assert inspect(engine).get_table_names() == []
    meta = MetaData()
    Table("parent", meta, Column("id", Integer, primary_key=True))
    Table("child", meta, Column("id", Integer, primary_key=True),
          Column("parent_id", ForeignKey("parent.id")))
    meta.create_all(engine)
    assert set(inspect(engine).get_table_names()) == {"parent", "child"}


def test_backends_marker_restricts(request: pytest.FixtureRequest) -> None:
    backends = {item.callspec.params["db_url"] for item in request.session.items  # type: ignore[attr-defined]
                if item.originalname == "test_server_database_starts_empty"}  # type: ignore[attr-defined]
    assert backends == {"postgresql", "mysql"}

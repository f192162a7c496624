"""A migrating column's comparisons read both halves; declarations that cannot migrate are refused."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select

from sa_envelope import ConfigurationError, EncryptedType, KeyManager, LocalKeyProvider, UnsupportedQueryError


def _users(keys: Any, **options: Any) -> Table:
    return Table(
        "users", MetaData(),
        Column("id", Integer, primary_key=True),
        Column("email__encrypted", EncryptedType(String(200), keys, deterministic=True, migrating_from="email")),
        Column("email", String(200)),
        Column("code", EncryptedType(String(9), keys, migrating_to="code__plaintext", **options)),
        Column("code__plaintext", String(9)),
    )


def _where(expr: Any) -> str:
    return re.sub(r"\s+", " ", str(select(1).where(expr)).split("WHERE", 1)[1]).strip()


@pytest.fixture
def users() -> Table:
    return _users(KeyManager(create_engine("sqlite://"), LocalKeyProvider(b"k" * 32)))  # never connects


def test_equality_reads_the_encrypted_half_then_the_plaintext(users: Table) -> None:
    enc = users.c.email__encrypted
    assert _where(enc == "a") == (
        "users.email__encrypted IS NOT NULL AND users.email__encrypted IN (__[POSTCOMPILE_param_1]) "
        "OR users.email__encrypted IS NULL AND users.email = :email_1"
    )  # the encrypted half: one ciphertext per live key (livematch); each half only where it holds the value
    assert _where(enc.in_(["a", "b"])).startswith(
        "users.email__encrypted IS NOT NULL AND users.email__encrypted IN (__[POSTCOMPILE_param_1]) OR"
    )
    assert _where(enc != "a").endswith("users.email__encrypted IS NULL AND users.email != :email_1")
    assert _where(enc.is_(None)) == "users.email__encrypted IS NULL AND users.email IS NULL"
    assert _where(enc == None) == _where(enc.is_(None))  # noqa: E711
    assert _where(enc.is_not(None)) == "users.email__encrypted IS NOT NULL OR users.email IS NOT NULL"
    with pytest.raises(UnsupportedQueryError, match="cannot cover both halves"):
        enc == users.alias("u2").c.email__encrypted  # noqa: B015


def test_values_are_bound_to_the_name_after_the_contract(users: Table) -> None:
    assert users.c.email__encrypted.type.bound_context == "users.email"
    assert users.c.code.type.bound_context == "users.code"  # decrypting: the encrypted column keeps its name


def test_decrypting_reads_the_plaintext_shadow_first(users: Table) -> None:
    assert _where(users.c.code.is_(None)) == "users.code__plaintext IS NULL AND users.code IS NULL"
    with pytest.raises(UnsupportedQueryError, match="randomised"):  # as before the migration
        users.c.code == "x"  # noqa: B015


def test_declarations_that_cannot_migrate() -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        EncryptedType(String(5), migrating_from="a", migrating_to="b")
    EncryptedType(String(5), scope="row", migrating_from="a")  # row scope migrates too (the backfill makes row keys)
    with pytest.raises(ConfigurationError, match="another column"):
        Table("t", MetaData(), Column("a", EncryptedType(String(5), migrating_from="a")))


def test_selects_merge_the_halves_where_the_twin_reads_back_exactly(users: Table) -> None:
    from sqlalchemy import LargeBinary
    from sqlalchemy.dialects import postgresql

    sql = str(select(users.c.email__encrypted).compile(dialect=postgresql.dialect()))
    assert "coalesce(users.email__encrypted, convert_to(NULLIF(CAST(json_build_array(users.email)" in sql
    assert "coalesce(convert_to(NULLIF(CAST(json_build_array(users.code__plaintext)" in str(
        select(users.c.code).compile(dialect=postgresql.dialect())
    )  # decrypting: the plaintext shadow first
    assert "WHERE users.id" in str(select(users.c.id).where(users.c.id == 1))  # WHERE is left alone
    blobs = Table(
        "blobs", MetaData(),
        Column("id", Integer, primary_key=True),
        Column("b__encrypted", EncryptedType(LargeBinary, migrating_from="b")),
        Column("b", LargeBinary),
    )  # fmt: skip
    assert str(select(blobs.c.b__encrypted)).startswith("SELECT blobs.b__encrypted")  # bytes: merged by the ORM only


def test_copies_and_pickles_of_the_metadata_keep_what_they_can_hold() -> None:
    """``Table.info`` holds nothing of ours (Alembic renders it into
    migrations with ``repr``); ``to_metadata`` copies keep the pairs (the
    copied types register them); a pickled MetaData holds no KeyManager, so
    no key material, only a token by which its types find the manager again
    in this process (tests/integration/test_copied_metadata.py: elsewhere)."""
    import pickle

    from sa_envelope.columns.migrating import pairs_of

    master = b"m" * 32
    keys = KeyManager(create_engine("sqlite://"), LocalKeyProvider(master))
    users = _users(keys)
    assert users.info == {}
    copy = users.to_metadata(MetaData())
    assert copy.info == {} and set(pairs_of(copy)) == {"email__encrypted", "code"}
    assert pairs_of(copy)["code"].plaintext == "code__plaintext"
    assert "email__encrypted" in _where(copy.c.email__encrypted == "a") and "users.email =" in _where(
        copy.c.email__encrypted == "a"
    )
    data = pickle.dumps(users.metadata)
    assert master not in data
    restored = pickle.loads(data).tables["users"]
    assert restored.c.code.type.keys is keys and restored.c.code.type.bound_context == "users.code"
    assert restored.c.code.type.max_stored_length() == users.c.code.type.max_stored_length()  # codec chosen again

"""Which TypeDecorator inner types EncryptedType accepts (no database)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import ARRAY, Integer, PickleType, String
from sqlalchemy.types import TypeDecorator

from sa_envelope import ConfigurationError, EncryptedType
from sa_envelope.envelope.codecs import codec_for


class Alias(TypeDecorator[str]):
    impl = String(20)
    cache_ok = True


class OverArray(TypeDecorator[Any]):
    impl = ARRAY(Integer)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return value


def test_a_plain_alias_uses_its_impls_codec_unchanged() -> None:
    assert codec_for(Alias()).name == "str"


@pytest.mark.parametrize("inner", [PickleType(), OverArray()], ids=["pickle", "decorator-over-array"])
def test_unsupported_decorators_are_configuration_errors_in_one_line(inner: Any) -> None:
    with pytest.raises(ConfigurationError) as err:
        EncryptedType(inner)
    assert "\n" not in str(err.value)
    assert type(inner).__name__ in str(err.value) or "ARRAY" in str(err.value)


def test_a_decorator_over_a_deterministic_string_keeps_a_bounded_storage_length() -> None:
    assert EncryptedType(Alias(), deterministic=True).max_stored_length() == EncryptedType(
        String(20), deterministic=True
    ).max_stored_length()

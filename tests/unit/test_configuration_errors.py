"""Configuration mistakes are ConfigurationError, with one line saying what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from sa_envelope import AwsKmsProvider, ConfigurationError, LocalKeyProvider


@pytest.mark.parametrize("path", ["", "."])
def test_key_file_that_cannot_be_one_is_a_configuration_error(path: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="32-byte key file"):
        LocalKeyProvider.from_file(path or "")
    with pytest.raises(ConfigurationError, match="directory"):
        LocalKeyProvider.from_file(tmp_path)


def test_empty_cmk_id_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="CMK"):
        AwsKmsProvider("")

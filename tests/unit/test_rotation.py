"""Table-key roll-over policy: its limits are validated (no database)."""

from __future__ import annotations

import pytest

from sa_envelope import RolloverPolicy


def test_rollover_policy_validates() -> None:
    with pytest.raises(ValueError):
        RolloverPolicy(max_encryptions=0)
    with pytest.raises(ValueError):
        RolloverPolicy(max_age=-1)

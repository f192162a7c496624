"""Row keys: per-row data keys wrapped locally by their table key.

Placeholder until the row-scope issue lands; the key manager calls
:func:`unwrap_row_key` for any key that has a parent.
"""

from __future__ import annotations

from typing import Any

from ._errors import KeyNotFoundError

__all__ = ["unwrap_row_key"]


def unwrap_row_key(parent: Any, record: Any, *, table: str, column: str | None) -> bytes:
    raise KeyNotFoundError(table=table, column=column, reason="row keys are not supported yet")

"""Everything the CLI prints goes through :func:`say`.

The key table is untrusted input (docs/threat-model.md): whoever can write
to the database can put terminal escape sequences in ``owner_table`` or
``wrapping_key_id`` and have them run in the operator's terminal. So each
character that is not printable (controls, escapes, bidi overrides, line
and paragraph separators) is shown as a Python escape (``\\x1b``,
``\\u202e``) instead; printable text, accents included, is unchanged.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["escape", "say"]


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(value: Any) -> str:
    """``str(value)`` with every non-printable character escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def say(text: Any = "", file: TextIO | None = None) -> None:
    """Print one line (a line break inside ``text`` is kept as a line break)."""
    lines = str(text).split("\n")
    print("\n".join(escape(line) for line in lines), file=file if file is not None else sys.stdout)

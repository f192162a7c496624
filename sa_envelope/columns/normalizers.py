"""Normalisers for blind indexes: which spellings of a value match.

A blind index stores a keyed digest of ``normalizer(value)``; two values
match exactly when they normalise alike. Each normaliser says what it folds.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_email", "normalize_phone"]


def normalize_email(value: str) -> str:
    """Unicode NFKC, surrounding spaces removed, case folded."""
    return unicodedata.normalize("NFKC", value).strip().casefold()


_NON_DIGITS = re.compile(r"[^0-9]")


def normalize_phone(value: str) -> str:
    """Digits only, keeping a leading ``+`` (``"+1 (555) 010-0000"`` ->
    ``"+15550100000"``). It does not add country codes: normalise those
    before storing if ``0555...`` and ``+44555...`` must match."""
    text = unicodedata.normalize("NFKC", value).strip()
    digits = _NON_DIGITS.sub("", text)
    return "+" + digits if text.startswith("+") else digits

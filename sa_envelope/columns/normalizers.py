"""Normalisers for blind indexes: which spellings of a value match.

A blind index stores a keyed digest of ``normalizer(value)``; two values
match exactly when they normalise alike. A normaliser that folds too much
makes two different people's values match (``lookup()`` would return
someone else's row as an exact match), so the defaults fold only what is
the same value by every standard, and each normaliser says what it folds.

A value that normalises to nothing (``""``, only spaces, no digits) is
refused with :class:`~sa_envelope.EncryptionError`: every such value would
otherwise match every other.
"""

from __future__ import annotations

import string
import unicodedata

from ..errors import EncryptionError

__all__ = ["normalize_email", "normalize_email_folded", "normalize_phone", "normalize_text_folded"]

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _not_empty(text: str, what: str) -> str:
    if not text:
        raise EncryptionError(f"the value normalises to an empty {what}: refused, it would match every other")
    return text


def normalize_email(value: str) -> str:
    """Surrounding whitespace removed, ASCII letters lower-cased; nothing else.

    ``Ada@Example.COM`` and ``ada@example.com`` match. Not folded, because
    they can be different mailboxes: ``straße`` and ``strasse`` (or
    ``STRASSE``), full-width letters (``ａｄａ``) and ``ada``, the Kelvin sign
    (U+212A) and ``K``, non-ASCII capitals and their small letters, composed
    and decomposed accents. Callers who want those to match ask for it with
    :func:`normalize_email_folded`.
    """
    return _not_empty(value.strip().translate(_ASCII_LOWER), "address")


def normalize_email_folded(value: str) -> str:
    """Opt-in Unicode folding: NFKC (full-width letters, the Kelvin sign,
    ligatures), surrounding whitespace removed, then full case folding
    (``ß`` -> ``ss``, ``É`` -> ``é``). ``straße@x`` matches ``STRASSE@x``:
    use it only where such spellings are known to reach the same mailbox."""
    return _not_empty(unicodedata.normalize("NFKC", value).strip().casefold(), "address")


_SEPARATORS = frozenset(" \t-.()/\u00a0\u2010\u2011\u2012\u2013\u2014")


def normalize_phone(value: str) -> str:
    """Digits only, keeping a leading ``+`` (``"+1 (555) 010-0000"`` ->
    ``"+15550100000"``).

    Digits of any script (Arabic-Indic ``٠١٢``, full-width ``０１２``, ...)
    are mapped to ASCII, never dropped; spaces, dashes, dots, slashes and
    parentheses are dropped; any other character (letters, ``#``, ``*``, a
    ``+`` after the start) is refused with :class:`EncryptionError`, so
    ``"555-0100 ext 12"`` does not silently match ``"55501001 2"``. It does
    not add country codes: normalise those before storing if ``0555...``
    and ``+44555...`` must match.
    """
    text = value.strip()
    plus = text.startswith("+")
    digits = []
    for char in text[1:] if plus else text:
        if char in _SEPARATORS:
            continue
        digit = unicodedata.decimal(char, None)
        if digit is None:
            raise EncryptionError("a phone number may hold only digits, separators and a leading +")
        digits.append(str(digit))
    return ("+" if plus else "") + _not_empty("".join(digits), "phone number")


def normalize_text_folded(value: str) -> str:
    """For search indexes over prose and names: NFKD, accents (combining
    marks) dropped, full case folding, NFC. ``Émile`` matches ``emile``,
    ``STRASSE`` matches ``straße``. May be empty: a search index stores no
    token for it, and a lookup refuses an empty needle."""
    decomposed = unicodedata.normalize("NFKD", value)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", bare.casefold())

"""Issue 12: the blind-index normalisers fold only what is the same value."""

from __future__ import annotations

import pytest

from sa_envelope import EncryptionError, normalize_email, normalize_email_folded, normalize_phone


def test_normalize_email_folds_ascii_case_and_spaces_only() -> None:
    assert normalize_email("  Ada@Example.COM\t") == "ada@example.com"
    different = [("straße@example.com", "strasse@example.com"), ("STRASSE@example.com", "straße@example.com"),
                 ("ａｄａ@example.com", "ada@example.com"), ("\u212aim@example.com", "kim@example.com"),
                 ("Édith@example.com", "édith@example.com"), ("e\u0301dith@example.com", "édith@example.com")]
    for a, b in different:
        assert normalize_email(a) != normalize_email(b), (a, b)


def test_unicode_folding_is_an_explicit_opt_in() -> None:
    assert normalize_email_folded("STRASSE@Example.com") == normalize_email_folded("straße@example.com")
    assert normalize_email_folded("ａｄａ@example.com") == "ada@example.com"
    assert normalize_email_folded("\u212aim@example.com") == "kim@example.com"


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_values_that_normalise_to_nothing_are_refused(value: str) -> None:
    for normalizer in (normalize_email, normalize_email_folded, normalize_phone):
        with pytest.raises(EncryptionError, match="empty"):
            normalizer(value)
    with pytest.raises(EncryptionError, match="empty"):
        normalize_phone("+ (-) ")


def test_non_ascii_digits_are_mapped_never_dropped() -> None:
    assert normalize_phone("+1 (555) 010-0000") == "+15550100000"
    assert normalize_phone("٠١٢٣٤٥٦٧٨٩") == "0123456789"  # Arabic-Indic
    assert normalize_phone("０５５５ ０１００") == "05550100"  # full-width
    assert normalize_phone("۵۵۵-۰۱۰۰") == "5550100"  # Extended Arabic-Indic
    for value in ("555-0100 ext 12", "+1 555 # 12", "1+555"):
        with pytest.raises(EncryptionError):
            normalize_phone(value)

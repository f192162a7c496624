"""Keep data keys and decrypted values out of DEBUG logs.

At DEBUG, botocore logs every request's parameters (``botocore.endpoint``:
"Making request for ... with params") and every response body
(``botocore.parsers``: "Response body"). For KMS that is the plaintext data
key of each ``GenerateDataKey`` and ``Decrypt`` answer, and the plaintext
sent to ``Encrypt``, base64 in JSON. An application that turns DEBUG on to
chase a bug would write its keys to its log files.

:func:`install` adds a filter to those two loggers that replaces the value
of every ``"Plaintext"`` field with ``<redacted>`` before any handler sees
the record. It touches only records that carry such a field, is installed
once per process, and is called when an :class:`AwsKmsProvider` is made.

SQLAlchemy, with ``echo="debug"`` or its engine logger at DEBUG, logs every
result row *after* type processing: the decrypted values. :func:`hide_rows`
replaces those records' rows with a count (``Row <5 values hidden by
sa-envelope>``) on the engine a KeyManager serves. Statements and their
parameters (ciphertext) are still logged; ``echo=True`` is unaffected.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

__all__ = ["PlaintextRedactor", "RowHider", "hide_rows", "install"]

LOGGERS = ("botocore.endpoint", "botocore.parsers")
_FIELD = re.compile(r"""(["']Plaintext["']\s*:\s*b?["'])[^"']*(["'])""")
_lock = threading.Lock()
_installed = False


class PlaintextRedactor(logging.Filter):
    """Rewrite a record's message with every ``"Plaintext"`` value hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's business
            return True
        if "Plaintext" in message:
            record.msg = _FIELD.sub(r"\1<redacted>\2", message)
            record.args = None
        return True


def install() -> None:
    """Add the filter to botocore's request and response loggers (once)."""
    global _installed
    with _lock:
        if _installed:
            return
        redactor = PlaintextRedactor()
        for name in LOGGERS:
            logging.getLogger(name).addFilter(redactor)
        _installed = True


class RowHider(logging.Filter):
    """Replace the row of SQLAlchemy's ``Row %r`` debug records by its length."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.msg == "Row %r" and isinstance(args, tuple) and args:
            row: Any = getattr(args[0], "row", args[0])  # sql.util._repr_row
            try:
                size = len(row)
            except TypeError:
                size = 0
            record.msg = "Row <%d values hidden by sa-envelope>"
            record.args = (size,)
        return True


_ROW_HIDER = RowHider()


def hide_rows(engine: object) -> None:
    """Hide result rows in the DEBUG log of ``engine`` (idempotent)."""
    logger = getattr(engine, "logger", None)
    logger = getattr(logger, "logger", logger)  # echo wraps it in an InstanceLogger
    if isinstance(logger, logging.Logger) and _ROW_HIDER not in logger.filters:
        logger.addFilter(_ROW_HIDER)

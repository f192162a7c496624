"""The package's exceptions: one root, narrow subclasses, in one module.

Every error derives from :class:`EnvelopeError`, which mixes in SQLAlchemy's
``DontWrapMixin``: an error raised while a statement binds or loads values
reaches the caller as itself, not wrapped in ``StatementError``, so
``except KeyProviderError:`` works around ``session.commit()``.

Messages name the table, column and key id. They never carry key material or
plaintext: the constructors take only those names, never values.
"""

from __future__ import annotations

from sqlalchemy.exc import DontWrapMixin

__all__ = [
    "ConfigurationError",
    "DecryptionError",
    "EncryptionError",
    "EnvelopeError",
    "KeyNotFoundError",
    "KeyProviderError",
    "UnauthenticatedKeyError",
    "UntrustedKeyError",
    "RowKeyRequiredError",
    "UnsupportedQueryError",
    "MigrationIncompleteError",
    "ClaimLostError",
    "WorkerFailedError",
]


def _where(table: str | None, column: str | None, key_id: str | None) -> str:
    """Render ``table.column (key K)`` from whichever parts are known."""
    place = ".".join(p for p in (table, column) if p) or "<unbound column>"
    return f"{place} (key {key_id})" if key_id else place


class EnvelopeError(DontWrapMixin, Exception):
    """Root of every error sa-envelope raises.

    ``table``, ``column`` and ``key_id`` are kept as attributes so that
    callers and logs can tell where a failure happened without parsing text.
    """

    def __init__(
        self, message: str, *, table: str | None = None, column: str | None = None, key_id: str | None = None
    ) -> None:
        self.table = table
        self.column = column
        self.key_id = key_id
        super().__init__(message)


class ConfigurationError(EnvelopeError, ValueError):
    """A declaration or argument cannot work (caught at declaration time)."""


class _PerValueError(EnvelopeError):
    """An error about one value: ``<what> <table.column (key K)>: <reason>``."""

    what = ""

    def __init__(
        self, reason: str, *, table: str | None = None, column: str | None = None, key_id: str | None = None
    ) -> None:
        where = _where(table, column, key_id)
        super().__init__(f"{self.what} {where}: {reason}", table=table, column=column, key_id=key_id)


class EncryptionError(_PerValueError, TypeError):
    """A value cannot be serialised for its column's inner type."""

    what = "cannot encrypt a value for"


class DecryptionError(_PerValueError):
    """A stored value is tampered, truncated, swapped, corrupt or foreign.

    One opaque error for every way a value can fail to authenticate: telling
    them apart would help an attacker more than it helps an operator.
    """

    what = "cannot decrypt a value of"


class KeyNotFoundError(DecryptionError, LookupError):
    """A value names a data key that the key table does not hold.

    A subclass of :class:`DecryptionError`: a value whose key is gone cannot
    be decrypted, and a header tampered to name an unknown key is caught by
    ``except DecryptionError`` too. Catch this class to tell lost keys apart.
    """

    what = "data key not found for"

    def __init__(
        self,
        *,
        table: str | None = None,
        column: str | None = None,
        key_id: str | None = None,
        reason: str = "no such key in sa_envelope_keys",
    ) -> None:
        super().__init__(reason, table=table, column=column, key_id=key_id)


class KeyProviderError(EnvelopeError):
    """The key provider (KMS) refused, failed or could not be reached."""


class UntrustedKeyError(KeyProviderError):
    """A key row names a wrapping key the provider does not trust (refused
    without calling the KMS): planted by someone who can write the key table."""


class UnauthenticatedKeyError(KeyProviderError):
    """A wrapped key does not authenticate with the metadata its row states
    (relabelled scope, owner, algorithm, created time or namespace)."""


class UnsupportedQueryError(EnvelopeError):
    """A query form cannot give a correct answer on an encrypted column."""


class DuplicateValueError(EnvelopeError):
    """A unique deterministic column would hold one value twice, under two
    keys, while its key is being rotated (the database sees two different
    byte strings: docs/rotation.md). The statement ran: roll back."""


class UncheckedUpdateError(EnvelopeError):
    """An UPDATE of the other columns of a unique set holding a deterministic
    column, during its rotation, changed more rows than the uniqueness check
    read before it (a row began to match its WHERE clause in between): the
    values those rows keep were not checked. The statement ran: roll back
    and retry."""


# -- row scope (issue 3) --------------------------------------------------------


class RowKeyRequiredError(EncryptionError):
    """A row-scoped value reached the database without its row's key.

    Raised for Core ``insert()``/``update()`` of a row-scoped column with a
    bare value: only the ORM hooks, or :meth:`KeyManager.new_row_key`, know
    which row a value belongs to and insert its key in the same transaction.
    """

    def __init__(self, *, table: str | None = None, column: str | None = None) -> None:
        super().__init__(
            "a row-scoped value needs its row's key: write it through an ORM Session, "
            "or wrap it with KeyManager.new_row_key(conn, table).value(...)",
            table=table,
            column=column,
        )


# -- online migrations (issue 16) -----------------------------------------------


class MigrationIncompleteError(EnvelopeError):
    """A contract step found rows whose new half is not filled yet: run the
    backfill (``sa-envelope encrypt-column``) to the end first."""


class ClaimLostError(EnvelopeError):
    """A worker's claimed range was taken over (its lease ran out): the
    batch is rolled back and the worker claims another range."""


class WorkerFailedError(EnvelopeError):
    """A worker process of a job failed or died before it finished: the
    others were stopped; what was committed stays, a rerun resumes."""

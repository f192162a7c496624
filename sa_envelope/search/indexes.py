"""Prefix and substring indexes, and what every search index shares.

Declared beside the encrypted column, in the table's arguments::

    class Patient(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(EncryptedType(String(200), keys))
        notes: Mapped[str] = mapped_column(EncryptedType(String(2000), keys))
        __table_args__ = (
            PrefixIndex("name", keys, max_length=8, normalizer=normalize_text_folded),
            SubstringIndex("notes", keys, n=3),
        )

    lookup(session, Patient.name, startswith="ada")
    lookup(session, Patient.notes, contains="penicillin")

An index stores, per row, a set of *tokens* (:mod:`.tokens`): truncated,
keyed digests of the normalised value's prefixes or n-grams. A query turns
its needle into tokens the same way, the database returns the rows holding
them (*candidates*: truncated digests collide by design), and
:func:`~sa_envelope.lookup` re-checks each candidate against its decrypted
value. The key is the table's blind-index key (scope ``blind-index``), with
a subkey per index kind, column and settings; it never rolls over by itself,
and which key and which database's key table is :mod:`.keyring`'s rule.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Collection

from sqlalchemy import Column, Table, event
from sqlalchemy.sql.schema import SchemaItem

from ..errors import ConfigurationError, EncryptionError, UnsupportedQueryError
from . import arrays, keyring, query
from . import tokens as tk
from .keyring import Inputs
from ..columns.portable import Portable
from ..columns.searchable import declared_on, register, register_copy

__all__ = ["PrefixIndex", "SearchIndex", "SubstringIndex"]


class SearchIndex(Portable, SchemaItem):
    """A set of tokens per row, derived from the value of column ``source``.

    ``source`` is the encrypted column's name; ``keys`` its KeyManager;
    ``normalizer`` maps a value to the text that is indexed and compared
    (default: the value as is); ``bits`` (8 to 64) is the size of a token:
    fewer bits, more candidates to re-check and less for a database reader
    to learn. ``context="table.column"`` pins the names (as for
    EncryptedType), so a rename keeps the tokens valid. ``storage`` is
    ``"array"`` (a ``BIGINT[]`` column with a GIN index beside the value:
    PostgreSQL, :mod:`.arrays`) or ``"table"`` (the token table, :mod:`.tokens`);
    by default ``"array"`` when every engine the KeyManager serves is PostgreSQL.
    ``gin_with`` are the GIN index's storage parameters (``{"fastupdate":
    "off"}``, ``{"gin_pending_list_limit": 32768}``): how writes trade against
    lookups (docs/querying.md).
    """

    __visit_name__ = "sa_envelope_search_index"
    kind = ""

    def __init__(
        self,
        source: str,
        keys: Any,
        *,
        normalizer: Callable[[Any], Any] | None = None,
        bits: int = 32,
        context: str | None = None,
        storage: str | None = None,
        gin_with: dict[str, Any] | None = None,
    ) -> None:
        if not 8 <= bits <= 64:
            raise ConfigurationError(f"bits must be from 8 to 64, got {bits}")
        self.source, self.keys, self.normalizer, self.bits = source, keys, normalizer, bits
        self.context, self._storage, self.gin_with = context, storage, dict(gin_with or {})
        self.storage = "table"
        self.tokens_column: Column[Any] | None = None
        self.table: Table | None = None
        self.owner = ""
        self.column = ""
        self._subkey: dict[int, tuple[Any, Any]] = {}  # id(key entry) -> (entry, subkey): .keyring

    # -- the table ---------------------------------------------------------------------

    def _set_parent(self, parent: Any, **kw: Any) -> None:
        if not isinstance(parent, Table):
            raise ConfigurationError(f"{type(self).__name__} belongs in a table's arguments")
        if self.source not in parent.c:
            raise ConfigurationError(f"{type(self).__name__}: {parent.fullname} has no column {self.source!r}")
        self._name_for(parent)
        if any(i.kind == self.kind and i.source == self.source for i in declared_on(parent)):
            raise ConfigurationError(f"{parent.fullname}.{self.source} has two {self.kind} indexes")
        register(parent, self)
        self.storage = arrays.choose(self.keys, self._storage)
        if self.storage == "array":
            self.tokens_column = arrays.add_column(parent, self)
        # a copy of the column (Table.to_metadata) carries this listener to its new table
        event.listen(parent.c[self.source], "after_parent_attach", self._copied_into, propagate=True)

    def _name_for(self, table: Table) -> None:
        self.table = table
        self.owner, self.column = table.fullname, table.c[self.source].name
        if self.context is not None:
            self.owner, _, self.column = self.context.rpartition(".")

    def _copied_into(self, column: Any, table: Any) -> None:
        if isinstance(table, Table):
            register_copy(table, self)

    def copy_to(self, table: Table) -> None:
        """Declare this index again on ``table``, a copy of its table, named
        for the copy as an EncryptedType copy is (``context=`` pins both).
        Same storage: array storage uses the copy's copied token column
        (and GIN index); a copy without one, or that declares this kind
        of index on the column itself, gets none."""
        if self.source not in table.c or any(
            i.kind == self.kind and i.source == self.source for i in declared_on(table)
        ):
            return
        clone = copy.copy(self)
        clone._subkey, clone.gin_with = {}, dict(self.gin_with)
        clone._name_for(table)
        if clone.storage == "array":
            clone.tokens_column = table.c.get(arrays.column_name(clone.column, clone.kind))
            if clone.tokens_column is None:
                return
        register(table, clone)

    def manager(self) -> Any:
        """``keys``, or the error of an index that has none (unpickled
        elsewhere, :mod:`sa_envelope.columns.portable`, or declared without)."""
        if self.keys is None:
            raise self.missing_keys((self.owner, self.column)) or ConfigurationError(
                f"search index {self.owner}.{self.column} has no KeyManager", table=self.owner, column=self.column
            )
        return self.keys

    @property
    def name(self) -> str:
        """The index's name in the token table: ``column/kind``."""
        return f"{self.column}/{self.kind}"

    @property
    def tokens_table(self) -> Table:
        return tk.token_table(self.keys.table.metadata, self.keys.table.name)

    def source_column(self) -> Column[Any]:
        assert self.table is not None
        return self.table.c[self.source]

    def settings(self) -> str:
        """What besides the key changes the tokens (bound into the subkey)."""
        return f"bits={self.bits}"

    # -- tokens ------------------------------------------------------------------------

    def subkey(self) -> Any:
        """The token function (:class:`.prf.Prf`) new tokens are made with:
        the write key of the table's blind-index key, in the statement's
        database (:func:`.keyring.write_subkey`)."""
        if self.table is None or self.keys is None:
            raise EncryptionError("this search index is not attached to a table", column=self.source)
        return keyring.write_subkey(self)

    def digests(self, key: Any, messages: Collection[bytes]) -> set[int]:
        """The tokens of distinct token inputs (docs/format.md), in one pass."""
        return set(key.tokens(messages, self.bits))

    def query_of(self, inputs: list[bytes], all_required: bool) -> tuple[Inputs, bool]:
        """A query's token inputs, made tokens under each live key when the
        statement executes (:func:`.keyring.tokens_param`)."""
        return sorted(set(inputs)), all_required

    def normalise(self, value: Any) -> str:
        text = self.normalizer(value) if self.normalizer is not None else value
        return text if isinstance(text, str) else str(text)

    def tokens(self, value: Any) -> set[int]:  # pragma: no cover - each kind has its own
        raise NotImplementedError

    def query_tokens(self, needle: Any) -> tuple[Inputs, bool]:  # pragma: no cover
        """(inputs, all_required): what a needle's rows hold tokens of."""
        raise NotImplementedError

    def accepts(self, value: Any, needle: Any) -> bool:
        """The exact test of one decrypted value (the re-check)."""
        return self.acceptor(needle)(value)

    def acceptor(self, needle: Any) -> Callable[[Any], bool]:  # pragma: no cover
        """:meth:`accepts` for one needle, run on every candidate of a lookup:
        the needle is prepared once (normalised, bounds read)."""
        raise NotImplementedError

    def loose(self, needle: Any) -> bool:
        """Whether many candidates may fail the re-check (then :func:`.query.find`
        re-checks each candidate's value before it loads objects)."""
        return False

    def refuse(self, why: str) -> UnsupportedQueryError:
        return UnsupportedQueryError(f"{self.owner}.{self.column}: {why}", table=self.owner, column=self.column)

    def _text_needle(self, needle: Any) -> str:
        if not isinstance(needle, str):
            raise self.refuse(f"a {self.kind} search takes a str, got {type(needle).__name__}")
        text = self.normalise(needle)
        if not text:
            raise self.refuse(f"an empty {self.kind} needle would match every row: refused")
        return text

    def candidates(self, expr: Any, needle: Any) -> Any:
        """The SQL criterion of the rows that may match ``needle`` (re-check them)."""
        return query.candidates(self, getattr(expr, "table", None), needle)

    def find(self, session: Any, attribute: Any, needle: Any, where: Any) -> list[Any]:
        """Exactly the objects whose value matches ``needle`` (see lookup())."""
        return query.find(self, session, attribute, needle, where)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {self.settings()})"


class PrefixIndex(SearchIndex):
    """Tokens of the normalised value's first 1 .. ``max_length`` characters.

    Answers ``startswith``. A needle longer than ``max_length`` is looked up
    by its first ``max_length`` characters and re-checked in full. Reveals
    which rows share each prefix up to ``max_length`` (docs/querying.md).
    """

    kind = "prefix"

    def __init__(self, source: str, keys: Any, *, max_length: int = 8, **kw: Any) -> None:
        super().__init__(source, keys, **kw)
        if not 1 <= max_length <= 64:
            raise ConfigurationError(f"max_length must be from 1 to 64, got {max_length}")
        self.max_length = max_length

    def settings(self) -> str:
        return f"bits={self.bits};max_length={self.max_length}"

    def tokens(self, value: Any) -> set[int]:
        text = self.normalise(value)
        inputs = {text[:i].encode("utf-8") for i in range(1, min(len(text), self.max_length) + 1)}
        return self.digests(self.subkey(), inputs)

    def query_tokens(self, needle: Any) -> tuple[Inputs, bool]:
        text = self._text_needle(needle)
        return self.query_of([text[: self.max_length].encode("utf-8")], True)

    def acceptor(self, needle: Any) -> Callable[[Any], bool]:
        wanted, normalise = self.normalise(needle), self.normalise
        return lambda value: value is not None and normalise(value).startswith(wanted)

    def loose(self, needle: Any) -> bool:
        """A needle past ``max_length``: its rows share only its first characters."""
        return len(self.normalise(needle)) > self.max_length


class SubstringIndex(SearchIndex):
    """Tokens of the normalised value's n-grams (``n`` characters, 3 by default).

    Answers ``contains`` for needles of at least ``n`` characters: a row is
    a candidate when it holds every n-gram of the needle (up to
    ``max_query_tokens`` of them, spread over the needle). Reveals which rows
    share each n-gram, and how many distinct n-grams a value has.
    """

    kind = "substring"

    def __init__(self, source: str, keys: Any, *, n: int = 3, max_query_tokens: int = 8, **kw: Any) -> None:
        super().__init__(source, keys, **kw)
        if not 1 <= n <= 16:
            raise ConfigurationError(f"n must be from 1 to 16, got {n}")
        self.n, self.max_query_tokens = n, max(1, max_query_tokens)

    def settings(self) -> str:
        return f"bits={self.bits};n={self.n}"

    def grams(self, text: str) -> list[str]:
        return [text[i : i + self.n] for i in range(len(text) - self.n + 1)]

    def tokens(self, value: Any) -> set[int]:
        text = self.normalise(value)
        data, n = text.encode("utf-8"), self.n
        if len(data) == len(text):  # ASCII: the n-grams are byte slices
            grams = {data[i : i + n] for i in range(len(data) - n + 1)}  # deduped before the PRF
        else:
            grams = {g.encode("utf-8") for g in self.grams(text)}
        return self.digests(self.subkey(), grams)

    def query_tokens(self, needle: Any) -> tuple[Inputs, bool]:
        text = self._text_needle(needle)
        if len(text) < self.n:
            raise self.refuse(
                f"a contains needle needs at least {self.n} characters (n={self.n}); "
                f"got {len(text)}: filter a bounded result in Python instead"
            )
        grams = list(dict.fromkeys(self.grams(text)))  # distinct, in needle order
        # every n-gram when they fit: overlapping n-grams must sit side by side in a
        # row, which rows holding them scattered rarely do (fewer candidates to decrypt);
        # else max_query_tokens of them, evenly spread from the first to the last
        most = self.max_query_tokens
        if len(grams) > most:
            grams = [grams[round(i * (len(grams) - 1) / max(1, most - 1))] for i in range(most)]
        return self.query_of([g.encode("utf-8") for g in grams], True)

    def acceptor(self, needle: Any) -> Callable[[Any], bool]:
        wanted, normalise = self.normalise(needle), self.normalise
        return lambda value: value is not None and wanted in normalise(value)

    def loose(self, needle: Any) -> bool:
        """Always: a row may hold the needle's n-grams apart."""
        return True

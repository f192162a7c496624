"""The commands that read or move stored data: ``rewrap``, ``verify``, ``reencrypt``, ``export``.

None needs the application's models. ``verify``, ``export`` and
``reencrypt`` reflect the tables and find the encrypted columns by the shape
of their values (:mod:`sa_envelope.jobs.scan`); ``export`` reads an
encrypted column as text unless ``--type COLUMN=TYPE`` names its inner type.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from ..envelope import format as fmt
from ..errors import ConfigurationError, KeyNotFoundError
from ..keys import table as kt
from ..jobs.export import FORMATS, TYPES, export_table
from ..jobs.verify import verify_database
from ..manager import KeyManager
from ..providers.spec import provider_from_spec
from .indexes import SPEC_HELP, check_indexes, parse_specs, unchecked_indexes
from .common import (
    RESUMES,
    STARTS_OVER,
    Configure,
    cmk_option,
    database_option,
    emit,
    engine_of,
    grace_option,
    manager,
    pk_option,
)
from .output import escape, say
from .workers import moved_columns_of, reencrypt_in_processes

__all__ = ["COMMANDS"]


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _rewrap(parser: argparse.ArgumentParser) -> None:
    database_option(parser)
    parser.add_argument(
        "--to",
        default=os.environ.get("SA_ENVELOPE_CMK"),
        help="target CMK: KMS key ARN, key id, alias, or local:PATH (default $SA_ENVELOPE_CMK)",
    )
    parser.add_argument(
        "--from",
        dest="source",
        default=os.environ.get("SA_ENVELOPE_SOURCE_CMK"),
        help="CMK the keys are wrapped by now, e.g. alias/old or local:OLD.key: only it and "
        "the target are trusted (default $SA_ENVELOPE_SOURCE_CMK)",
    )
    parser.add_argument("--batch-size", type=int, default=100, help="keys per transaction (default 100)")

    def run(ns: argparse.Namespace) -> int:
        target = provider_from_spec(ns.to or "", check=True)
        source = provider_from_spec(ns.source) if ns.source else target
        engine = engine_of(ns)
        try:
            report = KeyManager(engine, source).rewrap(target, batch_size=ns.batch_size)
        finally:
            engine.dispose()
        lines: list[Any] = [report]
        lines += [f"  key {key_id}: {reason}" for key_id, reason in report.failures]
        lines += [f"  key {k}: wrapped by untrusted key {w}, left as it is" for k, w in report.untrusted]
        data = {n: getattr(report, n) for n in ("target", "rewrapped", "current", "failed", "locked", "complete")}
        failures = [{"key": k, "reason": r} for k, r in report.failures]
        emit(ns, data | {"failures": failures, "untrusted": [{"key": k, "wrapped_by": w} for k, w in report.untrusted]},
             lines)  # fmt: skip
        return 0 if report.complete else 1

    parser.set_defaults(run=run, interrupted=RESUMES)


def _verify(parser: argparse.ArgumentParser) -> None:
    database_option(parser)
    parser.add_argument("--table", action="append", dest="tables", help="only this table (repeatable)")
    parser.add_argument(
        "--index",
        action="append",
        dest="indexes",
        metavar=SPEC_HELP,
        help="also check this search index's tokens against its rows, described as the model declares it "
        "(repeatable; e.g. patients.notes=substring:n=3)",
    )
    cmk_option(parser)

    def run(ns: argparse.Namespace) -> int:
        specs = parse_specs(ns.indexes or [])
        engine = engine_of(ns)
        try:
            keys = manager(ns, engine)
            report = verify_database(keys.store, ns.tables)
            indexes = check_indexes(keys, engine, specs)
            unchecked = unchecked_indexes(keys, engine, indexes)
        finally:
            engine.dispose()
        lines = report.lines()
        lines.append(f"verified {report.ok + report.failed} values: {report.ok} ok, {report.failed} failed")
        lines.append(f"erased (row key shredded): {report.erased}")
        lines.append(f"key table: {len(report.anomalies)} anomalies")
        lines += [f"search index {r}" for r in indexes]
        lines += [
            f"search index {t} {n}{_in_array(c)}: not checked (describe it with --index)" for t, n, c in unchecked
        ]
        data = report.as_dict() | {"indexes": [_index_dict(r) for r in indexes]}
        emit(ns, data | {"unchecked_indexes": [_unchecked_dict(*u) for u in unchecked]}, lines)
        return 0 if report.complete and all(r.ok for r in indexes) else 1

    parser.set_defaults(run=run, interrupted=STARTS_OVER.replace("changed", "changed (verify only reads)"))


def _in_array(column: str | None) -> str:
    return f" (token array {column})" if column else ""


def _unchecked_dict(table: str, index: str, column: str | None) -> dict[str, Any]:
    """An index not checked: in the token table, or (``column``) in a token array."""
    return {"table": table, "index": index} | ({"column": column} if column else {})


def _index_dict(report: Any) -> dict[str, Any]:
    names = ("table", "column", "index", "key_id", "rows", "ok", "missing", "tampered", "orphan_tokens", "moving")
    return {n: getattr(report, n) for n in names} | {"rows_shown": report.examples}


def _reencrypt(parser: argparse.ArgumentParser) -> None:
    database_option(parser)
    parser.add_argument("--key", required=True, help="the key to move values off, as keys list shows it")
    parser.add_argument("--columns", help="only these encrypted columns of the key's table (a,b)")
    parser.add_argument("--batch-size", type=int, default=500, help="rows per transaction (default 500)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the rows (default 1)")
    parser.add_argument("--rate", type=float, help="at most this many rows per second in all")
    parser.add_argument(
        "--max-batches", type=int, help="stop after this many batches per column and index (run again to resume)"
    )
    parser.add_argument(
        "--index",
        action="append",
        dest="indexes",
        metavar=SPEC_HELP,
        help="a blind-index key: each index of its table, as the model declares it (repeatable; as for verify, "
        "and KIND blind for a BlindIndexType column: users.email_index=blind:source=email,bits=32,normalizer=email)",
    )
    parser.add_argument(
        "--not-indexed",
        action="append",
        default=[],
        metavar="COLUMN",
        help="a blind-index key: a binary column of the table that is not a blind index (repeatable)",
    )
    grace_option(parser)
    cmk_option(parser)

    def run(ns: argparse.Namespace) -> int:
        if ns.workers < 1 or ns.batch_size < 1 or (ns.max_batches is not None and ns.max_batches < 1):
            raise ConfigurationError("--workers, --batch-size and --max-batches must be at least 1")
        specs = parse_specs(ns.indexes or [], blind=True)
        engine = engine_of(ns)
        try:
            keys = manager(ns, engine)
            record = _key_record(keys, _key(ns.key))
            blind = record.scope == kt.SCOPE_BLIND_INDEX  # digests and tokens recomputed from the values
            if specs and not blind:
                raise ConfigurationError(f"--index describes a blind-index key's indexes; key {ns.key} is a "
                                         f"{record.scope} key of {record.owner_table}")  # fmt: skip
            names = ("database_url", "cmk", "grace", "batch_size", "rate", "max_batches")
            options = {n: getattr(ns, n) for n in names} | {"key": _key(ns.key), "names": _names(ns.columns)}
            if blind:  # plain options: each worker declares the indexes itself
                options |= {"table": record.owner_table, "indexes": ns.indexes or [], "not_indexed": ns.not_indexed}
            if ns.workers > 1 and engine.dialect.name != "sqlite":  # SQLite has one writer
                report, calls = reencrypt_in_processes(keys, options, ns.workers)
            else:
                columns = moved_columns_of(keys, engine, options)
                report = keys.reencrypt(columns, key_id=ns.key, batch_size=ns.batch_size, rate=ns.rate,
                                        max_batches=ns.max_batches)  # fmt: skip
                calls = keys.provider_calls
        finally:
            engine.dispose()
        lines: list[Any] = [report, *(f"  {where}: {reason}" for where, reason in report.failures)]
        if report.stopped:
            lines.append("stopped by --max-batches: run the same command again to resume")
        lines.append(f"KMS calls: {calls}")
        names = ("reencrypted", "failed", "remaining", "reindexed", "stopped", "retired")
        data = {n: getattr(report, n) for n in names}
        failures = [{"column": w, "reason": r} for w, r in report.failures]
        emit(ns, {"key": report.key_id, **data, "failures": failures, "kms_calls": calls}, lines)
        return 0 if report.remaining == 0 and report.failed == 0 and not report.stopped else 1

    parser.set_defaults(run=run, interrupted=RESUMES)


def _key_record(keys: KeyManager, key: str) -> Any:
    """The key table's row of ``key`` (which decides how its values are found)."""
    store = keys.store
    with store.engine.connect() as conn:
        record = kt.get_record(conn, store.table, fmt.parse_key_id(key))
    if record is None:
        raise KeyNotFoundError(key_id=key)
    return record


def _key(text: str) -> str:
    if len(text) != 16 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ConfigurationError(f"{text!r} is not a key id (16 hex digits, as keys list shows)")
    return text.lower()


def _types(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        column, sep, type_name = pair.partition("=")
        if not sep or not column or type_name.lower() not in TYPES:
            raise ConfigurationError(f"--type {pair!r}: give COLUMN=TYPE, TYPE one of {', '.join(TYPES)}")
        out[column] = type_name
    return out


def _export(parser: argparse.ArgumentParser) -> None:
    database_option(parser)
    parser.add_argument("--table", required=True, help="the table to export")
    parser.add_argument("--columns", help="only these columns, in this order (a,b); default all")
    parser.add_argument("--format", choices=FORMATS, default="csv", help="csv (a header line) or jsonl")
    parser.add_argument("--output", help="write to FILE (made mode 0600, in place only once complete)")
    pk_option(parser, "only the row with this primary key (a data-subject request)")
    parser.add_argument(
        "--type", action="append", metavar="COLUMN=TYPE", help="inner type of an encrypted column (default String)"
    )
    cmk_option(parser)

    def run(ns: argparse.Namespace) -> int:
        if ns.json and not ns.output:
            raise ConfigurationError("--json prints the report on stdout: give the data a file with --output")
        types_, engine = _types(ns.type), engine_of(ns)
        try:
            store = manager(ns, engine).store
            args = {"fmt_name": ns.format, "columns": _names(ns.columns), "types_": types_, "pk": ns.pk}
            if not ns.output:
                out = _Terminal(sys.stdout) if sys.stdout.isatty() else sys.stdout
                report = export_table(store, ns.table, out, **args)
            else:
                with _atomic(Path(ns.output)) as out:
                    report = export_table(store, ns.table, out, **args)
        finally:
            engine.dispose()
        if ns.json:
            emit(ns, report.as_dict() | {"output": ns.output}, [])
        else:
            say(report, sys.stderr)
        return 0

    parser.set_defaults(
        run=run, interrupted="the export is incomplete (an --output file is left as it was): run it again"
    )


class _Terminal:
    """Rows shown on a terminal: every character that is not printable (an
    escape sequence stored by whoever can write the database) is escaped, as
    everything else the CLI prints. Files and pipes get the data as it is."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, text: str) -> int:
        return self.out.write("\n".join(escape(line) for line in text.replace("\r\n", "\n").split("\n")))


class _atomic:
    """A file written beside ``path`` (mode 0600: it holds plaintext), moved in
    place only when complete; removed if the export fails."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> TextIO:
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent or ".")
        self.file = os.fdopen(fd, "w", encoding="utf-8", newline="")
        return self.file

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


COMMANDS: tuple[tuple[str, Configure, str], ...] = (
    ("rewrap", _rewrap, "re-wrap every table key under another CMK (CMK rotation)"),
    ("verify", _verify, "open every encrypted value and check every key; report failures by kind"),
    ("reencrypt", _reencrypt, "re-encrypt the values stored under one key with the table's active key"),
    ("export", _export, "stream a table decrypted as CSV or JSON lines (reports, data-subject requests)"),
)

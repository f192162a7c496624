"""The CLI's pieces that need no database: the progress bar, the database options."""

from __future__ import annotations

from typing import Any


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys: Any) -> None:
    from sa_envelope.jobs.progress import NullBar, progress_bar

    assert isinstance(progress_bar(10, "rewrap keys"), NullBar)  # pytest's stderr is no terminal
    with progress_bar(10, "rewrap keys", enabled=True) as bar:
        bar.update(10)
    assert "10/10" in capsys.readouterr().err


def test_every_command_takes_the_database_the_same_way(capsys: Any, monkeypatch: Any) -> None:
    """One rule (cli.common): ``--database-url`` or ``--url``, default
    ``$SA_ENVELOPE_DATABASE_URL``; none, a bad URL or a missing driver is one line."""
    from sa_envelope.cli import COMMANDS, build_parser, main

    monkeypatch.delenv("SA_ENVELOPE_DATABASE_URL", raising=False)
    parser = build_parser()
    required = {"encrypt-column": ["--table", "t", "--column", "c"], "decrypt-column": ["--table", "t", "--column", "c"],
                "rotate": ["--table", "t"], "reencrypt": ["--key", "0" * 16], "export": ["--table", "t"]}  # fmt: skip
    names = [n for n, _, _ in COMMANDS if n != "demo"]
    for name in names:
        words = ["keys", "list"] if name == "keys" else [name]
        for option in ("--database-url", "--url"):
            ns = parser.parse_args([*words, option, "sqlite://", *required.get(name, [])])
            assert ns.database_url == "sqlite://", (name, option)
    for args, message in (
        ([], "no database: pass --database-url or set SA_ENVELOPE_DATABASE_URL"),
        (["--url", "not a url"], "--database-url is not a SQLAlchemy URL (dialect+driver://user@host/db)"),
        (["--url", "postgresql+psycopg2://h/db"], "the database driver of postgresql+psycopg2 is not installed"),
    ):
        for command in (["keys", "list"], ["encrypt-column", "--table", "t", "--column", "c", "--cmk", "local:x"]):
            assert main([*command, *args]) == 1
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith(f"sa-envelope: error: {message}"), (command, line)

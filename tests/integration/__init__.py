"""Tests against real backends (SQLite, PostgreSQL, MariaDB): keys, row scope, querying, rotation, Alembic, async, CLI runs."""

"""The SQL that rules and roll-up run on: one sandboxed DuckDB connection and one check for identifiers.

Rules are user-written SQL expressions; they are parsed and bound by DuckDB, never run as Python, and only in a
connection that cannot read or write files, load extensions or change its own settings. Identifiers from the job
(question, derived, criterion and structured column ids, and the engine's `<id>__<suffix>` columns) are written
into SQL only after `identifier` has checked them again, whatever the job model already enforced.
"""

from __future__ import annotations

import re

import duckdb

SAFE_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,127}$")  # a job id (64 at most) plus an engine suffix


def sandbox() -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with external access off and its configuration locked (a rule cannot undo it)."""
    con = duckdb.connect(":memory:", config={
        "enable_external_access": False, "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    })
    con.execute("SET enable_progress_bar = false")  # a session option: set before the lock
    con.execute("SET lock_configuration = true")
    return con


def identifier(name: str) -> str:
    """A job identifier, re-checked before it is written into SQL; ValueError if it is not one."""
    if not SAFE_IDENTIFIER.match(name):
        raise ValueError(f"not an identifier: {name!r}")
    return name


def quoted(name: str) -> str:
    """identifier(name) in double quotes, as SQL names a column."""
    return f'"{identifier(name)}"'

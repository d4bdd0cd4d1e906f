"""The SQL that rules and roll-up run on: one sandboxed DuckDB connection and one check for identifiers.

Rules are user-written SQL expressions (with the engine's own `days_between(a, b)`, the days from date a to date b,
and `within(event, index, '6mo')`); they are parsed and bound by DuckDB, never run as Python, and only in a
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
    for macro in MACROS:
        con.execute(macro)
    return con


# Functions for rules, beside DuckDB's own. NULL in, NULL out: a missing date is unknown, not false.
MACROS = (
    # days_between(stroke_date, index_date) <= 30: days from the first date to the second (negative when the first
    # is later); dates, timestamps or ISO text, compared by calendar day. Text that is no date is unknown (TRY_CAST):
    # one patient's bad value must not stop the rules of all the others.
    "CREATE MACRO days_between(first_date, second_date) AS "
    "date_diff('day', TRY_CAST(first_date AS DATE), TRY_CAST(second_date AS DATE))",
    # span_interval('6mo'): a duration as the job writes a lookback (30d, 2w, 6mo, 1y) as a DuckDB interval
    "CREATE MACRO span_count(span) AS TRY_CAST(regexp_extract(span, '^\\s*(\\d{1,4})', 1) AS INTEGER)",
    "CREATE MACRO span_interval(span) AS CASE regexp_extract(span, '^\\s*\\d{1,4}\\s*(d|w|mo|y)\\s*$', 1) "
    "WHEN 'd' THEN to_days(span_count(span)) WHEN 'w' THEN to_days(7 * span_count(span)) "
    "WHEN 'mo' THEN to_months(span_count(span)) WHEN 'y' THEN to_years(span_count(span)) END",
    # within(bleeding_date, index_date, '6mo'): the first date lies on a day in [second - span, second], with the same
    # calendar arithmetic as a question's lookback window (6 months before 31 August is 28 or 29 February). The span is
    # a literal the job's rule checks (engine.cohort.rules); a missing or unreadable date is unknown.
    "CREATE MACRO within(event_date, index_date, span) AS TRY_CAST(event_date AS DATE) BETWEEN "
    "(TRY_CAST(index_date AS DATE) - span_interval(span))::DATE AND TRY_CAST(index_date AS DATE)",
)

SPAN_FUNCTIONS = {"within": 2}  # function -> position of its duration argument (checked as the job's lookback is)


def identifier(name: str) -> str:
    """A job identifier, re-checked before it is written into SQL; ValueError if it is not one."""
    if not SAFE_IDENTIFIER.match(name):
        raise ValueError(f"not an identifier: {name!r}")
    return name


def quoted(name: str) -> str:
    """identifier(name) in double quotes, as SQL names a column."""
    return f'"{identifier(name)}"'

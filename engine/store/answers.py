"""Committed answers read where they lie: DuckDB streams answers/*.parquet (local or S3) through a pyarrow dataset.

Roll-up, the run report and report.html aggregate the answers with SQL over this dataset, reading only the
columns each query names, so the driver never holds the whole answers table (23M rows at 1M notes). The
connection is the rules' sandbox (no file access, configuration locked): the files are opened by pyarrow, and
DuckDB only scans the registered dataset.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from engine.errors import OutputError
from engine.stages.generate import CUE_MODEL_NAME
from engine.storage import filesystem, is_remote, join
from engine.store.layout import ANSWERS, output_folder

Answers = pa.Table | ds.Dataset  # what the aggregating functions accept: a table in memory or the committed files


def answer_files(uri: str, storage_options: dict | None = None) -> tuple:
    """(fsspec filesystem, sorted committed .parquet paths) under an output folder or an answers/ folder."""
    fs, root = filesystem(output_folder(uri), storage_options)
    folder = join(fs, root, ANSWERS)
    try:
        files = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."))
    except FileNotFoundError:
        raise OutputError(f"no answers under {uri}: expected {folder}/*.parquet written by `engine run`") from None
    if not files:
        raise OutputError(f"no answers under {uri}: {folder} has no .parquet files")
    return fs, files


def answers_dataset(uri: str, storage_options: dict | None = None) -> ds.Dataset:
    """The committed answers as one lazily read dataset (schema of the first shard; later shards are cast to it)."""
    fs, files = answer_files(uri, storage_options)
    arrow_fs = PyFileSystem(FSSpecHandler(fs)) if is_remote(fs) else None
    return ds.dataset(files, format="parquet", filesystem=arrow_fs)


def row_count(answers: Answers | None) -> int:
    if answers is None:
        return 0
    return answers.num_rows if isinstance(answers, pa.Table) else answers.count_rows()


def connect(answers: Answers, name: str = "answers") -> duckdb.DuckDBPyConnection:
    """A sandboxed connection with `answers` registered as a view named `name`."""
    from engine.cohort.sql import sandbox

    con = sandbox()
    con.register(name, answers)
    return con


def query_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    table = con.execute(sql, params or []).fetch_arrow_table()
    return table.to_pylist()


# --- aggregates for report.json and report.html -----------------------------------------------------------------
UNPARSED_ERRORS = "does not match the answer schema|reached model.max_tokens|returned no output"

def _distinct(column: str, where: str = "TRUE") -> str:
    """Distinct values of a column among rows where `where` holds, a missing id (NULL) counting as one value: a
    GROUP BY of its own (one DISTINCT aggregate per query; several in one query ran 3x slower at 23M rows)."""
    return f"(SELECT count(*) FROM (SELECT {column} FROM answers WHERE {where} GROUP BY 1))"


_TOTALS_SQL = """
SELECT count(*) AS rows, {notes} AS notes, {patients} AS patients,
       {truncated} AS notes_truncated,
       coalesce(sum(prompt_tokens), 0)::BIGINT AS prompt_tokens, coalesce(sum(cached_tokens), 0)::BIGINT AS cached_tokens,
       coalesce(sum(completion_tokens), 0)::BIGINT AS completion_tokens,
       count(*) FILTER (WHERE coalesce(completion_tokens, 0) > 0) AS generated,
       count(completion_tokens) AS model_outputs,
       count(*) FILTER (WHERE completion_tokens IS NOT NULL AND status = 'error'
                        AND regexp_matches(coalesce(error, ''), '{unparsed}')) AS unparsed,
       count({verified}) AS verified_checked
FROM answers"""

# One scan for every breakdown the report and the page show: rows by status, error reason, grounding and route,
# each question's rows by what they say (yes, no, value, not in note, error), and the distinct answered numbers
# with their counts (the histograms' input). `g` says which breakdown a row belongs to.
_COUNTS_SQL = """
SELECT CASE WHEN GROUPING(status) = 0 THEN 'status' WHEN GROUPING(error) = 0 THEN 'error'
            WHEN GROUPING(grounding) = 0 THEN 'grounding' WHEN GROUPING(route) = 0 THEN 'route'
            WHEN GROUPING(category) = 0 THEN 'category' ELSE 'number' END AS g,
       coalesce(status, error, grounding, route, category) AS k, question_id, unit, number, count(*) AS n
FROM (SELECT status, CASE WHEN status = 'error' THEN error END AS error, grounding, route, question_id,
             CASE WHEN status = 'answered' AND value_bool IS NOT NULL THEN CASE WHEN value_bool THEN 'yes' ELSE 'no' END
                  WHEN status = 'answered' THEN 'value'
                  WHEN status = 'not_in_note' THEN 'not_in_note' ELSE 'error' END AS category,
             CASE WHEN status = 'answered' THEN unit END AS unit,
             CASE WHEN status = 'answered' THEN value_num END AS number
      FROM answers)
GROUP BY GROUPING SETS ((status), (error), (grounding), (route), (question_id, category), (question_id, unit, number))
ORDER BY g, n DESC, k, question_id, unit, number"""
# Checked model answers by outcome: passed, or failed by category (engine.stages.verify: the reason up to " (")
# and whether the cue answer stood in; run only when some were checked (the filter keeps the scan to those rows).
_VERIFICATION_SQL = """
SELECT verified, CASE WHEN NOT verified THEN split_part(verification, ' (', 1) END AS k,
       count(*) AS n, count(*) FILTER (WHERE model = '{cues}') AS replaced
FROM answers WHERE verified IS NOT NULL GROUP BY ALL ORDER BY n DESC, k"""


def answer_totals(answers: Answers, patients: pa.Table | None = None) -> dict:
    """Counts and token sums over all answer rows, by status, error reason, grounding and route, with each
    question's answer_categories (`by_question`) and answered_numbers (`numbers`) from the same scan.

    `patients` (roll-up's table, one row per patient with `n_notes`, its distinct note ids) gives the note and
    patient counts without two more passes over the answers (6 s of the report at 23M rows): notes are then
    distinct (patient, note id) pairs."""
    con = connect(answers)
    if patients is not None:
        notes, people = int(pc.sum(patients["n_notes"]).as_py() or 0), patients.num_rows
    else:
        notes, people = _distinct("note_id"), _distinct("patient_id")
    # truncated notes in the same scan: a subquery of its own here ran the scan twice in parallel (at 23M rows
    # +1.5 s and +1 GiB held by the driver, the run's peak); a filtered DISTINCT sees only the truncated rows
    truncated = "count(DISTINCT note_id) FILTER (WHERE truncated)"
    verifies = "verified" in answers.schema.names  # answers written before verification have no such columns
    sql = _TOTALS_SQL.format(notes=notes, patients=people, truncated=truncated, unparsed=UNPARSED_ERRORS,
                             verified="verified" if verifies else "NULL::BOOLEAN")
    totals = query_dicts(con, sql)[0]
    counted: dict[str, dict] = {"status": {}, "error": {}, "grounding": {}, "route": {}}
    by_question: dict[str, dict[str, int]] = {}
    breakdowns = con.execute(_COUNTS_SQL).fetch_arrow_table()
    numbers = breakdowns.filter(pc.and_(pc.equal(breakdowns["g"], "number"), pc.is_valid(breakdowns["number"])))
    for row in breakdowns.filter(pc.not_equal(breakdowns["g"], "number")).to_pylist():
        if row["g"] == "category":
            by_question.setdefault(row["question_id"], {})[row["k"]] = row["n"]
        elif row["k"] is not None:
            counted[row["g"]][row["k"]] = row["n"]
    checked = query_dicts(con, _VERIFICATION_SQL.format(cues=CUE_MODEL_NAME)) if totals["verified_checked"] else []
    failures = [row for row in checked if not row["verified"]]
    totals["verified_passed"] = sum(row["n"] for row in checked if row["verified"])
    totals["verified_failed"] = sum(row["n"] for row in failures)
    totals["verified_replaced"] = sum(row["replaced"] for row in failures)
    totals["by_status"] = counted["status"]
    totals["errors"] = counted["error"]
    totals["grounding"] = counted["grounding"]
    totals["by_route"] = counted["route"]
    totals["verification_failures"] = {row["k"]: row["n"] for row in failures}
    totals["by_question"] = by_question  # answer_categories
    totals["numbers"] = numbers.select(["question_id", "unit", "number", "n"]).rename_columns(
        ["question_id", "unit", "value_num", "n"]).sort_by([("question_id", "ascending"), ("unit", "ascending"),
                                                            ("value_num", "ascending")])  # answered_numbers
    return totals


def ungrounded_answers(answers: Answers, accept_fuzzy: bool) -> int:
    """Answered rows whose evidence is not grounded (not_found, no quote, or fuzzy when fuzzy is not accepted)."""
    accepted = "('exact', 'fuzzy')" if accept_fuzzy else "('exact')"
    con = connect(answers)
    return con.sql(f"SELECT count(*) FROM answers WHERE status = 'answered' AND coalesce(grounding NOT IN {accepted}, TRUE)").fetchone()[0]


def answer_categories(answers: Answers) -> dict[str, dict[str, int]]:
    """{question id: {yes|no|value|not_in_note|error: rows}}: what each question's answer rows say."""
    con = connect(answers)
    rows = query_dicts(con, """
SELECT question_id, CASE WHEN status = 'answered' AND value_bool IS NOT NULL THEN CASE WHEN value_bool THEN 'yes' ELSE 'no' END
                         WHEN status = 'answered' THEN 'value'
                         WHEN status = 'not_in_note' THEN 'not_in_note' ELSE 'error' END AS category, count(*) AS n
FROM answers GROUP BY ALL""")
    result: dict[str, dict[str, int]] = {}
    for row in rows:
        result.setdefault(row["question_id"], {})[row["category"]] = row["n"]
    return result


def answered_numbers(answers: Answers) -> pa.Table:
    """Distinct (question_id, unit, value_num) of answered numbers with their row count `n` (histogram input)."""
    con = connect(answers)
    return con.execute("""SELECT question_id, unit, value_num, count(*) AS n FROM answers
                          WHERE status = 'answered' AND value_num IS NOT NULL GROUP BY ALL ORDER BY ALL""").fetch_arrow_table()


def read_answers(uri: str, storage_options: dict | None = None) -> pa.Table:
    """All committed answers under an output folder (or an answers/ folder itself), in memory."""
    fs, files = answer_files(uri, storage_options)
    tables = []
    for path in files:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables, promote_options="permissive")

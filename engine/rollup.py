"""Roll per-note answers up to one row per patient, the table that trial rules run on.

Pure: pyarrow in, pyarrow out, computed in an in-memory DuckDB (vectorised; ~10M answer rows in seconds).
Each (patient, question) keeps one *winning* note, whose value, note id and evidence quote go to the
patient table, so every rule input can be traced back to a sentence of a note.

Per-note value of an answer row:
  * yes_no: `answered` -> value_bool; `not_in_note` -> False when the question says `absent: "no"`,
    else unknown; any other status (error, ...) -> unknown.
  * numeric: `answered` -> value_num converted to the canonical unit and capped (engine.units); an unknown
    unit or a non-finite number -> unknown. `not_in_note` and errors -> unknown.
Roll-ups (NULL = unknown): `any` Kleene OR, `all` Kleene AND, `max`/`min` over known values, `latest` the
known value of the latest note by charttime (notes without a charttime count as oldest).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import duckdb
import numpy as np
import pyarrow as pa

from engine.job import JobSpec, QuestionSpec
from engine.units import conversion_factor

ANSWER_COLUMNS = {
    "patient_id": pa.string(), "note_id": pa.string(), "question_id": pa.string(), "status": pa.string(),
    "value_bool": pa.bool_(), "value_num": pa.float64(), "unit": pa.string(), "evidence": pa.string(),
    "charttime": pa.timestamp("us"),
}
_SAFE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

# The winning row of a (patient, question) is the arg_max of this key. For any/all the first field ranks
# TRUE/unknown/FALSE so that the winner's value *is* the Kleene OR/AND (any: TRUE > unknown > FALSE; all: the
# reverse); for max/min it is the value; for latest, known values first, then the latest charttime. Ties go
# to an answered row (it has evidence), then the latest charttime, then the largest note id (deterministic).
_NEVER = "-9223372036854775807"
_WINNER_KEY = f"""struct_pack(
  k1 := coalesce(CASE rollup WHEN 'max' THEN sv WHEN 'min' THEN -sv
      WHEN 'latest' THEN CASE WHEN sv IS NOT NULL THEN 0 END
      WHEN 'any' THEN CASE WHEN vb THEN 2 WHEN vb IS NULL THEN 1 ELSE 0 END
      WHEN 'all' THEN CASE WHEN NOT vb THEN 2 WHEN vb IS NULL THEN 1 ELSE 0 END END, '-inf'::DOUBLE),
  k2 := CASE WHEN rollup = 'latest' THEN coalesce(epoch_us(charttime), {_NEVER}) ELSE 0 END,
  k3 := answered, k4 := coalesce(epoch_us(charttime), {_NEVER}), k5 := coalesce(note_id, ''))"""


def patient_schema(job: JobSpec, structured_types: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """The exact schema `rollup_answers` returns for `job`.

    Structured columns take their type from `structured_types` (the input's schema); a column not given
    there is typed `null`, which DuckDB treats as "any type" when rules are checked without data.
    """
    types = dict(structured_types or {})
    fields = [pa.field("patient_id", pa.string()), pa.field("n_notes", pa.int64())]
    fields += [pa.field(name, types.get(name, pa.null())) for name in job.input.structured]
    for q in job.questions:
        fields.append(pa.field(q.id, pa.bool_() if q.type == "yes_no" else pa.float64()))
        fields += [pa.field(f"{q.id}__note_id", pa.string()), pa.field(f"{q.id}__evidence", pa.string())]
    return pa.schema(fields)


def rollup_answers(answers: pa.Table, job: JobSpec) -> pa.Table:
    """One row per patient (sorted by patient_id) with the rolled-up value of every question.

    `answers` has one row per (note, question): ANSWER_COLUMNS plus the job's structured columns. Rows for
    question ids the job does not ask are ignored, but their notes still count in `n_notes`.
    """
    answers = _check_answers(answers, job)
    schema = patient_schema(job, {name: answers.schema.field(name).type for name in job.input.structured})
    con = _connect()
    con.register("answers", answers)
    con.register("questions", _question_table(job))
    con.register("units", _unit_table(con, job))
    con.sql(f"CREATE TEMP TABLE patients AS {_patients_sql(job)}")
    winners = con.sql(_winners_sql()).to_arrow_table()
    patients = con.sql("SELECT * EXCLUDE (pidx) FROM patients ORDER BY pidx").to_arrow_table()
    columns = _pivot(winners, patients.num_rows, job)
    table = pa.Table.from_arrays([*patients.columns, *columns.values()], [*patients.column_names, *columns])
    return table.select(schema.names).cast(schema)


def _check_answers(answers: pa.Table, job: JobSpec) -> pa.Table:
    """Fail on missing columns (naming them); add an all-null charttime when the input has none."""
    if "charttime" not in answers.column_names:
        answers = answers.append_column("charttime", pa.nulls(answers.num_rows, pa.timestamp("us")))
    needed = [*ANSWER_COLUMNS, *job.input.structured]
    missing = [name for name in needed if name not in answers.column_names]
    if missing:
        have = ", ".join(answers.column_names)
        raise ValueError(f"answers table lacks column(s) {', '.join(missing)} (has: {have})")
    for name in job.input.structured:
        if not _SAFE.match(name) or name in ANSWER_COLUMNS:
            raise ValueError(f"structured column {name!r} must be a lowercase identifier not in {list(ANSWER_COLUMNS)}")
    return answers


def _question_table(job: JobSpec) -> pa.Table:
    """The questions as a small table: id, type, roll-up, whether not_in_note means False, cap."""
    for q in job.questions:
        if q.type == "numeric" and q.effective_rollup in ("any", "all"):
            raise ValueError(f"question {q.id!r}: roll-up {q.effective_rollup!r} is for yes_no questions; "
                             "use max, min or latest")
    return pa.table({
        "question_id": [q.id for q in job.questions],
        "qtype": [q.type for q in job.questions],
        "rollup": [q.effective_rollup for q in job.questions],
        "absent_no": [q.type == "yes_no" and q.absent == "no" for q in job.questions],
        "qidx": pa.array(range(len(job.questions)), pa.int64()),
        "cap": pa.array([q.cap for q in job.questions], pa.float64()),
    })


def _unit_table(con: duckdb.DuckDBPyConnection, job: JobSpec) -> pa.Table:
    """Conversion factor for every distinct (numeric question, unit) in the answers; NULL = not accepted.

    Python runs once per distinct spelling, not per row, so units.py stays the single source of truth.
    """
    numeric: dict[str, QuestionSpec] = {q.id: q for q in job.questions if q.type == "numeric"}
    pairs = con.sql("SELECT DISTINCT question_id, unit FROM answers WHERE status = 'answered'").fetchall()
    rows = [(qid, unit or "", conversion_factor(unit, numeric[qid])) for qid, unit in pairs if qid in numeric]
    return pa.table({
        "question_id": pa.array([r[0] for r in rows], pa.string()),
        "unit_key": pa.array([r[1] for r in rows], pa.string()),
        "factor": pa.array([r[2] for r in rows], pa.float64()),
    })


def _winners_sql() -> str:
    """The winning row of every (patient, question) that has rows: patient and question index, value, source."""
    return f"""
WITH rows AS ({_row_values_sql()}),
won AS (SELECT patient_id, question_id, arg_max(struct_pack(vb, vn, sv, note_id, evidence), {_WINNER_KEY}) AS w
        FROM rows GROUP BY ALL)
SELECT p.pidx, q.qidx, w.vb, w.vn,
       CASE WHEN w.sv IS NOT NULL THEN w.note_id END AS note_id,
       CASE WHEN w.sv IS NOT NULL THEN w.evidence END AS evidence
FROM won JOIN patients p USING (patient_id) JOIN questions q USING (question_id)"""


def _pivot(winners: pa.Table, n_patients: int, job: JobSpec) -> dict[str, pa.Array]:
    """Long winners (pidx, qidx, ...) to one column per question and source, aligned to the patient rows.

    Vectorised scatter: slot pidx * n_questions + qidx holds the winner's row, -1 (then NULL) where none.
    """
    n_questions = len(job.questions)
    slots = np.full(n_patients * n_questions, -1, dtype=np.int64)
    flat = winners["pidx"].to_numpy() * n_questions + winners["qidx"].to_numpy()
    slots[flat] = np.arange(winners.num_rows)
    columns: dict[str, pa.Array] = {}
    for k, q in enumerate(job.questions):
        picks = slots[k::n_questions]
        index = pa.array(picks, mask=picks < 0)
        value = "vb" if q.type == "yes_no" else "vn"
        columns[q.id] = winners[value].take(index)
        columns[f"{q.id}__note_id"] = winners["note_id"].take(index)
        columns[f"{q.id}__evidence"] = winners["evidence"].take(index)
    return columns


def _row_values_sql() -> str:
    """Each answer row with its per-note value: vb (yes_no), vn (numeric, canonical), sv (sortable)."""
    return """
  SELECT *, coalesce(vn, vb::DOUBLE) AS sv FROM (
    SELECT a.patient_id, a.note_id, a.question_id, a.charttime, a.evidence, q.rollup,
           coalesce(a.status = 'answered', FALSE) AS answered,
           CASE WHEN q.qtype = 'yes_no' THEN CASE
               WHEN a.status = 'answered' THEN a.value_bool
               WHEN a.status = 'not_in_note' AND q.absent_no THEN FALSE END END AS vb,
           CASE WHEN q.qtype = 'numeric' AND a.status = 'answered' AND isfinite(a.value_num) THEN
               CASE WHEN q.cap IS NOT NULL AND a.value_num * u.factor > q.cap THEN q.cap
                    ELSE a.value_num * u.factor END END AS vn
    FROM answers a
    JOIN questions q ON q.question_id = a.question_id
    LEFT JOIN units u ON u.question_id = a.question_id AND u.unit_key = coalesce(a.unit, ''))"""


def _patients_sql(job: JobSpec) -> str:
    """One row per patient (pidx = rank by patient_id): note count, structured values of the latest note.

    Structured values are the same on every row of a note; each one is taken from the latest note (by
    charttime, then note id) that has it, so a missing age in a new note does not hide an older one.
    """
    pick = "ORDER BY charttime DESC NULLS LAST, note_id DESC"
    columns = [_ident(c) for c in job.input.structured]
    per_note = "".join(f", any_value({c}) AS {c}" for c in columns)
    latest = "".join(f", first({c} {pick}) FILTER (WHERE {c} IS NOT NULL) AS {c}" for c in columns)
    return f"""
WITH notes AS (SELECT patient_id, note_id, any_value(charttime) AS charttime{per_note} FROM answers GROUP BY ALL)
SELECT (row_number() OVER (ORDER BY patient_id) - 1)::BIGINT AS pidx, patient_id, count(*)::BIGINT AS n_notes{latest}
FROM notes GROUP BY patient_id"""


def _checked(name: str) -> str:
    """A job identifier, re-checked before it is written into SQL (the job model already enforces it)."""
    if not _SAFE.match(name.replace("__", "_")):
        raise ValueError(f"not an identifier: {name!r}")
    return name


def _ident(name: str) -> str:
    return f'"{_checked(name)}"'


def _connect() -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB that cannot touch files or load extensions: roll-up needs nothing outside memory."""
    return duckdb.connect(":memory:", config={
        "enable_external_access": False, "autoinstall_known_extensions": False,
        "autoload_known_extensions": False, "lock_configuration": True,
    })

"""Roll per-note answers up to one row per patient, the table that trial rules run on.

Pure: pyarrow in, pyarrow out, computed in an in-memory DuckDB (vectorised; ~10M answer rows in seconds).
Each (patient, question) keeps one *winning* note, whose value, note id and evidence quote go to the
patient table, so every rule input can be traced back to a sentence of a note.

Per-note value of an answer row:
  * yes_no: `answered` -> value_bool; `not_in_note` -> False when the question says `absent: "no"`,
    else unknown; any other status (error, ...) -> unknown.
  * numeric: `answered` -> value_num converted to the canonical unit and capped (engine.cohort.units); an unknown
    unit or a non-finite number -> unknown. `not_in_note` and errors -> unknown.
  * date: `answered` -> value_date (ranked as days since 1970-01-01: max is the most recent). categorical:
    `answered` -> value_text when it is one of the question's choices (ranked by their order: max is the last
    listed), else unknown.
Roll-ups (NULL = unknown): `any` Kleene OR, `all` Kleene AND, `max`/`min` over known values, `latest` the
known value of the latest note by charttime (notes without a charttime count as oldest).

Windows (engine.cohort.windows): a question with `lookback`/`lookahead` counts only the rows of notes whose charttime
falls in its window around the patient's index date (`index_date`, `index_date_source` in the patient table); rows
of undated notes count and are counted (`<question>__undated_notes`), rows outside are counted
(`<question>__notes_outside_window`) and left out (for an absent: "no" question rolled up with any they say "no":
nothing documented in the window); with the index date unknown, the question's values are unknown.

Trust. An answered row is trusted unless (job `review.require_grounded_evidence`) its evidence quote was not
found in the note (`exact`, or `fuzzy` with `accept_fuzzy`, count as found), or (job
`review.require_verified_answers`, on by default) it is a model answer that failed its check against the note
(`verified` false, engine.stages.verify; a row whose cue answer stood in hybrid mode has `model` = 'cues' and is
trusted). Trusted rows win ties; when the winning row is not trusted the value is unknown (NULL), its note id and
quote stay, and `<question>__ungrounded` / `<question>__unverified` say why.

`answers` may be a table or the committed files (a pyarrow dataset, engine.store.answers): DuckDB reads only the
columns roll-up needs, and aggregates the patients in passes of about PASS_ROWS answer rows each (by patient
id range), so memory stays bounded by the patient table, not by the answers.

This SQL is the definition. On the engine's own answers (each note's rows contiguous, in job question order)
rollup_answers computes the same table with segment maxima in numpy instead (engine.cohort.columnar, about 3x
faster at 1M notes); any other table, or a layout that does not hold, goes through the SQL.
"""

from __future__ import annotations

from collections.abc import Mapping

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.job import JobSpec, QuestionSpec
from engine.stages.generate import CUE_MODEL_NAME
from engine.cohort.sql import SAFE_IDENTIFIER, quoted, sandbox
from engine.cohort.units import canonical_sql, conversion_factor
from engine.cohort.windows import OUTSIDE, UNDATED, interval_sql, read_index_table, window_columns

PASS_ROWS = 4_000_000  # answer rows aggregated in one pass; larger inputs are rolled up patient range by range

ROLLUP_COLUMNS = {
    "patient_id": pa.string(), "note_id": pa.string(), "question_id": pa.string(), "status": pa.string(),
    "value_bool": pa.bool_(), "value_num": pa.float64(), "unit": pa.string(), "evidence": pa.string(),
    "charttime": pa.timestamp("us"),
}

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
  k3 := answered, k3g := trusted, k4 := coalesce(epoch_us(charttime), {_NEVER}), k5 := coalesce(note_id, ''))"""


def patient_schema(job: JobSpec, structured_types: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """The exact schema `rollup_answers` returns for `job`.

    Structured columns take their type from `structured_types` (the input's schema); a column not given
    there is typed `null`, which DuckDB treats as "any type" when rules are checked without data.
    """
    types = dict(structured_types or {})
    fields = [pa.field("patient_id", pa.string()), pa.field("n_notes", pa.int64())]
    fields += [pa.field(name, types.get(name, pa.null())) for name in _structured_columns(job)]
    if job.uses_index_date:
        fields += [pa.field("index_date", pa.date32()), pa.field("index_date_source", pa.string())]
    for q in job.questions:
        fields.append(pa.field(q.id, VALUE_TYPES[q.type]))
        fields += [pa.field(f"{q.id}__note_id", pa.string()), pa.field(f"{q.id}__evidence", pa.string())]
        fields += [pa.field(name, pa.int64()) for name in window_columns(q)]
        if job.review.require_grounded_evidence:
            fields.append(pa.field(f"{q.id}__ungrounded", pa.bool_()))
        if job.review.require_verified_answers:
            fields.append(pa.field(f"{q.id}__unverified", pa.bool_()))
    return pa.schema(fields)


VALUE_TYPES = {"yes_no": pa.bool_(), "numeric": pa.float64(), "date": pa.date32(), "categorical": pa.string()}
EPOCH = "DATE '1970-01-01'"


def _structured_columns(job: JobSpec) -> list[str]:
    """The structured columns the patient table carries as they are (an index column named index_date becomes the
    computed `index_date`)."""
    return [s for s in job.input.structured if not (job.uses_index_date and s in ("index_date", "index_date_source"))]


def needs_sql(job: JobSpec) -> bool:
    """Whether only the SQL roll-up handles the job: an index date from a structured column (read as DuckDB casts it)."""
    return job.index is not None and job.index.column is not None


def rollup_answers(answers, job: JobSpec) -> pa.Table:
    """One row per patient (sorted by patient_id) with the rolled-up value of every question.

    `answers` (a pyarrow Table or Dataset) has one row per (note, question): ROLLUP_COLUMNS plus the job's
    structured columns (and `grounding` when the job requires grounded evidence; `verified` and `model` where
    the answers have them: answers written before verification have not, and count as verified). Rows for question ids the
    job does not ask are ignored, but their notes still count in `n_notes`.
    """
    from engine.cohort.columnar import columnar_rollup

    _question_table(job)  # refuses a roll-up the question type cannot have
    if not needs_sql(job) and all(name in answers.schema.names for name in job.input.structured):
        table = columnar_rollup(answers, job, patient_schema_of(answers, job), list(ROLLUP_COLUMNS))
        if table is not None:  # the engine's own layout: segment maxima, same result (engine.cohort.columnar)
            return table
    return rollup_sql(answers, job)


def rollup_sql(answers, job: JobSpec) -> pa.Table:
    """rollup_answers in DuckDB, for any answers table: the definition the columnar roll-up is tested against."""
    con = sandbox()
    con.register("answers_in", answers)
    _answers_view(con, answers.schema, job)
    schema = patient_schema_of(answers, job)
    con.register("questions", _question_table(job))
    con.register("units", _unit_table(con, job))
    index_table = read_index_table(job)
    if index_table is not None:
        con.register("index_table", index_table)
    con.sql(f"CREATE TEMP TABLE patients AS {_patients_sql(job)}")
    patients = con.sql("SELECT * EXCLUDE (pidx, __index) FROM patients ORDER BY pidx").to_arrow_table()
    parts = [_rollup_range(con, job, first, last) for first, last in _patient_ranges(patients.num_rows, _rows(answers))]
    if not parts:
        return schema.empty_table()
    # from the chunks: pa.chunked_array([ChunkedArray]) converts element by element (seconds per column at 50k patients)
    columns = {name: pa.chunked_array([c for p in parts for c in p[name].chunks], parts[0][name].type) for name in parts[0]}
    table = pa.Table.from_arrays([*patients.columns, *columns.values()], [*patients.column_names, *columns])
    return table.select(schema.names).cast(schema)


def patient_schema_of(answers, job: JobSpec) -> pa.Schema:
    """The patient table's schema for these answers: the job's columns, with the structured columns typed as the answers hold them."""
    return patient_schema(job, {name: answers.schema.field(name).type for name in job.input.structured})


def _rows(answers) -> int:
    return answers.num_rows if isinstance(answers, pa.Table) else answers.count_rows()


def _patient_ranges(n_patients: int, n_rows: int) -> list[tuple[int, int]]:
    """[first, last] patient indices of each pass: about PASS_ROWS answer rows per pass."""
    passes = max(1, -(-n_rows // PASS_ROWS))
    size = max(1, -(-n_patients // passes))
    return [(start, min(start + size, n_patients) - 1) for start in range(0, n_patients, size)]


def _rollup_range(con: duckdb.DuckDBPyConnection, job: JobSpec, first: int, last: int) -> dict[str, pa.Array]:
    """The question columns of patients first..last (by index), from the answer rows of those patients only."""
    low, high = con.execute("SELECT min(patient_id), max(patient_id) FROM patients WHERE pidx BETWEEN ? AND ?",
                            [first, last]).fetchone()
    winners = con.execute(_winners_sql(), [low, high]).fetch_arrow_table()
    winners = winners.set_column(0, "pidx", pc.subtract(winners["pidx"], first))
    columns = _pivot(winners, last - first + 1, job)
    if any(q.windowed for q in job.questions):
        counts = con.execute(_window_counts_sql(), [low, high]).fetch_arrow_table()
        counts = counts.set_column(0, "pidx", pc.subtract(counts["pidx"], first))
        columns.update(_pivot_window_counts(counts, last - first + 1, job))
    return columns


def _window_counts_sql() -> str:
    """Per (patient, windowed question): the notes its window left out and the undated notes it counted."""
    return f"""
SELECT p.pidx, r.qidx, count(*) FILTER (WHERE r.in_window IS FALSE) AS outside,
       count(*) FILTER (WHERE r.charttime IS NULL) AS undated
FROM ({_row_values_sql()}) r JOIN patients p USING (patient_id) WHERE r.windowed GROUP BY ALL"""


def _pivot_window_counts(counts: pa.Table, n_patients: int, job: JobSpec) -> dict[str, pa.Array]:
    n_questions = len(job.questions)
    columns: dict[str, pa.Array] = {}
    for name in ("outside", "undated"):
        grid = np.zeros(n_patients * n_questions, dtype=np.int64)
        grid[counts["pidx"].to_numpy() * n_questions + counts["qidx"].to_numpy()] = counts[name].to_numpy()
        for k, q in enumerate(job.questions):
            if q.windowed:
                columns[f"{q.id}{OUTSIDE if name == 'outside' else UNDATED}"] = pa.chunked_array([grid[k::n_questions]])
    return columns


def _answers_view(con: duckdb.DuckDBPyConnection, schema: pa.Schema, job: JobSpec) -> None:
    """View `answers` over `answers_in` with only the columns roll-up reads; fail naming any that are missing.

    charttime may be absent (all NULL: every note counts as oldest); so may grounding unless the job requires it.
    """
    grounded = job.review.require_grounded_evidence
    optional = {"charttime": "NULL::TIMESTAMP", "verified": "NULL::BOOLEAN", "model": "NULL::VARCHAR",
                "value_date": "NULL::DATE", "value_text": "NULL::VARCHAR",  # answers written before date questions
                **({} if grounded else {"grounding": "NULL::VARCHAR"})}
    needed = [*ROLLUP_COLUMNS, "value_date", "value_text", "grounding", "verified", "model", *job.input.structured]
    missing = [name for name in needed if name not in schema.names and name not in optional]
    if missing:
        raise ValueError(f"answers table lacks column(s) {', '.join(missing)} (has: {', '.join(schema.names)})")
    for name in job.input.structured:
        if not SAFE_IDENTIFIER.match(name) or name in ROLLUP_COLUMNS:
            raise ValueError(f"structured column {name!r} must be a lowercase identifier not in {list(ROLLUP_COLUMNS)}")
    select = ", ".join(quoted(n) if n in schema.names else f"{optional[n]} AS {quoted(n)}" for n in needed)
    con.sql(f"CREATE TEMP VIEW answers AS SELECT {select} FROM answers_in")
    accepted = ["exact", "fuzzy"] if job.review.accept_fuzzy else ["exact"]
    con.register("grounding_rule", pa.table({"required": [grounded], "accepted": [accepted],
                                             "verified_required": [job.review.require_verified_answers]}))


def _question_table(job: JobSpec) -> pa.Table:
    """The questions as a small table: id, type, roll-up, whether not_in_note means False, cap."""
    for q in job.questions:
        if q.type != "yes_no" and q.effective_rollup in ("any", "all"):
            raise ValueError(f"question {q.id!r}: roll-up {q.effective_rollup!r} is for yes_no questions; "
                             "use max, min or latest")
    return pa.table({
        "question_id": [q.id for q in job.questions],
        "qtype": [q.type for q in job.questions],
        "rollup": [q.effective_rollup for q in job.questions],
        "absent_no": [q.type == "yes_no" and q.absent == "no" for q in job.questions],
        "qidx": pa.array(range(len(job.questions)), pa.int64()),
        "cap": pa.array([q.cap for q in job.questions], pa.float64()),
        "choices": pa.array([q.choices for q in job.questions], pa.list_(pa.string())),
        "windowed": [q.windowed for q in job.questions],
        "lookback": pa.array([interval_sql(q.lookback) for q in job.questions], pa.string()),
        "lookahead": pa.array([interval_sql(q.lookahead or ("0d" if q.windowed else None)) for q in job.questions], pa.string()),
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
    """The winning row of every (patient, question) with rows, for patient ids between two parameters.

    Rows without a known value are left out for max/min/latest (they win only where no row is known, which
    gives the same NULLs as no row); any/all keep them, an unknown ranks between TRUE and FALSE there.
    """
    return f"""
WITH rows AS (SELECT * FROM ({_row_values_sql()}) WHERE in_window IS NOT FALSE OR says_no),
won AS (SELECT patient_id, qidx, arg_max(struct_pack(vb, vn, sv, trusted, grounded, verified, note_id, evidence),
                                          {_WINNER_KEY}) AS w
        FROM rows WHERE sv IS NOT NULL OR rollup IN ('any', 'all') GROUP BY ALL)
SELECT p.pidx, won.qidx,
       CASE WHEN w.trusted THEN w.vb END AS vb, CASE WHEN w.trusted THEN w.vn END AS vn,
       CASE WHEN w.sv IS NOT NULL THEN w.note_id END AS note_id,
       CASE WHEN w.sv IS NOT NULL THEN w.evidence END AS evidence,
       w.sv IS NOT NULL AND NOT w.grounded AS ungrounded, w.sv IS NOT NULL AND NOT w.verified AS unverified
FROM won JOIN patients p USING (patient_id)"""


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
        columns[q.id] = _typed(winners[value].take(index), q)
        columns[f"{q.id}__note_id"] = winners["note_id"].take(index)
        columns[f"{q.id}__evidence"] = winners["evidence"].take(index)
        if job.review.require_grounded_evidence:
            columns[f"{q.id}__ungrounded"] = winners["ungrounded"].take(index).fill_null(False)
        if job.review.require_verified_answers:
            columns[f"{q.id}__unverified"] = winners["unverified"].take(index).fill_null(False)
    return columns


def _typed(ranked: pa.Array, question: QuestionSpec) -> pa.Array:
    """A winner's value as the patient table types it: a date from its day number, a choice from its position."""
    if question.type == "date":
        return pc.cast(pc.cast(ranked, pa.int32()), pa.date32())
    if question.type == "categorical":
        return pa.chunked_array([pa.array(question.choices, pa.string()).take(pc.cast(ranked, pa.int64()))])
    return ranked


def _row_values_sql() -> str:
    """Each answer row with its per-note value: vb (yes_no), vn (numeric, canonical; date: day number; categorical:
    position among the choices), sv (sortable), and whether its note is in the question's window (in_window: TRUE
    without a window or without a charttime, NULL when the patient's index date is unknown). A row outside its window
    says nothing: it is left out, except that it says "no" for an absent: "no" question rolled up with any (nothing
    documented in the window), so that a patient none of whose notes fall in the window is "no" there and unknown for
    the other questions."""
    return f"""
  SELECT * EXCLUDE (vb, vn, answered, evidence, grounded, verified), CASE WHEN in_window THEN vb WHEN NOT in_window AND says_no THEN FALSE END AS vb,
         CASE WHEN in_window THEN vn END AS vn, CASE WHEN in_window THEN evidence END AS evidence,
         CASE WHEN in_window THEN coalesce(vn, vb::DOUBLE) WHEN NOT in_window AND says_no THEN 0 END AS sv,
         answered AND in_window IS TRUE AS answered, grounded OR in_window IS FALSE AS grounded,
         verified OR in_window IS FALSE AS verified, (grounded AND verified) OR in_window IS FALSE AS trusted FROM (
    SELECT a.patient_id, a.note_id, q.qidx, a.charttime, a.evidence, q.rollup, q.windowed,
           q.absent_no AND q.rollup = 'any' AS says_no,
           CASE WHEN NOT q.windowed OR a.charttime IS NULL THEN TRUE
                WHEN ix.__index IS NULL THEN NULL
                ELSE a.charttime::DATE BETWEEN
                     CASE WHEN q.lookback IS NULL THEN DATE '0001-01-01' ELSE (ix.__index - CAST(q.lookback AS INTERVAL))::DATE END
                     AND (ix.__index + CAST(q.lookahead AS INTERVAL))::DATE END AS in_window,
           coalesce(a.status = 'answered', FALSE) AS answered,
           CASE WHEN NOT g.required OR a.status IS DISTINCT FROM 'answered' THEN TRUE
                ELSE coalesce(list_contains(g.accepted, a.grounding), FALSE) END AS grounded,
           NOT coalesce(g.verified_required AND a.verified IS FALSE AND a.model IS DISTINCT FROM '{CUE_MODEL_NAME}',
                        FALSE) AS verified,
           CASE WHEN q.qtype = 'yes_no' THEN CASE
               WHEN a.status = 'answered' THEN a.value_bool
               WHEN a.status = 'not_in_note' AND q.absent_no THEN FALSE END END AS vb,
           CASE WHEN q.qtype = 'numeric' AND a.status = 'answered' AND isfinite(a.value_num) THEN
               {canonical_sql("a.value_num", "u.factor", "q.cap")}
                WHEN q.qtype = 'date' AND a.status = 'answered' THEN date_diff('day', {EPOCH}, a.value_date)::DOUBLE
                WHEN q.qtype = 'categorical' AND a.status = 'answered' THEN
                    nullif(list_position(q.choices, a.value_text), 0)::DOUBLE - 1 END AS vn
    FROM answers a
    JOIN questions q ON q.question_id = a.question_id
    LEFT JOIN patients ix ON ix.patient_id = a.patient_id
    CROSS JOIN grounding_rule g
    LEFT JOIN units u ON u.question_id = a.question_id AND u.unit_key = coalesce(a.unit, '')
    WHERE a.patient_id BETWEEN $1 AND $2)"""


def _patients_sql(job: JobSpec) -> str:
    """One row per patient (pidx = rank by patient_id): note count, structured values of the latest note.

    Structured values are the same on every row of a note; each one is taken from the latest note (by
    charttime, then note id) that has it, so a missing age in a new note does not hide an older one.
    """
    pick = "ORDER BY charttime DESC NULLS LAST, note_id DESC"
    columns = [quoted(c) for c in job.input.structured]
    per_note = "".join(f", any_value({c}) AS {c}" for c in columns)
    latest = "".join(f", first({c} {pick}) FILTER (WHERE {c} IS NOT NULL) AS {c}" for c in columns)
    if not job.uses_index_date:
        return f"""
WITH notes AS (SELECT patient_id, note_id, any_value(charttime) AS charttime{per_note} FROM answers GROUP BY ALL)
SELECT (row_number() OVER (ORDER BY patient_id) - 1)::BIGINT AS pidx, patient_id, count(*)::BIGINT AS n_notes{latest},
       NULL::DATE AS __index
FROM notes GROUP BY patient_id"""
    keep = "".join(f", {quoted(c)}" for c in _structured_columns(job))
    spec = job.index
    if spec is not None and spec.column:
        c = quoted(spec.column)
        given, source = f"first(TRY_CAST({c} AS DATE) {pick}) FILTER (WHERE TRY_CAST({c} AS DATE) IS NOT NULL)", "column"
    elif spec is not None and spec.uri:
        given, source = "any_value(t.index_date)", "table"
    else:
        given, source = "NULL::DATE", None
    fallback = "max(charttime)::DATE" if spec is None or spec.missing == "latest_note" else "NULL::DATE"
    join = "LEFT JOIN index_table t USING (patient_id)" if spec is not None and spec.uri else ""
    return f"""
WITH notes AS (SELECT patient_id, note_id, any_value(charttime) AS charttime{per_note} FROM answers GROUP BY ALL),
per_patient AS (
  SELECT patient_id, count(*)::BIGINT AS n_notes{latest}, {given} AS given, {fallback} AS fallback
  FROM notes {join} GROUP BY patient_id)
SELECT (row_number() OVER (ORDER BY patient_id) - 1)::BIGINT AS pidx, patient_id, n_notes{keep},
       coalesce(given, fallback) AS index_date, coalesce(given, fallback) AS __index,
       CASE WHEN given IS NOT NULL THEN '{source}' WHEN fallback IS NOT NULL THEN 'latest_note' END AS index_date_source
FROM per_patient"""

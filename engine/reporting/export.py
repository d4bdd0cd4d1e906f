"""Answers as OMOP CDM v5.4 NOTE_NLP rows (`engine export --format omop-note-nlp`).

One NOTE_NLP row per answered (note, question) pair; "not in note" and error rows are not exported (they are
counted for the summary). The columns, in CDM order:

  note_nlp_id                 1, 2, ... over (note_id as an integer, question order in the job, shard, input row):
                              the same answers give the same ids
  note_id                     the engine's note id (a string) as an integer; a note id that is not one (e.g.
                              MIMIC's "10000032-DS-21") is an ExportError naming it
  section_concept_id          0 (the engine does not classify sections)
  snippet                     the evidence quote, at most 250 characters (CDM varchar(250)); null without one
  offset                      evidence_start (characters into the note) as a string, null where the quote was not
                              found in the note (grounding not_found or no quote)
  lexical_variant             the evidence quote (at most 250 characters), or the question id without one
  note_nlp_concept_id         the question's `concept_id` in the job, 0 where it has none
  note_nlp_source_concept_id  0
  nlp_system                  "engine <version> <job name> <model>" (the row's `model`: `cues` where no model
                              answered), at most 250 characters
  nlp_date, nlp_datetime      when the run started (the output folder's _engine.json), else the export's time (UTC)
  term_exists                 "N" for a yes/no answered "no", or where the cue mentions' context (cue_flags)
                              includes negated, family or hypothetical; else "Y"
  term_temporal               "historical" where cue_flags includes historical, else null
  term_modifiers              question=<id>;value=<yes|no|number>;unit=<unit>;status=answered;grounding=<...>;
                              route=<...>;flags=<cue_flags> (parts without a value left out; at most 2000 characters)

The answers are read where they lie (answers/ through DuckDB, only the columns named), as roll-up reads them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from engine import __version__
from engine.store.answers import Answers, answers_dataset, connect, query_dicts
from engine.errors import ExportError
from engine.job import JobSpec

NOTE_NLP_SCHEMA = pa.schema([  # OMOP CDM v5.4 NOTE_NLP, in its column order; NOT NULL columns not nullable
    pa.field("note_nlp_id", pa.int64(), nullable=False),
    pa.field("note_id", pa.int64(), nullable=False),
    pa.field("section_concept_id", pa.int32()),
    pa.field("snippet", pa.string()),
    pa.field("offset", pa.string()),
    pa.field("lexical_variant", pa.string(), nullable=False),
    pa.field("note_nlp_concept_id", pa.int32()),
    pa.field("note_nlp_source_concept_id", pa.int32()),
    pa.field("nlp_system", pa.string()),
    pa.field("nlp_date", pa.date32(), nullable=False),
    pa.field("nlp_datetime", pa.timestamp("us")),
    pa.field("term_exists", pa.string()),
    pa.field("term_temporal", pa.string()),
    pa.field("term_modifiers", pa.string()),
])
NOT_EXISTING = ("negated", "family", "hypothetical")  # context that makes a mention not the patient's current fact
EXPORTED_STATUS = "answered"
BASENAME = "note_nlp"
FILE_FORMATS = ("parquet", "csv", "both")

# A note id is exported only in its canonical integer form ('007', ' 7' and '+7' would all become 7).
_NOT_AN_INTEGER = "(note_id IS NULL OR CAST(TRY_CAST(note_id AS BIGINT) AS VARCHAR) IS DISTINCT FROM note_id)"

_CHECK_SQL = f"""
SELECT count(*) FILTER (WHERE {_NOT_AN_INTEGER}) AS bad_ids,
       count(DISTINCT note_id) FILTER (WHERE {_NOT_AN_INTEGER}) AS bad_distinct,
       min(note_id) FILTER (WHERE {_NOT_AN_INTEGER}) AS first_bad,
       list(DISTINCT question_id ORDER BY question_id) FILTER (WHERE question_id IS NULL
            OR question_id NOT IN (SELECT question_id FROM questions)) AS unknown_questions
FROM answers WHERE status = '{EXPORTED_STATUS}'"""

_NOTE_NLP_SQL = f"""
WITH exported AS (
    SELECT a.note_id, a.question_id, a.status, a.value_bool, a.value_num, a.unit, {{dated}}, nullif(a.evidence, '') AS evidence,
           a.evidence_start, a.grounding, a.route, a.model, nullif(a.cue_flags, '') AS cue_flags, a.shard_id,
           a.row_number, q.ordinal, q.concept_id, string_split(coalesce(a.cue_flags, ''), ',') AS flags
    FROM answers AS a JOIN questions AS q USING (question_id)
    WHERE a.status = '{EXPORTED_STATUS}'
)
SELECT row_number() OVER (ORDER BY CAST(note_id AS BIGINT), ordinal, shard_id, row_number) AS note_nlp_id,
       CAST(note_id AS BIGINT) AS note_id,
       0 AS section_concept_id,
       left(evidence, 250) AS snippet,
       CASE WHEN grounding IN ('exact', 'fuzzy') THEN CAST(evidence_start AS VARCHAR) END AS "offset",
       left(coalesce(evidence, question_id), 250) AS lexical_variant,
       coalesce(concept_id, 0) AS note_nlp_concept_id,
       0 AS note_nlp_source_concept_id,
       left($system || coalesce(model, $model), 250) AS nlp_system,
       CAST($processed AS DATE) AS nlp_date,
       CAST($processed AS TIMESTAMP) AS nlp_datetime,
       CASE WHEN value_bool IS FALSE OR list_has_any(flags, {list(NOT_EXISTING)}) THEN 'N' ELSE 'Y' END AS term_exists,
       CASE WHEN list_contains(flags, 'historical') THEN 'historical' END AS term_temporal,
       left(concat_ws(';', 'question=' || question_id,
                      'value=' || CASE WHEN value_bool IS NOT NULL THEN CASE WHEN value_bool THEN 'yes' ELSE 'no' END
                                       WHEN value_num IS NOT NULL THEN printf('%.15g', value_num)
                                       WHEN value_date IS NOT NULL THEN strftime(value_date, '%Y-%m-%d')
                                       ELSE value_text END,
                      'phrase=' || CASE WHEN value_date IS NOT NULL THEN replace(value_text, ';', ',') END,
                      'unit=' || unit, 'status=' || status, 'grounding=' || grounding, 'route=' || route,
                      'flags=' || cue_flags), 2000) AS term_modifiers
FROM exported
ORDER BY note_nlp_id"""


def note_nlp_table(answers: Answers, job: JobSpec, processed_at: datetime | None = None) -> pa.Table:
    """The answered rows of `answers` (a table or the committed dataset) as NOTE_NLP rows (NOTE_NLP_SCHEMA).

    `processed_at` (default now) gives nlp_date and nlp_datetime, in UTC. Raises ExportError when an answered
    row's note id is not an integer, or names a question the job does not have (export with the job that wrote
    the answers: concept ids come from it)."""
    processed = _utc(processed_at or datetime.now(timezone.utc))
    con = connect(answers)
    con.register("questions", pa.table({
        "question_id": pa.array([q.id for q in job.questions], pa.string()),
        "ordinal": pa.array(range(len(job.questions)), pa.int32()),
        "concept_id": pa.array([q.concept_id for q in job.questions], pa.int32()),
    }))
    _check(query_dicts(con, _CHECK_SQL)[0], job)
    names = answers.schema.names  # answers written before date and categorical questions lack their columns
    dated = ", ".join(f"a.{c}" if c in names else f"NULL::{t} AS {c}" for c, t in (("value_date", "DATE"), ("value_text", "VARCHAR")))
    result = con.execute(_NOTE_NLP_SQL.replace("{dated}", dated), {"system": f"engine {__version__} {job.name} ", "model": job.model.name,
                                         "processed": processed}).fetch_arrow_table()
    return pa.Table.from_arrays([result[f.name].cast(f.type) for f in NOTE_NLP_SCHEMA], schema=NOTE_NLP_SCHEMA)


def _check(found: dict, job: JobSpec) -> None:
    if found["bad_ids"]:
        value = "a missing (null) note_id" if found["first_bad"] is None else f"note_id {found['first_bad']!r}"
        count = found["bad_distinct"] + (found["first_bad"] is None)
        more = f" ({count} distinct note ids of answered rows are not)" if count > 1 else ""
        raise ExportError(
            f"{value} is not an integer{more}, but OMOP NOTE_NLP.note_id is the integer id of a NOTE row: map the note "
            "ids to your OMOP note_id integers (e.g. run with input.note_id naming a column that holds them) and export again")
    unknown = found["unknown_questions"] or []
    if unknown:
        shown = ", ".join(str(q) for q in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ExportError(f"the answers hold question(s) {shown} that job {job.name!r} does not have: "
                          "export with the job file that wrote them")


def _utc(moment: datetime) -> datetime:
    """A naive datetime in UTC to the second (an aware one converted; a naive one taken as UTC already)."""
    moment = moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment
    return moment.replace(microsecond=0)


def rows_by_status(answers: Answers) -> dict[str, int]:
    """{status: answer rows}: what was exported (answered) and what was skipped (not_in_note, error)."""
    rows = query_dicts(connect(answers), "SELECT coalesce(status, 'null') AS status, count(*) AS n FROM answers GROUP BY ALL")
    return {r["status"]: r["n"] for r in rows}


def write_note_nlp(table: pa.Table, output_uri: str, file_format: str = "parquet", storage_options: dict | None = None) -> list[str]:
    """Write note_nlp.parquet and/or note_nlp.csv (header row, RFC 4180 quoting) to a folder; return their paths."""
    from engine.store.layout import OutputStore
    from engine.storage import join

    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format {file_format!r}: one of {', '.join(FILE_FORMATS)}")
    store = OutputStore(output_uri, dict(storage_options or {}))
    written = []
    if file_format in ("parquet", "both"):
        store.write_table(f"{BASENAME}.parquet", table)
        written.append(f"{BASENAME}.parquet")
    if file_format in ("csv", "both"):
        buffer = io.BytesIO()
        pacsv.write_csv(table, buffer)
        store.write_bytes(f"{BASENAME}.csv", buffer.getvalue())
        written.append(f"{BASENAME}.csv")
    return [join(store.fs, output_uri, name) for name in written]


@dataclass
class ExportSummary:
    rows: int
    term_exists: dict[str, int]
    rows_by_status: dict[str, int]
    processed_at: datetime
    processed_from: str  # where nlp_date came from
    paths: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> dict[str, int]:
        return {s: n for s, n in sorted(self.rows_by_status.items()) if s != EXPORTED_STATUS}


def export_note_nlp(job: JobSpec, answers_uri: str, output_uri: str, file_format: str = "parquet",
                    run_folder: str | None = None, now: datetime | None = None) -> ExportSummary:
    """Read the committed answers (an output folder or its answers/ folder), write NOTE_NLP to `output_uri`.

    nlp_date is the day the run started, from `run_folder`'s _engine.json, where there is one; else `now`."""
    options = job.output.storage_options
    answers = answers_dataset(answers_uri, options)
    started = run_started(run_folder, options) if run_folder else None
    processed_at = started or _utc(now or datetime.now(timezone.utc))
    table = note_nlp_table(answers, job, processed_at)
    counts = {r["values"]: r["counts"] for r in pc.value_counts(table["term_exists"]).to_pylist()} if table.num_rows else {}
    paths = write_note_nlp(table, output_uri, file_format, options)
    return ExportSummary(table.num_rows, counts, rows_by_status(answers), processed_at,
                         "the run's start (_engine.json)" if started else "this export", paths)


def run_started(run_folder: str, storage_options: dict | None = None) -> datetime | None:
    """When `engine run` first wrote this output folder (its _engine.json's `created`, UTC); None if unknown."""
    from engine.store.layout import MANIFEST, OutputStore

    try:
        manifest = OutputStore(run_folder, dict(storage_options or {})).read_json(MANIFEST) or {}
        return datetime.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ")
    except (OSError, ValueError, KeyError, TypeError):
        return None

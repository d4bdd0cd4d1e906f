"""engine.reporting.export and `engine export --format omop-note-nlp`: answers/ as OMOP CDM v5.4 NOTE_NLP rows.

Answer tables are built with the engine's own answers schema (engine.store.layout) and, for the command, committed as
real Parquet shards with OutputStore, as `engine run` writes them."""

from __future__ import annotations

import random
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from engine import __version__
from engine.cli import app
from engine.errors import EngineError, ExportError
from engine.reporting.export import NOTE_NLP_SCHEMA, export_note_nlp, note_nlp_table, rows_by_status, write_note_nlp
from engine.job import JobSpec
from engine.store.layout import ANSWER_COLUMNS, MANIFEST, OutputStore, answer_schema, to_answer_table

CDM_COLUMNS = [  # OMOP CDM v5.4 NOTE_NLP, in the CDM's order
    "note_nlp_id", "note_id", "section_concept_id", "snippet", "offset", "lexical_variant", "note_nlp_concept_id",
    "note_nlp_source_concept_id", "nlp_system", "nlp_date", "nlp_datetime", "term_exists", "term_temporal", "term_modifiers",
]
AFIB, CREATININE = 313217, 3016723
PROCESSED = datetime(2025, 3, 4, 5, 6, 7)

JOB_DATA = {
    "name": "export-test",
    "input": {"uri": "notes.parquet", "structured": ["age"]},
    "output": {"uri": "out"},
    "model": {"name": "some/model-8b"},
    "questions": [
        {"id": "afib", "type": "yes_no", "question": "Does the note document atrial fibrillation?", "concept_id": AFIB},
        {"id": "creatinine_max", "type": "numeric", "question": "Highest serum creatinine in the note?", "unit": "mg/dL",
         "units": {"mg/dL": 1.0, "umol/L": 0.0113}, "maximum": 30.0, "concept_id": CREATININE},
        {"id": "prior_stroke", "type": "yes_no", "question": "Does the note document a prior stroke?"},
    ],
}
JOB = JobSpec.model_validate(JOB_DATA)
SCHEMA = answer_schema(JOB, pa.schema([("age", pa.int64())]))


def answer(note_id: str, question_id: str, status: str = "answered", row_number: int = 0, **values) -> dict:
    """One answers/ row with the columns `engine run` fills for it."""
    row = {name: None for name in ANSWER_COLUMNS if name != "job_fingerprint"}
    row.update(patient_id=f"p{note_id}", note_id=note_id, question_id=question_id, status=status, route="model",
               model="some/model-8b", candidates=1, truncated=False, prompt_tokens=900, cached_tokens=800,
               completion_tokens=12, row_number=row_number, shard_id="s0", age=70)
    if status == "error":
        row.update(error="reached model.max_tokens")
    row.update(values)
    return row


def answers_table(rows: list[dict]) -> pa.Table:
    batch = pa.Table.from_pylist(rows, schema=pa.schema([f for f in SCHEMA if f.name != "job_fingerprint"]))
    return to_answer_table(batch, SCHEMA, JOB.fingerprint())


def quote(text: str, start: int, grounding: str = "exact", **values) -> dict:
    return dict(evidence=text, evidence_start=start, evidence_end=start + len(text), grounding=grounding, **values)


ROWS = [
    # note 12: afib yes, creatinine 1.9 mg/dL, prior stroke historical
    answer("12", "afib", row_number=1, value_bool=True, **quote("atrial fibrillation on apixaban", 40)),
    answer("12", "creatinine_max", row_number=1, value_num=1.9, unit="mg/dL", **quote("Cr 1.9", 200)),
    answer("12", "prior_stroke", row_number=1, value_bool=True, cue_flags="historical", route="lexical", model="cues",
           **quote("history of stroke in 2019", 10)),
    # note 3: afib answered no, creatinine not in note, stroke an error
    answer("3", "afib", row_number=0, value_bool=False, **quote("no atrial fibrillation", 5)),
    answer("3", "creatinine_max", "not_in_note", row_number=0, route="no_candidate", model="cues"),
    answer("3", "prior_stroke", "error", row_number=0),
    # note 40: a yes whose mentions were negated / family; a number whose quote was not found; no quote at all
    answer("40", "afib", row_number=2, value_bool=True, cue_flags="family,historical", **quote("mother had AF", 0)),
    answer("40", "creatinine_max", row_number=2, value_num=120.0, unit="umol/L", **quote("creat 120", 9, grounding="not_found")),
    answer("40", "prior_stroke", row_number=2, value_bool=True, cue_flags="negated", grounding=None),
    # note 41: hypothetical, and a quote longer than the CDM's 250 characters
    answer("41", "afib", row_number=3, value_bool=True, cue_flags="hypothetical", **quote("if AF " + "x" * 300, 7, grounding="fuzzy")),
    answer("41", "creatinine_max", "not_in_note", row_number=3, route="no_candidate", model="cues"),
    answer("41", "prior_stroke", "not_in_note", row_number=3, route="no_candidate", model="cues"),
]


@pytest.fixture(scope="module")
def note_nlp() -> pa.Table:
    return note_nlp_table(answers_table(ROWS), JOB, PROCESSED)


def by_key(table: pa.Table) -> dict[tuple[int, str], dict]:
    """NOTE_NLP rows by (note id, question id), read back from term_modifiers."""
    return {(r["note_id"], r["term_modifiers"].split(";")[0].removeprefix("question=")): r for r in table.to_pylist()}


def test_columns_and_types_are_cdm_v54_note_nlp_in_order(note_nlp):
    assert note_nlp.column_names == CDM_COLUMNS
    assert note_nlp.schema == NOTE_NLP_SCHEMA
    types = {f.name: f.type for f in note_nlp.schema}
    assert types["note_nlp_id"] == types["note_id"] == pa.int64()
    assert {types[c] for c in ("section_concept_id", "note_nlp_concept_id", "note_nlp_source_concept_id")} == {pa.int32()}
    assert {types[c] for c in ("snippet", "offset", "lexical_variant", "nlp_system", "term_exists", "term_temporal",
                               "term_modifiers")} == {pa.string()}
    assert types["nlp_date"] == pa.date32() and types["nlp_datetime"] == pa.timestamp("us")
    required = {f.name for f in note_nlp.schema if not f.nullable}
    assert required == {"note_nlp_id", "note_id", "lexical_variant", "nlp_date"}  # NOT NULL in the CDM


def test_only_answered_rows_are_exported_in_note_and_question_order(note_nlp):
    assert note_nlp.num_rows == 8  # 12 answer rows less 3 not_in_note and 1 error
    assert note_nlp["note_nlp_id"].to_pylist() == list(range(1, 9))
    order = [(r["note_id"], r["term_modifiers"].split(";")[0]) for r in note_nlp.to_pylist()]
    assert order == [(3, "question=afib"), (12, "question=afib"), (12, "question=creatinine_max"), (12, "question=prior_stroke"),
                     (40, "question=afib"), (40, "question=creatinine_max"), (40, "question=prior_stroke"), (41, "question=afib")]
    assert rows_by_status(answers_table(ROWS)) == {"answered": 8, "not_in_note": 3, "error": 1}


def test_ids_are_deterministic_whatever_the_row_order(note_nlp):
    shuffled = ROWS[:]
    random.Random(7).shuffle(shuffled)
    assert note_nlp_table(answers_table(shuffled), JOB, PROCESSED).equals(note_nlp)


def test_concept_ids_come_from_the_job_and_zero_without_one(note_nlp):
    rows = by_key(note_nlp)
    assert rows[(12, "afib")]["note_nlp_concept_id"] == AFIB
    assert rows[(12, "creatinine_max")]["note_nlp_concept_id"] == CREATININE
    assert rows[(12, "prior_stroke")]["note_nlp_concept_id"] == 0
    assert set(note_nlp["section_concept_id"].to_pylist()) == set(note_nlp["note_nlp_source_concept_id"].to_pylist()) == {0}


def test_term_exists_from_the_answer_and_the_cue_context(note_nlp):
    exists = {key: r["term_exists"] for key, r in by_key(note_nlp).items()}
    assert exists == {
        (3, "afib"): "N",  # answered "no"
        (12, "afib"): "Y", (12, "creatinine_max"): "Y",
        (12, "prior_stroke"): "Y",  # historical is still the patient's fact
        (40, "afib"): "N",  # family
        (40, "creatinine_max"): "Y",
        (40, "prior_stroke"): "N",  # negated
        (41, "afib"): "N",  # hypothetical
    }
    temporal = {key: r["term_temporal"] for key, r in by_key(note_nlp).items() if r["term_temporal"]}
    assert temporal == {(12, "prior_stroke"): "historical", (40, "afib"): "historical"}


def test_values_units_and_context_go_in_term_modifiers(note_nlp):
    rows = by_key(note_nlp)
    assert rows[(12, "creatinine_max")]["term_modifiers"] == \
        "question=creatinine_max;value=1.9;unit=mg/dL;status=answered;grounding=exact;route=model"
    assert rows[(40, "creatinine_max")]["term_modifiers"] == \
        "question=creatinine_max;value=120;unit=umol/L;status=answered;grounding=not_found;route=model"
    assert rows[(3, "afib")]["term_modifiers"] == "question=afib;value=no;status=answered;grounding=exact;route=model"
    assert rows[(40, "afib")]["term_modifiers"].endswith(";flags=family,historical")
    assert rows[(40, "prior_stroke")]["term_modifiers"] == "question=prior_stroke;value=yes;status=answered;route=model;flags=negated"


def test_snippet_offset_and_lexical_variant(note_nlp):
    rows = by_key(note_nlp)
    assert (rows[(12, "creatinine_max")]["snippet"], rows[(12, "creatinine_max")]["offset"]) == ("Cr 1.9", "200")
    assert rows[(12, "creatinine_max")]["lexical_variant"] == "Cr 1.9"
    assert rows[(40, "creatinine_max")]["offset"] is None  # the quote is not in the note
    assert rows[(40, "creatinine_max")]["snippet"] == "creat 120"
    no_quote = rows[(40, "prior_stroke")]
    assert (no_quote["snippet"], no_quote["offset"], no_quote["lexical_variant"]) == (None, None, "prior_stroke")
    long = rows[(41, "afib")]
    assert long["offset"] == "7"  # a fuzzy match is grounded
    assert len(long["snippet"]) == len(long["lexical_variant"]) == 250 and long["snippet"].startswith("if AF x")


def test_nlp_system_and_dates(note_nlp):
    rows = by_key(note_nlp)
    assert rows[(12, "afib")]["nlp_system"] == f"engine {__version__} export-test some/model-8b"
    assert rows[(12, "prior_stroke")]["nlp_system"] == f"engine {__version__} export-test cues"
    assert set(note_nlp["nlp_date"].to_pylist()) == {date(2025, 3, 4)}
    assert set(note_nlp["nlp_datetime"].to_pylist()) == {PROCESSED}
    aware = note_nlp_table(answers_table(ROWS[:1]), JOB, datetime(2025, 3, 4, 23, 30, tzinfo=timezone.utc).astimezone())
    assert aware["nlp_datetime"].to_pylist() == [datetime(2025, 3, 4, 23, 30)]  # written in UTC


@pytest.mark.parametrize("bad", ["10000032-DS-21", "007", " 7", "1.0", "+7"])
def test_a_note_id_that_is_not_an_integer_is_a_one_line_error_naming_it(bad):
    rows = ROWS[:3] + [answer(bad, "afib", value_bool=True, **quote("AF", 0))]
    with pytest.raises(ExportError) as caught:
        note_nlp_table(answers_table(rows), JOB, PROCESSED)
    message = str(caught.value)
    assert isinstance(caught.value, EngineError) and "\n" not in message
    assert message.startswith(f"note_id {bad!r} is not an integer")
    assert "map the note ids" in message


def test_the_error_counts_the_note_ids_and_skipped_rows_are_not_checked():
    rows = [answer(f"n-{i}", "afib", value_bool=True, **quote("AF", 0)) for i in range(3)]
    with pytest.raises(ExportError, match=r"note_id 'n-0' is not an integer \(3 distinct note ids of answered rows are not\)"):
        note_nlp_table(answers_table(rows), JOB, PROCESSED)
    skipped_only = ROWS[:2] + [answer("bad-null-text", "afib", "error"), answer("x", "afib", "not_in_note")]
    assert note_nlp_table(answers_table(skipped_only), JOB, PROCESSED).num_rows == 2


def test_answers_of_a_question_the_job_lacks_are_refused():
    rows = ROWS[:2] + [answer("12", "lvef_min", value_num=35.0, unit="%", **quote("EF 35%", 0))]
    with pytest.raises(ExportError, match="question\\(s\\) lvef_min that job 'export-test' does not have"):
        note_nlp_table(answers_table(rows), JOB, PROCESSED)


def test_no_answered_rows_gives_an_empty_typed_table():
    empty = note_nlp_table(answers_table([answer("3", "afib", "not_in_note")]), JOB, PROCESSED)
    assert empty.num_rows == 0 and empty.schema == NOTE_NLP_SCHEMA


def test_parquet_and_csv_are_written_and_read_back(note_nlp, tmp_path):
    paths = write_note_nlp(note_nlp, str(tmp_path / "omop"), "both")
    assert [Path(p).name for p in paths] == ["note_nlp.parquet", "note_nlp.csv"]
    assert pq.read_table(tmp_path / "omop" / "note_nlp.parquet").equals(note_nlp)
    convert = pacsv.ConvertOptions(column_types=NOTE_NLP_SCHEMA, strings_can_be_null=True, quoted_strings_can_be_null=False)
    from_csv = pacsv.read_csv(tmp_path / "omop" / "note_nlp.csv", convert_options=convert)
    assert from_csv.column_names == CDM_COLUMNS
    assert from_csv.cast(NOTE_NLP_SCHEMA).equals(note_nlp)
    assert [Path(p).name for p in write_note_nlp(note_nlp, str(tmp_path / "csv-only"), "csv")] == ["note_nlp.csv"]
    assert not (tmp_path / "csv-only" / "note_nlp.parquet").exists()


def test_duckdb_loads_note_nlp_parquet(note_nlp, tmp_path):
    write_note_nlp(note_nlp, str(tmp_path), "parquet")
    path = str(tmp_path / "note_nlp.parquet")
    con = duckdb.connect()
    described = con.sql(f"DESCRIBE SELECT * FROM '{path}'").fetchall()
    assert [(name, kind) for name, kind, *_ in described] == [
        ("note_nlp_id", "BIGINT"), ("note_id", "BIGINT"), ("section_concept_id", "INTEGER"), ("snippet", "VARCHAR"),
        ("offset", "VARCHAR"), ("lexical_variant", "VARCHAR"), ("note_nlp_concept_id", "INTEGER"),
        ("note_nlp_source_concept_id", "INTEGER"), ("nlp_system", "VARCHAR"), ("nlp_date", "DATE"),
        ("nlp_datetime", "TIMESTAMP"), ("term_exists", "VARCHAR"), ("term_temporal", "VARCHAR"), ("term_modifiers", "VARCHAR")]
    rows = con.sql(f"""SELECT note_id, "offset", term_exists FROM '{path}'
                       WHERE note_nlp_concept_id = {AFIB} ORDER BY note_nlp_id""").fetchall()
    assert rows == [(3, "5", "N"), (12, "40", "Y"), (40, "0", "N"), (41, "7", "N")]


# --- the command ---------------------------------------------------------------------------------------------

def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "10000"})


@pytest.fixture
def run_folder(tmp_path) -> tuple[Path, Path]:
    """A job file and an output folder holding two committed answers/ shards and a manifest, as `engine run` leaves them."""
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(JOB_DATA, sort_keys=False), encoding="utf-8")
    folder = tmp_path / "out"
    store = OutputStore(str(folder), {})
    store.commit_shard("s0", answers_table(ROWS[:6]))
    store.commit_shard("s1", answers_table(ROWS[6:]))
    store.write_json(MANIFEST, {"job_name": JOB.name, "job_fingerprint": JOB.fingerprint(), "created": "2025-01-02T03:04:05Z"})
    return job_path, folder


def test_export_command_writes_note_nlp_from_committed_answers(run_folder, tmp_path):
    job_path, folder = run_folder
    result = invoke("export", str(job_path), "--answers", str(folder), "--format", "omop-note-nlp",
                    "--output", str(tmp_path / "omop"), "--file-format", "both")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "omop-note-nlp: 8 rows from 8 answered rows (term_exists Y 4, N 4); skipped rows: 1 error, 3 not_in_note"
    assert lines[1] == "nlp_date 2025-01-02 (from the run's start (_engine.json))"
    assert lines[2].startswith("Written: ") and "note_nlp.parquet" in lines[2] and "note_nlp.csv" in lines[2]
    written = pq.read_table(tmp_path / "omop" / "note_nlp.parquet")
    expected = note_nlp_table(answers_table(ROWS), JOB, datetime(2025, 1, 2, 3, 4, 5))
    assert written.equals(expected)
    assert (tmp_path / "omop" / "note_nlp.csv").read_text(encoding="utf-8").startswith('"note_nlp_id","note_id",')
    count, = duckdb.sql(f"SELECT count(*) FROM '{tmp_path / 'omop' / 'note_nlp.parquet'}' WHERE term_exists = 'Y'").fetchone()
    assert count == 4


def test_export_command_takes_the_answers_folder_itself(run_folder, tmp_path):
    job_path, folder = run_folder
    result = invoke("export", str(job_path), "--answers", str(folder / "answers"), "--format", "omop-note-nlp",
                    "--output", str(tmp_path / "omop"))
    assert result.exit_code == 0, result.output
    assert "nlp_date 2025-01-02" in result.stdout
    assert (tmp_path / "omop" / "note_nlp.parquet").exists() and not (tmp_path / "omop" / "note_nlp.csv").exists()


def test_export_without_a_manifest_dates_the_rows_today(run_folder, tmp_path):
    job_path, folder = run_folder
    (folder / MANIFEST).unlink()
    summary = export_note_nlp(JOB, str(folder), str(tmp_path / "omop"), "parquet", run_folder=str(folder),
                              now=datetime(2026, 5, 6, 7, 8, 9, tzinfo=timezone.utc))
    assert summary.processed_from == "this export" and summary.processed_at == datetime(2026, 5, 6, 7, 8, 9)
    assert set(pq.read_table(tmp_path / "omop" / "note_nlp.parquet")["nlp_date"].to_pylist()) == {date(2026, 5, 6)}


def test_export_command_errors_are_one_line(run_folder, tmp_path):
    job_path, folder = run_folder
    OutputStore(str(folder), {}).commit_shard("s2", answers_table([answer("10000032-DS-21", "afib", value_bool=True, **quote("AF", 0))]))
    args = ["--format", "omop-note-nlp", "--output", str(tmp_path / "omop")]
    for result, expected in ((invoke("export", str(job_path), "--answers", str(folder), *args), "Error: note_id '10000032-DS-21' is not an integer"),
                             (invoke("export", str(job_path), "--answers", str(tmp_path / "missing"), *args), "Error: no answers under")):
        assert result.exit_code == 1, result.output
        assert result.stdout == "" and "Traceback" not in result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (tmp_path / "omop").exists()


def test_export_command_refuses_an_unknown_format(run_folder, tmp_path):
    job_path, folder = run_folder
    result = invoke("export", str(job_path), "--answers", str(folder), "--format", "fhir", "--output", str(tmp_path / "omop"))
    assert result.exit_code == 2 and "omop-note-nlp" in result.output


def test_date_and_choice_answers_go_in_term_modifiers_with_the_phrase():
    import datetime as dt

    data = {**JOB_DATA, "questions": [
        {"id": "stroke_date", "type": "date", "question": "When did the stroke occur?"},
        {"id": "af_type", "type": "categorical", "question": "Which type of AF?", "choices": ["paroxysmal", "permanent"]}]}
    job = JobSpec.model_validate(data)
    schema = answer_schema(job, pa.schema([("age", pa.int64())]))
    rows = [answer("5", "stroke_date", value_date=dt.date(2026, 2, 24), value_text="2 weeks ago", **quote("stroke 2 weeks ago", 3)),
            answer("5", "af_type", value_text="paroxysmal", **quote("paroxysmal AF", 30))]
    table = to_answer_table(pa.Table.from_pylist(rows, schema=pa.schema([f for f in schema if f.name != "job_fingerprint"])),
                            schema, job.fingerprint())
    got = by_key(note_nlp_table(table, job, PROCESSED))
    assert got[(5, "stroke_date")]["term_modifiers"] == \
        "question=stroke_date;value=2026-02-24;phrase=2 weeks ago;status=answered;grounding=exact;route=model"
    assert got[(5, "af_type")]["term_modifiers"] == "question=af_type;value=paroxysmal;status=answered;grounding=exact;route=model"

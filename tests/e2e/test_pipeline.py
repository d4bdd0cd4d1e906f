"""End to end on real components: local Ray, Ray Data actors, a real vLLM CPU engine (tiny random model).

A random model answers noise; the grammar is what makes it parse. These tests check plumbing and guarantees:
one row per (note, question), exact types, every answered row valid, statuses add up, resume, refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import E2E_NOTES, E2E_SAMPLE_NOTES, job_for
from engine.errors import OutputError
from engine.store.answers import read_answers
from engine.store.layout import ANSWER_COLUMNS

pytestmark = pytest.mark.e2e


def test_one_row_per_input_row_and_question(e2e_run, e2e_input):
    job, report, _, output = e2e_run
    answers = read_answers(str(output))
    assert answers.num_rows == E2E_NOTES * len(job.questions)
    rows = set(zip(answers["row_number"].to_pylist(), answers["question_id"].to_pylist()))
    assert len(rows) == answers.num_rows, "every (input row, question) exactly once"
    assert {r for r, _ in rows} == set(range(E2E_NOTES))
    assert {q for _, q in rows} == {q.id for q in job.questions}
    assert set(answers["note_id"].to_pylist()) == set(pq.read_table(e2e_input)["note_id"].to_pylist())
    assert report["rows"] == answers.num_rows


def test_exact_column_types(e2e_run):
    job, _, _, output = e2e_run
    schema = read_answers(str(output)).schema
    for name, dtype in ANSWER_COLUMNS.items():
        assert schema.field(name).type == dtype, name
    assert schema.field("sex").type == pa.string()
    assert pa.types.is_integer(schema.field("age").type)


def test_statuses_add_up_and_match_report(e2e_run):
    _, report, _, output = e2e_run
    answers = read_answers(str(output))
    counts = {r["values"]: r["counts"] for r in pc.value_counts(answers["status"]).to_pylist()}
    assert set(counts) <= {"answered", "not_in_note", "error"}
    assert sum(counts.values()) == answers.num_rows
    assert {k: v for k, v in report["rows_by_status"].items() if v} == counts
    errors = answers.filter(pc.equal(answers["status"], "error"))
    assert pc.all(pc.is_valid(errors["error"])).as_py(), "every error row carries its reason"
    assert counts.get("answered", 0) > 0, "a constrained random model still yields answered rows"


def test_every_answered_row_is_schema_valid(e2e_run):
    job, report, _, output = e2e_run
    answers = read_answers(str(output)).to_pylist()
    for row in answers:
        if row["status"] != "answered":
            continue
        question = job.question(row["question_id"])
        if question.type == "yes_no":
            assert row["value_bool"] is not None and row["value_num"] is None
        elif question.type == "date":  # an ISO date the grammar allowed and parse read as a calendar date
            assert row["value_date"] is not None and row["value_num"] is None and row["value_bool"] is None
        else:
            assert row["value_num"] is not None and row["unit"] in question.units
            assert question.minimum <= row["value_num"] * question.units[row["unit"]] <= question.maximum
    invalid = [r for r in answers if r["status"] == "error" and "does not match the answer schema" in (r["error"] or "")]
    assert invalid == [], "constrained decoding must never produce schema-invalid output"
    assert report["schema_valid_rate"] == 1.0


def test_tokens_and_cost_reported(e2e_run):
    _, report, stats, _ = e2e_run
    assert report["prompt_tokens"] > report["computed_prompt_tokens"] > 0, "the shared note prefix is cached"
    assert report["completion_tokens"] > 0
    assert report["cost_per_10k_patients_usd"] > 0 and report["seconds_per_pair"] > 0
    assert stats.shards_committed == stats.shards_total


def rows_of(answers, column, value):
    return answers.filter(pc.equal(answers[column], value)).to_pylist()


def test_bad_rows_are_kept_with_a_reason(e2e_run):
    job, _, _, output = e2e_run
    n_questions = len(job.questions)
    answers = read_answers(str(output))
    expected = {"bad-null-text": "is null", "bad-blank": "empty or whitespace only"}
    for note_id, reason in expected.items():
        rows = rows_of(answers, "note_id", note_id)
        assert len(rows) == n_questions and all(r["status"] == "error" and reason in r["error"] for r in rows)
    duplicate = rows_of(answers, "row_number", E2E_SAMPLE_NOTES)
    assert len(duplicate) == n_questions and all(r["status"] == "error" and "duplicate note id" in r["error"] and "row 0" in r["error"] for r in duplicate)
    original = rows_of(answers, "row_number", 0)
    assert not any("duplicate" in (r["error"] or "") for r in original), "the first occurrence is answered"
    odd = rows_of(answers, "note_id", "odd-characters")
    assert len(odd) == n_questions and all(r["status"] in ("answered", "not_in_note", "error") for r in odd)
    assert not any("note" in (r["error"] or "") and "empty" in (r["error"] or "") for r in odd)


def test_notes_longer_than_the_context_are_truncated_and_marked(e2e_run, e2e_input):
    job, report, _, output = e2e_run
    notes = pq.read_table(e2e_input).to_pylist()
    long_ids = {n["note_id"] for n in notes if len(n["text"] or "") > 4 * job.model.max_model_len}
    assert long_ids, "the e2e input holds a note longer than the test model's context"
    answers = read_answers(str(output))
    for note_id in long_ids:
        rows = rows_of(answers, "note_id", note_id)
        assert all(r["truncated"] for r in rows if r["completion_tokens"] is not None)
        assert all(r["prompt_tokens"] <= job.model.max_model_len for r in rows if r["prompt_tokens"])
    assert report["notes_truncated"] >= len(long_ids)


def test_patients_and_report_written(e2e_run):
    _, report, _, output = e2e_run
    patients = pq.read_table(output / "patients" / "patients.parquet")
    answers = read_answers(str(output))
    assert patients.num_rows == len(answers["patient_id"].unique())
    assert set(patients["status"].to_pylist()) <= {"eligible", "excluded", "needs_review"}
    on_disk = json.loads((output / "report.json").read_text())
    assert on_disk["cost_per_10k_patients_usd"] == report["cost_per_10k_patients_usd"]


def test_the_engines_answers_take_the_columnar_rollup(e2e_run):
    """The committed answers (bad rows, truncated notes, duplicates included) are in the note-major layout that
    engine.cohort.columnar needs, and its patient table is the SQL roll-up's."""
    from engine.store.answers import answers_dataset
    from engine.cohort.rollup import ROLLUP_COLUMNS, patient_schema_of, rollup_sql
    from engine.cohort.columnar import columnar_rollup

    job, _, _, output = e2e_run
    answers = answers_dataset(str(output))
    fast = columnar_rollup(answers, job, patient_schema_of(answers, job), list(ROLLUP_COLUMNS))
    assert fast is not None and fast.num_rows > 0
    assert fast.to_pylist() == rollup_sql(answers, job).to_pylist()


def test_rerun_of_finished_job_does_nothing(e2e_run):
    from engine.run import run_job

    job, report, _, output = e2e_run
    before = sorted((output / "answers").iterdir())
    again, stats = run_job(job, limit=E2E_NOTES)
    assert stats.pairs_processed == 0 and stats.shards_resumed == stats.shards_total
    assert sorted((output / "answers").iterdir()) == before
    assert again["rows"] == report["rows"]


def test_output_of_another_job_is_refused(e2e_run):
    from engine.run import run_job

    job, _, _, _ = e2e_run
    changed = job.model_copy(update={"questions": job.questions[:-1]})
    with pytest.raises(OutputError, match="--overwrite"):
        run_job(changed, limit=E2E_NOTES)


def test_null_backend_runs_the_same_pipeline(apixaban_job, ray_local, tmp_path):
    """The benchmark backend goes through the same stages and output code."""
    from engine.run import run_job

    job = job_for(apixaban_job, model="null", backend="null", output=tmp_path / "out")
    report, _ = run_job(job, limit=6)
    answers = read_answers(str(tmp_path / "out"))
    assert answers.num_rows == 6 * len(job.questions)
    assert report["rows_by_status"]["answered"] == 0
    assert report["rows_by_status"]["not_in_note"] + report["rows_by_status"]["error"] == answers.num_rows


def test_read_stage_is_fused_with_the_repartition(apixaban_job, ray_local, tmp_path):
    """Rows are cut into model batches in the read tasks (one Ray Data operator), not by a repartition stage of
    its own that would carry every expanded row through the object store once more; read tasks are capped by the
    dataset's CPU budget (the model actors' CPUs plus `read_tasks`)."""
    from ray.data.dataset import explain_plan

    from engine.store.layout import answer_schema
    from engine.run import build_dataset
    from engine.stages.read import plan_input

    job = job_for(apixaban_job, model="null", backend="null", output=tmp_path / "out")
    job = job.model_copy(update={"batching": job.batching.model_copy(update={"read_tasks": 3, "actors": 2, "cpus_per_actor": 0.5})})
    inputs = plan_input(job.input, job.batching.notes_per_shard, None)
    dataset = build_dataset(job, inputs, inputs.shards, answer_schema(job, inputs.schema), None, {})
    physical = explain_plan(dataset._logical_plan).split("Physical Plan (Optimized)")[1]
    assert "MapBatches(notes_stage)->StreamingRepartition" in physical
    assert physical.count("TaskPoolMapOperator") == 1
    row_groups = len({(s.path, s.row_group) for s in inputs.shards})  # one read task per row group at most
    assert dataset.context.execution_options.resource_limits.cpu == 2 * 0.5 + min(3, row_groups)


def test_no_note_text_in_logs(e2e_run, e2e_input, ray_local):
    """Notes are protected health information: none of their text reaches Ray's or vLLM's logs."""
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    logs = "\n".join(p.read_text(errors="replace") for p in (session / "logs").rglob("*") if p.is_file() and p.stat().st_size < 50_000_000)
    assert len(logs) > 1000, "the workers wrote logs to search"
    texts = [t for t in pq.read_table(e2e_input)["text"].to_pylist() if t and len(t.strip()) > 60]
    leaked = [t[20:80] for t in texts if t[20:80] in logs]
    assert leaked == []

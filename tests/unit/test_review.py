"""review.require_grounded_evidence: an answer whose quote is not in its note cannot decide a criterion by itself.

Real roll-up, rules and report over DuckDB, from answer tables and from committed Parquet files.
"""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from report_fixtures import ROOT, gold_answers, write_output_folder

from engine.store.answers import answers_dataset
from engine.job import JobSpec, load_job
from engine.cohort.rollup import ROLLUP_COLUMNS
from engine.cohort.rules import screen

T0 = datetime(2150, 1, 1)
SCHEMA = pa.schema({**ROLLUP_COLUMNS, "grounding": pa.string(), "age": pa.int64()})


def make_job(require: bool = True, accept_fuzzy: bool = True) -> JobSpec:
    """af (yes/no, any), crea (numeric, max); inclusion af, exclusion crea > 2.5 with unknown read as not met."""
    return JobSpec.model_validate({
        "name": "review-test", "input": {"uri": "x.parquet", "structured": ["age"]}, "output": {"uri": "out"},
        "review": {"require_grounded_evidence": require, "accept_fuzzy": accept_fuzzy},
        "questions": [
            {"id": "af", "type": "yes_no", "absent": "no", "question": "Does the note document AF?"},
            {"id": "crea", "type": "numeric", "rollup": "max", "question": "Highest creatinine?", "unit": "mg/dL",
             "units": {"mg/dL": 1}},
        ],
        "criteria": [
            {"id": "inc_af", "kind": "inclusion", "description": "AF", "rule": "af"},
            {"id": "exc_crea", "kind": "exclusion", "description": "renal", "rule": "crea > 2.5", "unknown": "not_met"},
            {"id": "inc_old_or_af", "kind": "inclusion", "description": "old or AF", "rule": "age >= 75 OR af"},
        ],
    })


def row(question: str, note: str, grounding: str | None, value=None, patient: str = "p1", age: int = 80) -> dict:
    numeric = question == "crea"
    return {"patient_id": patient, "note_id": note, "question_id": question, "status": "answered",
            "value_bool": None if numeric else value, "value_num": value if numeric else None,
            "unit": "mg/dL" if numeric else None, "evidence": f"quote {question} {note}", "charttime": T0,
            "grounding": grounding, "age": age}


def decide(job: JobSpec, *rows: dict) -> dict:
    patients, _ = screen(pa.Table.from_pylist(list(rows), schema=SCHEMA), job)
    assert patients.num_rows == 1
    return patients.to_pylist()[0]


def test_off_an_ungrounded_answer_decides_as_before():
    out = decide(make_job(require=False), row("af", "n1", "not_found", True), row("crea", "n1", "not_found", 1.0))
    assert (out["inc_af"], out["exc_crea"], out["status"]) == ("met", "not_met", "eligible")
    assert "af__ungrounded" not in out and "inc_af__ungrounded" not in out


def test_an_ungrounded_yes_makes_its_criteria_unknown_and_the_patient_need_review():
    out = decide(make_job(), row("af", "n1", "not_found", True), row("crea", "n1", "exact", 1.0))
    assert out["af"] is None and out["af__ungrounded"] is True and out["af__note_id"] == "n1"  # the source stays
    assert (out["inc_af"], out["exc_crea"], out["status"]) == ("unknown", "not_met", "needs_review")
    assert out["reasons"] == ["inc_af: af evidence not found in note"]
    assert out["inc_af__ungrounded"] is True and out["exc_crea__ungrounded"] is False
    assert out["inc_old_or_af"] == "met" and out["inc_old_or_af__ungrounded"] is False  # age >= 75 decides it anyway


def test_a_criterion_whose_unknown_means_not_met_still_needs_review_on_ungrounded_evidence():
    out = decide(make_job(), row("af", "n1", "exact", True), row("crea", "n1", "not_found", 3.1))
    assert out["crea"] is None and out["crea__ungrounded"] is True
    assert (out["exc_crea"], out["status"], out["reasons"]) == ("unknown", "needs_review", ["exc_crea: crea evidence not found in note"])


def test_answers_without_a_quote_are_not_grounded():
    out = decide(make_job(), row("af", "n1", None, True), row("crea", "n1", "exact", 1.0))
    assert out["inc_af"] == "unknown" and out["status"] == "needs_review"


def test_a_grounded_note_decides_where_an_ungrounded_one_would_have():
    out = decide(make_job(), row("af", "n1", "not_found", True), row("af", "n2", "exact", True),
                 row("crea", "n1", "exact", 3.0), row("crea", "n2", "not_found", 3.0))
    assert (out["af"], out["af__note_id"], out["crea"], out["crea__note_id"]) == (True, "n2", 3.0, "n1")
    assert (out["inc_af"], out["exc_crea"], out["status"]) == ("met", "met", "excluded")


def test_the_highest_value_ungrounded_is_not_hidden_behind_a_lower_grounded_one():
    out = decide(make_job(), row("af", "n1", "exact", True), row("crea", "n1", "exact", 1.2), row("crea", "n2", "not_found", 3.4))
    assert out["crea"] is None and out["crea__note_id"] == "n2" and out["status"] == "needs_review"


@pytest.mark.parametrize("accept_fuzzy, status", [(True, "eligible"), (False, "needs_review")])
def test_fuzzy_quotes_count_as_grounded_unless_the_job_says_otherwise(accept_fuzzy, status):
    out = decide(make_job(accept_fuzzy=accept_fuzzy), row("af", "n1", "fuzzy", True), row("crea", "n1", "exact", 1.0))
    assert out["status"] == status


def test_an_excluding_criterion_still_excludes():
    out = decide(make_job(), row("af", "n1", "not_found", True), row("crea", "n1", "exact", 4.0))
    assert (out["status"], out["reasons"]) == ("excluded", ["exc_crea"])


def test_committed_files_and_tables_give_the_same_patients(tmp_path):
    rows = [row("af", "n1", "not_found", True), row("crea", "n1", "exact", 1.0), row("af", "n2", "exact", False, "p2", 60),
            row("crea", "n2", "fuzzy", 3.0, "p2", 60)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    (tmp_path / "answers").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "answers" / "s0.parquet")
    pq.write_table(table.slice(2), tmp_path / "answers" / "s1.parquet")
    from_files, _ = screen(answers_dataset(str(tmp_path)), make_job())
    assert from_files.to_pylist() == screen(table, make_job())[0].to_pylist()


def test_the_report_counts_ungrounded_answers_and_the_patients_they_hold(tmp_path):
    job = load_job(ROOT / "jobs" / "apixaban.yaml")
    job = job.model_copy(update={"review": job.review.model_copy(update={"require_grounded_evidence": True})})
    answers = gold_answers(job, notes=12)
    _, report, patients = write_output_folder(tmp_path, job, answers)
    answered = [r for r in answers.to_pylist() if r["status"] == "answered"]
    held = report["ungrounded"]
    assert held["answers"] == sum(r["grounding"] not in ("exact", "fuzzy") for r in answered) > 0
    flags = [c.id for c in job.criteria]
    assert held["criteria"] == {c: sum(patients[f"{c}__ungrounded"].to_pylist()) for c in flags}
    on_hold = [r for r in patients.to_pylist() if any(r[f"{c}__ungrounded"] for c in flags)]
    assert held["patients"] == len(on_hold) > 0
    assert held["patients_needs_review"] == sum(r["status"] == "needs_review" for r in on_hold) > 0
    reasons = [x for r in patients.to_pylist() for x in r["reasons"] if "evidence not found in note" in x]
    assert reasons and all(x.split(": ")[0] in flags for x in reasons)


# --- review.require_verified_answers: a model answer that failed its check against the note -------------------------
VERIFY_SCHEMA = pa.schema({**ROLLUP_COLUMNS, "grounding": pa.string(), "verified": pa.bool_(), "model": pa.string(),
                           "age": pa.int64()})


def checked(question: str, note: str, value, verified: bool | None, model: str = "m", **more) -> dict:
    return {**row(question, note, "exact", value, **more), "verified": verified, "model": model}


def decide_verified(job: JobSpec, *rows: dict) -> dict:
    patients, _ = screen(pa.Table.from_pylist(list(rows), schema=VERIFY_SCHEMA), job)
    assert patients.num_rows == 1
    return patients.to_pylist()[0]


def verified_job(require: bool = True) -> JobSpec:
    spec = make_job(require=False).model_dump()
    spec["review"]["require_verified_answers"] = require
    return JobSpec.model_validate(spec)


def test_an_unverified_model_value_cannot_decide_and_the_patient_needs_review():
    out = decide_verified(verified_job(), checked("af", "n1", True, True), checked("crea", "n1", 103.1, False))
    assert out["crea"] is None and out["crea__unverified"] is True and out["crea__note_id"] == "n1"
    assert (out["exc_crea"], out["status"]) == ("unknown", "needs_review")  # its unknown: not_met does not decide it
    assert out["reasons"] == ["exc_crea: crea model answer not verified against the note"]
    assert out["exc_crea__unverified"] is True and out["inc_af__unverified"] is False


def test_a_verified_value_wins_over_an_unverified_one_of_another_note_only_by_value():
    """max: the unverified 3.1 is the highest, so the patient's value rests on it and is held; a verified 3.4 wins."""
    held = decide_verified(verified_job(), checked("af", "n1", True, True), checked("crea", "n1", 1.0, True),
                           checked("crea", "n2", 3.1, False))
    assert held["crea"] is None and held["status"] == "needs_review"
    decided = decide_verified(verified_job(), checked("af", "n1", True, True), checked("crea", "n1", 3.4, True),
                              checked("crea", "n2", 3.1, False))
    assert (decided["crea"], decided["crea__unverified"], decided["status"]) == (3.4, False, "excluded")


def test_a_cue_answer_that_stood_in_for_a_failed_model_answer_decides():
    out = decide_verified(verified_job(), checked("af", "n1", True, False, model="cues"), checked("crea", "n1", 1.0, None, model="cues"))
    assert (out["af"], out["af__unverified"], out["status"]) == (True, False, "eligible")


def test_off_an_unverified_answer_decides_as_before():
    out = decide_verified(verified_job(require=False), checked("af", "n1", True, True), checked("crea", "n1", 3.1, False))
    assert (out["crea"], out["status"]) == (3.1, "excluded") and "crea__unverified" not in out


def test_answers_written_before_verification_count_as_verified():
    out = decide(verified_job(), row("af", "n1", "exact", True), row("crea", "n1", "exact", 3.1))
    assert (out["crea"], out["crea__unverified"], out["status"]) == (3.1, False, "excluded")

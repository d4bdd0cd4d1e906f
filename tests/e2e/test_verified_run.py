"""Model answers verified on the real stack: local Ray, a real vLLM CPU engine whose tiny random model answers
nonsense under the grammar (wrong values, quotes of nothing), the bundled notes. Its wrong answers must be caught:
in model mode kept and held back from deciding, in hybrid mode replaced by the cue answer."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import E2E_NOTES
from engine.tools.inprocess import lexical_answers
from engine.store.answers import read_answers
from engine.plan import make_plan
from engine.stages.verify import CUE_ANSWER_STANDS, check_row, counted_mention_spans

pytestmark = pytest.mark.e2e


def model_answered(answers):
    claims = pc.is_in(answers["status"], value_set=pa.array(["answered", "not_in_note"]))
    return answers.filter(pc.and_(claims, pc.equal(answers["route"], "model")))


def texts_of(job) -> list[str]:
    """The input's note texts by row number (the e2e input repeats a note id on purpose)."""
    return pq.read_table(job.input.uri, columns=[job.input.text])[job.input.text].to_pylist()


def test_model_mode_checks_every_model_answer_and_holds_the_failures(e2e_run):
    job, report, _, output = e2e_run
    answers = read_answers(str(output))
    checked = model_answered(answers)
    assert checked.num_rows > 0 and checked["verified"].null_count == 0  # every model answer was checked
    failed = checked.filter(pc.invert(checked["verified"]))
    assert failed.num_rows > 0, "the random model's answers should not all hold up"
    assert set(failed["model"].to_pylist()) == {job.model.name}  # kept as the model said, not replaced
    # the check in the actor is the pure check, row by row, against the note as it was read
    plan, texts = make_plan(job), texts_of(job)
    for row in checked.to_pylist():
        question = plan.by_id[row["question_id"]]
        if row["status"] == "not_in_note" and question.spec.type != "yes_no":
            continue  # a number's, date's or choice's is checked against the cue answer, which answers/ does not keep
        text = texts[row["row_number"]]
        reason = check_row(row, text, plan, counted_mention_spans(text, question, plan))
        assert (reason is None) == row["verified"] and reason == row["verification"]
    counted = report["verification"]
    assert counted["model_answers_checked"] == checked.num_rows and counted["failed"] == failed.num_rows
    assert counted["cue_answer_kept"] == 0 and sum(counted["failed_by_reason"].values()) == failed.num_rows
    # a patient whose value rests on a failed answer is held for review, with the reason named
    patients = pq.read_table(output / "patients" / "patients.parquet").to_pylist()
    flagged = [p for p in patients if any(p[f"{c.id}__unverified"] for c in job.criteria)]
    assert counted["patients_held"] == len(flagged)
    for patient in flagged:
        assert patient["status"] == "needs_review"
        assert any("model answer not verified against the note" in reason for reason in patient["reasons"])


def test_hybrid_mode_keeps_the_cue_answer_where_the_model_answer_fails(e2e_hybrid_run):
    job, report, output = e2e_hybrid_run
    answers = read_answers(str(output))
    failed = answers.filter(pc.fill_null(pc.invert(answers["verified"]), False))
    assert failed.num_rows > 0, "the random model's answers should not all hold up"
    assert set(failed["model"].to_pylist()) == {"cues"}
    assert all(reason.endswith(CUE_ANSWER_STANDS) for reason in failed["verification"].to_pylist())
    # the answer that stands is the cue answer of the same (note, question)
    cues = lexical_answers(job, limit=E2E_NOTES)
    cue_of = {(r["row_number"], r["question_id"]): r for r in cues.to_pylist()}
    for row in failed.to_pylist():
        cue = cue_of[(row["row_number"], row["question_id"])]
        assert (row["status"], row["value_bool"], row["value_num"], row["evidence"]) == \
               (cue["status"], cue["value_bool"], cue["value_num"], cue["evidence"])
    assert report["verification"]["cue_answer_kept"] == failed.num_rows == report["verification"]["failed"]
    assert report["verification"]["patients_held"] == 0  # nothing unverified is left to hold

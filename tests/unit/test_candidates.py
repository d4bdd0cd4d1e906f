"""The candidate stage: routes, cue answers in the answer schemas, windows and hints (real medspaCy, no model)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from engine.plan import make_plan
from engine.stages.candidates import CANDIDATE_COLUMNS, assess_note, find_candidates, shown_text, windows
from engine.stages.expand import expand_questions

NOTE = (
    "Past Medical History:\n- Paroxysmal a-fib on warfarin\n- No history of diabetes.\n"
    "Family History:\nMother had a stroke in her 70s.\n"
    "Pertinent Results:\n___ 07:15AM BLOOD WBC-8.1 Hgb-9.8* Hct-30.2* Plt Ct-142* Creat-1.9* Na-137\n"
    "Hb: 5.3, 5.5 mmol/L on repeat; possible CHF.\n"
)


def plan_for(job, **extraction):
    return make_plan(job.model_copy(update={"extraction": job.extraction.model_copy(update=extraction)}))


def verdicts(job, text=NOTE, **extraction):
    plan = plan_for(job, **extraction)
    return {q.id: v for q, v in zip(plan.questions, assess_note(text, plan.questions, plan))}


def test_lexical_answers_validate_against_each_question_schema(apixaban_job):
    plan = plan_for(apixaban_job, mode="lexical")
    for question, verdict in zip(plan.questions, assess_note(NOTE, plan.questions, plan)):
        assert verdict.route in ("lexical", "no_candidate")
        question.answer_model.model_validate_json(verdict.output)  # would raise


def test_cue_answers(apixaban_job):
    found = verdicts(apixaban_job, mode="lexical")
    answer = {qid: json.loads(v.output) for qid, v in found.items()}
    assert answer["atrial_fibrillation"]["answer"] == "yes" and "a-fib" in answer["atrial_fibrillation"]["evidence"]
    assert answer["diabetes"] == {"evidence": "- No history of diabetes.", "answer": "no"}
    assert answer["prior_stroke_tia"]["answer"] == "not_in_note"  # the mother's stroke
    assert found["prior_stroke_tia"].flags == "family"
    assert answer["heart_failure"]["answer"] == "not_in_note"  # 'possible CHF' is uncertain
    assert answer["creatinine_max"]["value"] == "1.9" and answer["creatinine_max"]["unit"] == "mg/dL"
    assert answer["platelets_min"]["value"] == "142"
    # lowest hemoglobin across units: 5.3 mmol/L (8.5 g/dL) is below 9.8 g/dL
    assert (answer["hemoglobin_min"]["value"], answer["hemoglobin_min"]["unit"]) == ("5.3", "mmol/L")
    assert "5.3" in answer["hemoglobin_min"]["evidence"]
    assert found["bilirubin_max"].route == "no_candidate"
    assert answer["bilirubin_max"] == {"evidence": "", "value": None, "unit": None}
    for v in answer.values():
        assert v["evidence"] == "" or v["evidence"] in NOTE  # quotes are verbatim


def test_hybrid_routes(apixaban_job):
    every = verdicts(apixaban_job, mode="hybrid", ask_model="candidates")
    assert every["atrial_fibrillation"].route == "model" and every["bipolar_disorder"].route == "no_candidate"
    assert every["atrial_fibrillation"].hint == 'Cue mentions: "a-fib" (historical)'  # a PMH mention
    assert every["atrial_fibrillation"].model_text is None  # model_sees: note
    unresolved = verdicts(apixaban_job, mode="hybrid", ask_model="unresolved")
    assert unresolved["atrial_fibrillation"].route == "lexical"  # one affirmed mention: unambiguous
    assert unresolved["creatinine_max"].route == "lexical"
    mixed = "AF on admission. No AF on telemetry afterwards."
    assert verdicts(apixaban_job, mixed, mode="hybrid", ask_model="unresolved")["atrial_fibrillation"].route == "model"


def test_windows_hold_only_the_text_around_mentions(apixaban_job):
    text = "x" * 1000 + " afib " + "y" * 1000 + " AF " + "z" * 1000
    found = verdicts(apixaban_job, text, mode="hybrid", ask_model="candidates", model_sees="windows",
                     window_chars=50)
    window = found["atrial_fibrillation"].model_text
    assert "afib" in window and "AF" in window and len(window) < 300 and "[...]" in window


def test_model_mode_with_windows_shows_the_model_only_the_text_around_the_mentions(apixaban_job):
    """Model mode, model_sees windows: the cues retrieve, the model reads. Every pair with a mention goes to the
    model with its windows and no cue hint (the model reads the negation itself); a pair without one is not in note
    without a model call; a date question keeps the note's date."""
    text = "x" * 1000 + "\nNo history of atrial fibrillation.\n" + "y" * 1000 + "\nCreatinine 1.4 mg/dL\n" + "z" * 500
    found = verdicts(apixaban_job, text, mode="model", model_sees="windows", window_chars=60)
    af = found["atrial_fibrillation"]
    assert af.route == "model" and "No history of atrial fibrillation" in af.model_text and len(af.model_text) < 200
    assert af.hint is None and "x" * 70 not in af.model_text
    assert found["creatinine_max"].route == "model" and "1.4 mg/dL" in found["creatinine_max"].model_text
    assert found["bipolar_disorder"].route == "no_candidate" and found["bipolar_disorder"].model_text is None
    whole = verdicts(apixaban_job, text, mode="model")  # model_sees: note, as before: every pair, the whole note
    assert {v.route for v in whole.values()} == {"model"} and whole["bipolar_disorder"].model_text is None
    plan = plan_for(apixaban_job, mode="model", model_sees="windows", window_chars=60)
    assert shown_text(text, plan.by_id["atrial_fibrillation"], plan) == af.model_text  # what engine synth renders
    assert shown_text(text, plan.by_id["bipolar_disorder"], plan) is None


@pytest.mark.parametrize("mode", ["model", "hybrid", "lexical"])
def test_stage_adds_its_columns_and_skips_failed_notes(apixaban_job, mode):
    plan = plan_for(apixaban_job, mode=mode)
    notes = pa.table({"note_id": ["a", "b"], "text": [NOTE, ""], "note_error": [None, "note text is empty"]})
    rows = find_candidates(expand_questions(notes, plan.question_ids), plan)
    assert set(CANDIDATE_COLUMNS) <= set(rows.column_names) and rows.num_rows == 2 * len(plan.questions)
    routes = rows["route"].to_pylist()
    if mode == "model":
        assert set(routes[: len(plan.questions)]) == {"model"}
    else:
        assert "no_candidate" in routes[: len(plan.questions)]
    assert set(routes[len(plan.questions):]) == {None}  # failed note: an error row, asked of nobody


def test_windows_merge_overlaps():
    assert windows("0123456789abcdefghij", [(10, 12), (14, 16)], 3) == "789abcdefghi"
    assert windows("0123456789abcdefghij", [(2, 3), (17, 18)], 1) == "123\n[...]\nghi"


def test_a_value_from_a_table_column_is_quoted_from_its_own_row(apixaban_job):
    table = "Labs:\n| Date | Plt (K/uL) | Cr (mg/dL) |\n|---|---|---|\n| HD1 | 142 | 1.1 |\n| HD3 | 95 | 2.8 |\n"
    found = verdicts(apixaban_job, table, mode="lexical")
    answer = json.loads(found["platelets_min"].output)
    assert answer["value"] == "95" and answer["evidence"] == "| HD3 | 95 | 2.8 |"
    assert json.loads(found["creatinine_max"].output)["value"] == "2.8"

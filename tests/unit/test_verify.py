"""engine.stages.verify: a model answer decides only when its value is in its quote, its quote is in the note and
the quote names what the question asks about; in hybrid mode a failed model answer gives way to the cue answer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from engine.job import load_job
from engine.plan import make_plan
from engine.stages.answer import answer_rows
from engine.stages.ground import locate
from engine.stages.verify import (CONTEXT, NO_MENTION, NOT_IN_NOTE_CONTRADICTED, PASSED_OVER, NO_QUOTE, NOT_GROUNDED, PROMPT_QUOTE, VALUE_NOT_IN_QUOTE,
                                  check_answer, counted_mention_spans, counts_from, quote_numbers, value_in_quote)

JOB = load_job(Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml")
PLAN = make_plan(JOB)
Q = PLAN.by_id

NOTE = (
    "HPI: 81F with paroxysmal atrial fibrillation on apixaban, HTN, denies prior stroke.\n"
    "Family history: mother with diabetes.\n"
    "| Date | Plt (K/uL) | Cr (mg/dL) |\n"
    "| 3/1  | 98         | 1.9        |\n"
    "| 3/2  | 112        | 2.4        |\n"
    "Labs: Hgb 8.5 g/dL, platelets 98,000/mm3, AST 40 U/L.\n"
    "Echo: LVEF 60-65%. CHADS2 score 3.\n"
    "Platelet units reported as 10^3/uL or 10^9/L or /mm3 or /uL by the lab."
)


# --- numbers as notes write them ------------------------------------------------------------------------------------
@pytest.mark.parametrize("quote, numbers", [
    ("Creat-1.9*", [1.9]),
    ("platelets 98,000/mm3", [98000]),
    ("Plt 98 x 10^9/L", [98]),
    ("PLT 98 x10*9/L", [98]),
    ("EF 30-35%", [30, 35]),
    ("CHADS2 score 3", [3]),
    ("HbA1c 7.2%", [7.2]),
    ("plt 98K", [98, 98000]),
    ("10^3/uL or 10^9/L or /mm3 or /uL", []),
    ("Cr 1.2,1.5", [1.2, 1.5]),
    ("Hb .9", [0.9]),
])
def test_quote_numbers_reads_values_not_units(quote, numbers):
    assert quote_numbers(quote) == numbers


@pytest.mark.parametrize("question, value, unit, quote, expected", [
    ("creatinine_max", 2.0, "mg/dL", "Cr 2 mg/dL", True),                     # 2.0 is 2
    ("creatinine_max", 2.0, "mg/dL", "Cr 2.0", True),
    ("creatinine_max", 2.5, "mg/dL", "Cr 2.4 mg/dL", False),                  # a near value is not the value
    ("platelets_min", 98000.0, "/mm3", "platelets 98,000/mm3", True),         # thousands separator
    ("platelets_min", 98.0, "10^3/uL", "platelets 98,000/mm3", True),         # same count in another accepted unit
    ("platelets_min", 98.0, "10^9/L", "Plt 98 x 10^9/L", True),
    ("platelets_min", 10.0, "10^3/uL", "10^3/uL or 10^9/L or /mm3 or /uL", False),  # the unit list holds no value
    ("platelets_min", 103.1, "10^3/uL", "platelets", False),
    ("hemoglobin_min", 85.0, "g/L", "Hgb 8.5 g/dL", True),                    # 8.5 g/dL is 85 g/L
    ("lvef_min", 30.0, "%", "EF 30-35%", True),                               # a range holds both ends
    ("lvef_min", 35.0, "%", "EF 30-35%", True),
    ("lvef_min", 55.0, "%", "LVEF 60-65%", True),                             # the cap: >= 55 is reported as 55
    ("lvef_min", 55.0, "%", "LVEF 45%", False),
    ("chads2_max", 2.0, "points", "CHADS2 score 3", False),                   # the 2 of CHADS2 is not a value
    ("chads2_max", 3.0, "points", "CHADS2 score 3", True),
])
def test_value_in_quote(question, value, unit, quote, expected):
    assert value_in_quote(value, unit, quote, Q[question]) is expected


# --- one answer against its note ------------------------------------------------------------------------------------
def model_row(question: str, quote: str | None, *, value_bool=None, value_num=None, unit=None) -> dict:
    start, end, grounding = locate(quote, NOTE)
    return {"question_id": question, "status": "answered", "value_bool": value_bool, "value_num": value_num,
            "unit": unit, "evidence": quote, "evidence_start": start, "evidence_end": end, "grounding": grounding}


def category(reason: str | None) -> str | None:
    return None if reason is None else reason.split(" (")[0]


@pytest.mark.parametrize("question, quote, answer, expected", [
    ("atrial_fibrillation", "paroxysmal atrial fibrillation on apixaban", {"value_bool": True}, None),
    ("hypertension", "HTN", {"value_bool": True}, None),                      # an abbreviation cue
    ("atrial_fibrillation", "on apixaban", {"value_bool": True}, NO_MENTION),  # grounded, names nothing asked
    ("atrial_fibrillation", "chronic atrial fibrillation, rate controlled", {"value_bool": True}, NOT_GROUNDED),
    ("atrial_fibrillation", None, {"value_bool": True}, NO_QUOTE),
    ("schizophrenia", None, {"value_bool": False}, None),                     # "no", nothing quoted: not in note
    ("prior_stroke_tia", "denies prior stroke", {"value_bool": False}, None),
    ("creatinine_max", "Cr 2 mg/dL", {"value_num": 2.0, "unit": "mg/dL"}, NOT_GROUNDED),
    ("platelets_min", "platelets 98,000/mm3", {"value_num": 98.0, "unit": "10^3/uL"}, None),
    ("platelets_min", "platelets", {"value_num": 103.1, "unit": "10^3/uL"}, VALUE_NOT_IN_QUOTE),
    ("platelets_min", "10^3/uL or 10^9/L or /mm3 or /uL", {"value_num": 10.0, "unit": "10^3/uL"}, VALUE_NOT_IN_QUOTE),
    ("platelets_min", "| 3/1  | 98", {"value_num": 98.0, "unit": "10^3/uL"}, None),  # header two lines up
    ("creatinine_max", "| 3/2  | 112        | 2.4", {"value_num": 2.4, "unit": "mg/dL"}, None),
    ("ast_max", "| 3/2  | 112", {"value_num": 112.0, "unit": "U/L"}, NO_MENTION),  # a number, of another lab
    ("hemoglobin_min", "Hgb 8.5 g/dL", {"value_num": 85.0, "unit": "g/L"}, None),
    ("lvef_min", "LVEF 60-65%", {"value_num": 55.0, "unit": "%"}, None),
    ("chads2_max", "CHADS2 score 3", {"value_num": 3.0, "unit": "points"}, None),
])
def test_check_answer(question, quote, answer, expected):
    assert category(check_answer(model_row(question, quote, **answer), NOTE, Q[question])) == expected


def test_a_fuzzy_quote_of_the_prompt_is_not_evidence():
    """The prompt's own words found approximately in the note are not the note's evidence."""
    note = "Platelets: see lab. Units reported as 10^3/ul or 10^9/l or mm3 or /ul."
    quote = "10^3/uL or 10^9/L or /mm3 or /uL"
    start, end, grounding = locate(quote, note)
    assert grounding == "fuzzy"
    row = {"question_id": "platelets_min", "status": "answered", "value_bool": None, "value_num": 10.0,
           "unit": "10^3/uL", "evidence": quote, "evidence_start": start, "evidence_end": end, "grounding": grounding}
    assert category(check_answer(row, note, Q["platelets_min"])) == PROMPT_QUOTE


def test_a_question_without_cues_is_checked_against_its_own_words():
    job = JOB.model_copy(update={"questions": [JOB.questions[0].model_copy(update={"cues": None})]})
    plan = make_plan(job)
    question = plan.by_id["atrial_fibrillation"]
    good = model_row("atrial_fibrillation", "paroxysmal atrial fibrillation on apixaban", value_bool=True)
    bad = model_row("atrial_fibrillation", "on apixaban", value_bool=True)
    assert check_answer(good, NOTE, question) is None
    assert category(check_answer(bad, NOTE, question)) == NO_MENTION


# --- the chain on a batch: parse -> ground -> verify ----------------------------------------------------------------
def generated_batch(rows: list[dict]) -> pa.Table:
    """What the model stage hands on: per row the model's raw output, the cue answer and the route."""
    n = len(rows)
    return pa.table({
        "note_id": ["n1"] * n, "question_id": [r["question"] for r in rows], "text": [NOTE] * n,
        "route": [r["route"] for r in rows], "model": [r.get("model", "m") for r in rows],
        "raw_output": [json.dumps(r["raw"]) for r in rows], "cue_output": [json.dumps(r["cue"]) if r.get("cue") else None for r in rows],
        "finish_reason": ["stop"] * n, "generation_error": pa.nulls(n, pa.string()), "note_error": pa.nulls(n, pa.string()),
    })


WRONG_PLATELETS = {"question": "platelets_min", "route": "model",
                   "raw": {"evidence": "platelets", "value": "103.1", "unit": "10^3/uL"},
                   "cue": {"evidence": "platelets 98,000/mm3", "value": "98000", "unit": "/mm3"}}
RIGHT_CREATININE = {"question": "creatinine_max", "route": "model",
                    "raw": {"evidence": "| 3/2  | 112        | 2.4", "value": "2.4", "unit": "mg/dL"},
                    "cue": {"evidence": "| 3/2  | 112        | 2.4", "value": "2.4", "unit": "mg/dL"}}
CUE_ROW = {"question": "hypertension", "route": "lexical", "model": "cues",
           "raw": {"evidence": "HTN", "answer": "yes"}, "cue": {"evidence": "HTN", "answer": "yes"}}


def plan_in(mode: str):
    return make_plan(JOB.model_copy(update={"extraction": JOB.extraction.model_copy(update={"mode": mode})}))


def test_hybrid_mode_keeps_the_cue_answer_where_the_model_answer_fails():
    out = answer_rows(generated_batch([WRONG_PLATELETS, RIGHT_CREATININE, CUE_ROW]), plan_in("hybrid")).to_pylist()
    wrong, right, cue = out
    assert (wrong["value_num"], wrong["unit"], wrong["model"], wrong["verified"]) == (98000.0, "/mm3", "cues", False)
    assert wrong["evidence"] == "platelets 98,000/mm3" and wrong["grounding"] == "exact"
    assert wrong["verification"].startswith(VALUE_NOT_IN_QUOTE) and "103.1" in wrong["verification"]
    assert wrong["verification"].endswith("the cue answer stands")
    assert (right["value_num"], right["model"], right["verified"], right["verification"]) == (2.4, "m", True, None)
    assert (cue["value_bool"], cue["verified"], cue["verification"]) == (True, None, None)  # cue answers are not model answers
    assert "text" not in answer_rows(generated_batch([CUE_ROW]), plan_in("hybrid")).column_names


def test_model_mode_keeps_the_failed_answer_marked_unverified():
    wrong = {**WRONG_PLATELETS, "cue": None}
    out = answer_rows(generated_batch([wrong]), plan_in("model")).to_pylist()[0]
    assert (out["value_num"], out["model"], out["verified"]) == (103.1, "m", False)
    assert out["verification"].startswith(VALUE_NOT_IN_QUOTE) and "cue answer" not in out["verification"]


def test_errors_are_not_checked_and_not_in_note_is():
    rows = [{"question": "creatinine_max", "route": "model", "raw": {"evidence": "", "value": None, "unit": None}},
            {"question": "creatinine_max", "route": "model", "raw": {"evidence": "Cr 99", "value": "99", "unit": "mg/dL"}},
            {"question": "atrial_fibrillation", "route": "model", "raw": {"evidence": "", "answer": "not_in_note"}},
            {"question": "schizophrenia", "route": "model", "raw": {"evidence": "", "answer": "not_in_note"}}]
    out = answer_rows(generated_batch(rows), plan_in("model")).to_pylist()
    assert [(r["status"], r["verified"]) for r in out] == [("not_in_note", True), ("error", None), ("not_in_note", False),
                                                           ("not_in_note", True)]
    assert out[2]["verification"].startswith(NOT_IN_NOTE_CONTRADICTED) and "atrial fibrillation" in out[2]["verification"]


def test_a_not_in_note_against_a_value_the_cues_read_gives_way_in_hybrid_mode():
    row = {"question": "platelets_min", "route": "model", "raw": {"evidence": "", "value": None, "unit": None},
           "cue": {"evidence": "platelets 98,000/mm3", "value": "98000", "unit": "/mm3"}}
    out = answer_rows(generated_batch([row]), plan_in("hybrid")).to_pylist()[0]
    assert (out["status"], out["value_num"], out["verified"], out["model"]) == ("answered", 98000.0, False, "cues")
    assert out["verification"].startswith(NOT_IN_NOTE_CONTRADICTED) and "98000 /mm3" in out["verification"]


# --- a "yes" must quote a mention that counts for the patient in its context ---------------------------------------
def counts_in(note: str, question: str):
    """counts(start, end) for a question's mentions in a note, from medspaCy's reading of their context."""
    return counts_from(counted_mention_spans(note, Q[question], PLAN))


def test_the_candidate_stage_hands_on_the_mentions_that_count():
    """In the pipeline the counted spans come from the candidate stage's one ConText pass, in every mode but the
    null backend's; they are the spans verify would compute itself."""
    from engine.stages.candidates import find_candidates
    from engine.stages.expand import expand_questions

    notes = pa.table({"note_id": ["n1"], "text": [NOTE]})
    for mode in ("model", "hybrid"):
        rows = find_candidates(expand_questions(notes, PLAN.question_ids), plan_in(mode)).to_pylist()
        for row in rows:
            assert counts_from(row["counted_mentions"]).__closure__ is not None
            expected = counted_mention_spans(NOTE, Q[row["question_id"]], PLAN)
            handed_on = [tuple(int(x) for x in s.split("-")) for s in (row["counted_mentions"] or "").split(";") if s]
            assert handed_on == expected, row["question_id"]
            assert mode == "hybrid" or row["route"] == "model"
    null = JOB.model_copy(update={"model": JOB.model.model_copy(update={"backend": "null"}),
                                  "extraction": JOB.extraction.model_copy(update={"mode": "model"})})
    rows = find_candidates(expand_questions(notes, PLAN.question_ids), make_plan(null))
    assert rows["counted_mentions"].null_count == rows.num_rows  # the benchmark backend skips the cue work
@pytest.mark.parametrize("question, quote, expected", [
    ("atrial_fibrillation", "paroxysmal atrial fibrillation on apixaban", None),
    ("prior_stroke_tia", "denies prior stroke", CONTEXT),         # negated: quoted, but it says the opposite
    ("diabetes", "mother with diabetes", CONTEXT),                  # a family member's
    ("hypertension", "HTN", None),
])
def test_a_yes_is_checked_against_the_context_of_the_mention_it_quotes(question, quote, expected):
    row = model_row(question, quote, value_bool=True)
    assert category(check_answer(row, NOTE, Q[question], counts_in(NOTE, question))) == expected


def test_a_no_is_not_held_to_the_context_of_its_quote():
    """A "no" quoting a negated mention is what a "no" should quote."""
    row = model_row("prior_stroke_tia", "denies prior stroke", value_bool=False)
    assert check_answer(row, NOTE, Q["prior_stroke_tia"], counts_in(NOTE, "prior_stroke_tia")) is None


def test_the_chain_checks_the_context_of_a_yes():
    wrong = {"question": "prior_stroke_tia", "route": "model", "raw": {"evidence": "denies prior stroke", "answer": "yes"},
             "cue": {"evidence": "denies prior stroke", "answer": "no"}}
    out = answer_rows(generated_batch([wrong]), plan_in("hybrid")).to_pylist()[0]
    assert (out["value_bool"], out["verified"], out["model"]) == (False, False, "cues")
    assert out["verification"].startswith(CONTEXT) and "negated" in out["verification"]


@pytest.mark.parametrize("question, quote, expected", [
    ("atrial_fibrillation", None, PASSED_OVER),                      # "no", nothing quoted, AF affirmed in the note
    ("atrial_fibrillation", "on apixaban", NO_MENTION),
    ("atrial_fibrillation", "paroxysmal atrial fibrillation on apixaban", None),  # it quotes the mention and disputes it
    ("prior_stroke_tia", None, None),                                # the only mention is negated
    ("diabetes", "mother with diabetes", None),                      # the only mention is a family member's
])
def test_a_no_must_not_pass_over_a_mention_that_counts(question, quote, expected):
    row = model_row(question, quote, value_bool=False)
    assert category(check_answer(row, NOTE, Q[question], counts_in(NOTE, question))) == expected


def test_a_no_passing_over_an_affirmed_mention_names_it():
    note = "Denies AF today. PMH: paroxysmal atrial fibrillation on apixaban."
    quote = "Denies AF today"
    row = {**model_row("atrial_fibrillation", None, value_bool=False), "evidence": quote,
           **dict(zip(("evidence_start", "evidence_end", "grounding"), locate(quote, note)))}
    reason = check_answer(row, note, Q["atrial_fibrillation"], counts_in(note, "atrial_fibrillation"))
    assert category(reason) == PASSED_OVER and "paroxysmal atrial fibrillation" in reason

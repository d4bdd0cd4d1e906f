"""Date and categorical answers through the chain: the cues' answer (candidates), parse, and the check of a model's
answer against its note (verify): a date's phrase must be in its quote and the date must follow from the phrase and the
note's charttime; a choice must be written in its quote (or a declared synonym)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pytest

from engine.job import QuestionSpec, load_job
from engine.plan import make_plan
from engine.stages.answer import answer_rows
from engine.stages.candidates import find_candidates
from engine.stages.expand import expand_questions
from engine.stages.parse import parse_one
from engine.stages.verify import (CHOICE_NOT_IN_QUOTE, DATE_DOES_NOT_FOLLOW, NO_MENTION, NOT_IN_NOTE_CONTRADICTED,
                                  PHRASE_NOT_IN_QUOTE)

JOB = load_job(Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml")
AF_TYPE = QuestionSpec(id="af_type", type="categorical", question="Which type of atrial fibrillation does the note document?",
                       choices=["paroxysmal", "persistent", "permanent"], synonyms={"permanent": ["chronic"]},
                       cues={"terms": ["atrial fibrillation", "afib"], "abbreviations": ["AF"]})
NYHA = QuestionSpec(id="nyha_class", type="categorical", question="Which NYHA class does the note give?",
                    choices=["I", "II", "III", "IV"], rollup="max", synonyms={"IV": ["class 4"], "III": ["class 3"]},
                    cues={"terms": ["NYHA", "New York Heart Association"]})
CHARTTIME = dt.datetime(2026, 3, 10, 14, 5)
NOTE = ("HPI: 74M with persistent atrial fibrillation, admitted with a GI bleed 2 weeks ago requiring 2 units pRBC.\n"
        "PMH: CVA in 2019. NYHA class III heart failure, NYHA class II last year.\n"
        "Underwent TAVR on 3/2/2026; on POD 3 he had melena.")


def plan_in(mode: str, questions=None):
    update = {"extraction": JOB.extraction.model_copy(update={"mode": mode})}
    if questions is not None:
        update["questions"] = questions
    return make_plan(JOB.model_copy(update=update))


def candidate_rows(plan, note=NOTE, charttime=CHARTTIME) -> dict[str, dict]:
    notes = pa.table({"note_id": ["n1"], "text": [note], "charttime": pa.array([charttime], pa.timestamp("us"))})
    return {r["question_id"]: r for r in find_candidates(expand_questions(notes, plan.question_ids), plan).to_pylist()}


def test_cue_answers_read_the_date_nearest_each_mention_and_the_roll_up_picks_the_latest():
    rows = candidate_rows(plan_in("lexical"))
    bleed = json.loads(rows["bleeding_date"]["cue_output"])
    # "GI bleed 2 weeks ago" (24 February) and "POD 3" after the TAVR of 2 March (5 March, melena): the most recent
    assert (bleed["phrase"], bleed["date"]) == ("POD 3", "2026-03-05")
    assert bleed["phrase"] in bleed["evidence"]
    stroke = json.loads(rows["stroke_date"]["cue_output"])
    assert (stroke["phrase"], stroke["date"]) == ("in 2019", "2019-01-01")


def test_a_relative_date_in_a_note_without_a_charttime_goes_to_the_model_in_hybrid_mode():
    plan = plan_in("hybrid")
    rows = candidate_rows(plan, "Admitted with a GI bleed 2 weeks ago.", None)
    assert rows["bleeding_date"]["route"] == "model" and "Note date: not given" in rows["bleeding_date"]["cue_hint"]
    assert json.loads(rows["bleeding_date"]["cue_output"])["date"] is None
    dated = candidate_rows(plan, "Admitted with a GI bleed 2 weeks ago.")
    assert dated["bleeding_date"]["route"] == "lexical"


def test_model_mode_tells_the_model_the_note_date_for_date_questions_only():
    rows = candidate_rows(plan_in("model"))
    assert rows["stroke_date"]["cue_hint"] == "Note date: 2026-03-10"
    assert rows["atrial_fibrillation"]["cue_hint"] is None


def test_categorical_cue_answers():
    plan = plan_in("hybrid", [AF_TYPE, NYHA])
    rows = candidate_rows(plan)
    assert json.loads(rows["af_type"]["cue_output"])["choice"] == "persistent" and rows["af_type"]["route"] == "lexical"
    nyha = json.loads(rows["nyha_class"]["cue_output"])
    assert nyha["choice"] == "III"  # roll-up max over the declared order: III over II
    assert rows["nyha_class"]["route"] == "model"  # two different classes: the model is asked
    chronic = candidate_rows(plan, "Chronic atrial fibrillation, rate controlled.")
    assert json.loads(chronic["af_type"]["cue_output"])["choice"] == "permanent"  # a declared synonym
    lower = candidate_rows(plan, "Functional class: NYHA ii per cardiology; i think stable.")
    assert json.loads(lower["nyha_class"]["cue_output"])["choice"] is None  # roman numerals only in capitals


def test_parse_types_dates_and_choices():
    plan = plan_in("hybrid", [*JOB.questions, AF_TYPE])
    got = parse_one(plan, "stroke_date", None, "stop", json.dumps({"evidence": "CVA 3/2/2026", "phrase": "3/2/2026", "date": "2026-03-02"}))
    assert got == {"status": "answered", "value_date": dt.date(2026, 3, 2), "value_text": "3/2/2026", "evidence": "CVA 3/2/2026"}
    bad = parse_one(plan, "stroke_date", None, "stop", json.dumps({"evidence": "x", "phrase": "x", "date": "2026-02-30"}))
    assert bad["status"] == "error" and "not a calendar date" in bad["error"]
    assert parse_one(plan, "stroke_date", None, "stop", json.dumps({"evidence": "", "phrase": None, "date": None}))["status"] == "not_in_note"
    assert parse_one(plan, "af_type", None, "stop", json.dumps({"evidence": "PAF", "choice": "paroxysmal"}))["value_text"] == "paroxysmal"
    assert parse_one(plan, "af_type", None, "stop", json.dumps({"evidence": "", "choice": "sometimes"}))["status"] == "error"


def generated(rows: list[dict], plan_questions_note=NOTE, charttime=CHARTTIME) -> pa.Table:
    n = len(rows)
    return pa.table({
        "note_id": ["n1"] * n, "question_id": [r["question"] for r in rows], "text": [plan_questions_note] * n,
        "charttime": pa.array([charttime] * n, pa.timestamp("us")),
        "route": ["model"] * n, "model": ["m"] * n, "raw_output": [json.dumps(r["raw"]) for r in rows],
        "cue_output": [json.dumps(r["cue"]) if r.get("cue") else None for r in rows],
        "finish_reason": ["stop"] * n, "generation_error": pa.nulls(n, pa.string()), "note_error": pa.nulls(n, pa.string()),
    })


def category(reason):
    return None if reason is None else reason.split(" (")[0]


@pytest.mark.parametrize("raw, expected", [
    ({"evidence": "admitted with a GI bleed 2 weeks ago", "phrase": "2 weeks ago", "date": "2026-02-24"}, None),
    ({"evidence": "admitted with a GI bleed 2 weeks ago", "phrase": "2 weeks ago", "date": "2026-02-25"}, DATE_DOES_NOT_FOLLOW),
    ({"evidence": "admitted with a GI bleed 2 weeks ago", "phrase": "3 weeks ago", "date": "2026-02-17"}, PHRASE_NOT_IN_QUOTE),
    ({"evidence": "on POD 3 he had melena", "phrase": "POD 3", "date": "2026-03-05"}, None),  # TAVR on 3/2/2026 + 3
    ({"evidence": "on POD 3 he had melena", "phrase": "POD 3", "date": "2026-03-03"}, DATE_DOES_NOT_FOLLOW),
    ({"evidence": "PMH: CVA in 2019", "phrase": "in 2019", "date": "2019-01-01"}, NO_MENTION),  # a stroke's date, no bleed
])
def test_a_model_date_is_checked_against_its_phrase_and_the_note_date(raw, expected):
    out = answer_rows(generated([{"question": "bleeding_date", "raw": raw}]), plan_in("model")).to_pylist()[0]
    assert category(out["verification"]) == expected
    assert out["verified"] is (expected is None)
    if expected is None:
        assert out["value_text"] == raw["phrase"] and out["value_date"].isoformat() == raw["date"]


def test_a_month_phrase_supports_any_day_of_its_month():
    note = "History of GI bleed last March, scoped."
    raw = {"evidence": "GI bleed last March", "phrase": "last March", "date": "2025-03-15"}
    out = answer_rows(generated([{"question": "bleeding_date", "raw": raw}], note), plan_in("model")).to_pylist()[0]
    assert out["verified"] is True


def test_a_failed_date_gives_way_to_the_cue_date_in_hybrid_mode():
    raw = {"evidence": "admitted with a GI bleed 2 weeks ago", "phrase": "2 weeks ago", "date": "2026-03-01"}
    cue = {"evidence": "admitted with a GI bleed 2 weeks ago", "phrase": "2 weeks ago", "date": "2026-02-24"}
    out = answer_rows(generated([{"question": "bleeding_date", "raw": raw, "cue": cue}]), plan_in("hybrid")).to_pylist()[0]
    assert (out["value_date"], out["model"], out["verified"]) == (dt.date(2026, 2, 24), "cues", False)
    assert out["verification"].endswith("the cue answer stands")
    nothing = {"evidence": "", "phrase": None, "date": None}
    out = answer_rows(generated([{"question": "bleeding_date", "raw": nothing, "cue": cue}]), plan_in("hybrid")).to_pylist()[0]
    assert category(out["verification"]) == NOT_IN_NOTE_CONTRADICTED and out["value_date"] == dt.date(2026, 2, 24)


@pytest.mark.parametrize("raw, expected", [
    ({"evidence": "persistent atrial fibrillation", "choice": "persistent"}, None),
    ({"evidence": "persistent atrial fibrillation", "choice": "permanent"}, CHOICE_NOT_IN_QUOTE),
    ({"evidence": "Persistent cough", "choice": "persistent"}, NO_MENTION),  # no mention of AF near it
])
def test_a_model_choice_must_be_written_in_its_quote(raw, expected):
    plan = plan_in("model", [AF_TYPE])
    note = "Persistent cough for three weeks.\nHPI: 74M with persistent atrial fibrillation on apixaban."
    out = answer_rows(generated([{"question": "af_type", "raw": raw}], note), plan).to_pylist()[0]
    assert category(out["verification"]) == expected


def test_a_synonym_supports_its_choice():
    plan = plan_in("model", [AF_TYPE])
    note = "Chronic atrial fibrillation, rate controlled."
    raw = {"evidence": "Chronic atrial fibrillation", "choice": "permanent"}
    out = answer_rows(generated([{"question": "af_type", "raw": raw}], note), plan).to_pylist()[0]
    assert out["verified"] is True and out["value_text"] == "permanent"


def test_the_null_backend_says_not_in_note_for_every_question_type():
    from engine.backends.null import NullBackend

    plan = plan_in("model", [*JOB.questions, AF_TYPE])
    answers = NullBackend(plan).constant_answers()
    assert {parse_one(plan, qid, None, "stop", raw)["status"] for qid, raw in answers.items()} == {"not_in_note"}
    assert {q.spec.type for q in plan.questions} == {"yes_no", "numeric", "date", "categorical"}

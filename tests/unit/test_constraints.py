"""engine.constraints + schemas/: every question's answer schema compiles with xgrammar, which accepts valid compact
answers (that the Pydantic model also accepts) and rejects everything a runaway or sloppy model could write."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import xgrammar
from pydantic import ValidationError
from xgrammar.testing import _is_grammar_accept_string

from engine.constraints import answer_model_for, json_schema_for
from engine.job import QuestionSpec, load_job
from engine.plan import make_plan
from schemas import CategoricalAnswer, DateAnswer, NumericAnswer, YesNoAnswer
from schemas.numeric import INTEGER_DIGITS, NUMBER_PATTERN, number_pattern

JOB = load_job(Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml")
PLAN = make_plan(JOB)
EVIDENCE_MAX = JOB.model.evidence_max_chars
QUESTIONS = PLAN.questions
NUMERIC = [q for q in QUESTIONS if q.spec.type == "numeric"]
YES_NO = [q for q in QUESTIONS if q.spec.type == "yes_no"]
DATES = [q for q in QUESTIONS if q.spec.type == "date"]
AF_TYPE = QuestionSpec(id="af_type", type="categorical", question="Which type of atrial fibrillation does the note document?",
                       choices=["paroxysmal", "persistent", "permanent"], synonyms={"permanent": ["chronic AF"]})
NYHA = QuestionSpec(id="nyha_class", type="categorical", question="Which NYHA class does the note give?",
                    choices=["I", "II", "III", "IV"], rollup="max")
SCHEMA_BASE = {"yes_no": YesNoAnswer, "numeric": NumericAnswer, "date": DateAnswer, "categorical": CategoricalAnswer}
ids = lambda qs: [q.id for q in qs]  # noqa: E731


def compile_grammar(schema: dict) -> xgrammar.Grammar:
    return xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))


EXTRA = [make_plan(JOB.model_copy(update={"questions": [AF_TYPE, NYHA]})).by_id[i] for i in ("af_type", "nyha_class")]
QUESTIONS = QUESTIONS + EXTRA  # the job's questions and two categorical ones
GRAMMARS = {q.id: compile_grammar(q.json_schema) for q in QUESTIONS}


def accepts(question_id: str, text: str) -> bool:
    return _is_grammar_accept_string(GRAMMARS[question_id], text)


def compact(answer: dict) -> str:
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)


def integer_digits(question) -> int:
    """Digits the schema allows before the point: enough for the maximum in the smallest-factor unit."""
    largest = max(question.spec.maximum / f for f in question.spec.units.values())
    return len(str(int(largest)))


def valid_answers(question) -> list[dict]:
    if question.spec.type == "yes_no":
        return [{"evidence": "Hx: AF on warfarin", "answer": "yes"}, {"evidence": "denies AF", "answer": "no"},
                {"evidence": "", "answer": "not_in_note"}, {"evidence": "µg ≥ 5 é 😀 x/y", "answer": "yes"},
                {"evidence": "x" * EVIDENCE_MAX, "answer": "no"}]
    if question.spec.type == "date":
        return [{"evidence": "acute stroke 2 weeks ago", "phrase": "2 weeks ago", "date": "2026-02-24"},
                {"evidence": "", "phrase": None, "date": None},
                {"evidence": "x" * EVIDENCE_MAX, "phrase": "x" * 40, "date": "1999-12-31"}]
    if question.spec.type == "categorical":
        return [{"evidence": "quote", "choice": c} for c in question.spec.choices] + [{"evidence": "", "choice": None}]
    units = list(question.spec.units)
    widest = "9" * integer_digits(question) + ".125"
    return [{"evidence": f"value 1.2 {units[0]}", "value": "1.2", "unit": units[0]},
            {"evidence": "", "value": None, "unit": None},
            {"evidence": "x" * EVIDENCE_MAX, "value": widest, "unit": units[-1]},
            {"evidence": "0", "value": "0", "unit": units[-1]}]


def some_answer(question) -> dict:
    return valid_answers(question)[0]


# --- every question of the job: compiles, accepts valid answers, which validate ---------------------------

def test_the_job_has_its_kinds():
    assert len(YES_NO) == 15 and len(NUMERIC) == 8 and len(DATES) == 2


@pytest.mark.parametrize("question", QUESTIONS, ids=ids(QUESTIONS))
def test_valid_compact_answers_are_accepted_and_validate(question):
    for answer in valid_answers(question):
        text = compact(answer)
        assert accepts(question.id, text), text
        parsed = question.answer_model.model_validate_json(text)
        assert parsed.evidence == answer["evidence"]


@pytest.mark.parametrize("question", QUESTIONS, ids=ids(QUESTIONS))
def test_schema_is_closed_and_bounded(question):
    schema = question.json_schema
    assert schema["additionalProperties"] is False
    assert schema["properties"]["evidence"]["maxLength"] == EVIDENCE_MAX
    assert set(schema["required"]) == set(schema["properties"])
    assert issubclass(question.answer_model, SCHEMA_BASE[question.spec.type])


@pytest.mark.parametrize("question", QUESTIONS, ids=ids(QUESTIONS))
def test_extra_key_is_rejected(question):
    answer = some_answer(question)
    assert not accepts(question.id, compact({**answer, "confidence": "high"}))
    with pytest.raises(ValidationError):
        question.answer_model.model_validate({**answer, "confidence": "high"})


@pytest.mark.parametrize("question", QUESTIONS, ids=ids(QUESTIONS))
def test_whitespace_is_rejected(question):
    text = compact(some_answer(question))
    assert not accepts(question.id, text.replace('":', '": ', 1))  # after a colon
    assert not accepts(question.id, text.replace(",", ", ", 1))  # after a comma
    assert not accepts(question.id, " " + text)


@pytest.mark.parametrize("question", QUESTIONS, ids=ids(QUESTIONS))
def test_evidence_longer_than_the_job_allows_is_rejected(question):
    answer = {**some_answer(question), "evidence": "x" * (EVIDENCE_MAX + 1)}
    assert not accepts(question.id, compact(answer))
    with pytest.raises(ValidationError):
        question.answer_model.model_validate(answer)


@pytest.mark.parametrize("question", YES_NO, ids=ids(YES_NO))
def test_yes_no_other_answers_and_missing_fields_are_rejected(question):
    for answer in ("maybe", "Yes", "unknown", ""):
        assert not accepts(question.id, compact({"evidence": "", "answer": answer}))
    assert not accepts(question.id, compact({"evidence": ""}))
    assert not accepts(question.id, compact({"answer": "yes", "evidence": ""}))  # order is evidence first
    assert not accepts(question.id, compact({"evidence": "", "answer": True}))


@pytest.mark.parametrize("question", DATES, ids=ids(DATES))
def test_dates_are_iso_days_and_phrases_are_bounded(question):
    for date in ("2026-2-24", "2026-13-01", "2026-02-32", "26-02-24", "2026/02/24", "2026-02-24T00:00", "02-24-2026", ""):
        assert not accepts(question.id, compact({"evidence": "", "phrase": "x", "date": date})), date
    assert not accepts(question.id, compact({"evidence": "", "phrase": "x" * 41, "date": None}))
    assert not accepts(question.id, compact({"evidence": "", "date": None, "phrase": None}))  # order: phrase first
    # the grammar admits 2026-02-30 (day 30 of any month); parsing it as a date then fails (an error row, not a date)
    assert accepts(question.id, compact({"evidence": "", "phrase": "x", "date": "2026-02-30"}))


@pytest.mark.parametrize("question", EXTRA, ids=ids(EXTRA))
def test_a_choice_not_declared_is_rejected(question):
    for choice in ("unknown", "Paroxysmal", "V", "", "paroxysmal AF"):
        answer = {"evidence": "", "choice": choice}
        assert not accepts(question.id, compact(answer)), choice
        with pytest.raises(ValidationError):
            question.answer_model.model_validate(answer)
    assert "choices: I or II or III or IV" in __import__("engine.prompt", fromlist=["unit_hint"]).unit_hint(EXTRA[1])


@pytest.mark.parametrize("question", NUMERIC, ids=ids(NUMERIC))
def test_unit_not_in_the_question_is_rejected(question):
    for unit in ("mmHg", "kg", "", "MG/DL" if "mg/dL" in question.spec.units else "mg/dL"):
        assert unit not in question.spec.units
        answer = {"evidence": "1.2", "value": "1.2", "unit": unit}
        assert not accepts(question.id, compact(answer)), unit
        with pytest.raises(ValidationError):
            question.answer_model.model_validate(answer)


@pytest.mark.parametrize("question", NUMERIC, ids=ids(NUMERIC))
def test_value_with_more_integer_digits_than_the_question_allows_is_rejected(question):
    unit = next(iter(question.spec.units))
    digits = integer_digits(question)
    assert accepts(question.id, compact({"evidence": "", "value": "9" * digits, "unit": unit}))
    too_long = {"evidence": "", "value": "1" * (digits + 1), "unit": unit}
    assert not accepts(question.id, compact(too_long))
    with pytest.raises(ValidationError):
        question.answer_model.model_validate(too_long)


def test_digit_limits_of_named_questions():
    assert not accepts("creatinine_max", compact({"evidence": "", "value": "12345678", "unit": "mg/dL"}))
    assert accepts("creatinine_max", compact({"evidence": "", "value": "2652", "unit": "umol/L"}))  # 30 mg/dL in umol/L
    assert not accepts("chads2_max", compact({"evidence": "", "value": "12", "unit": "points"}))
    assert accepts("chads2_max", compact({"evidence": "", "value": "6", "unit": "points"}))
    assert accepts("platelets_min", compact({"evidence": "", "value": "5000000", "unit": "/uL"}))


@pytest.mark.parametrize("question", NUMERIC, ids=ids(NUMERIC))
def test_malformed_values_are_rejected(question):
    unit = next(iter(question.spec.units))
    for value in (1.2, 12, "-1", "1.2345", "1.", ".5", "1e3", "1,2", " 1", "NaN", ""):
        assert not accepts(question.id, compact({"evidence": "", "value": value, "unit": unit})), value
    assert not accepts(question.id, '{"evidence":"","value":1.2,"unit":"%s"}' % unit)  # a JSON number


@pytest.mark.parametrize("question", QUESTIONS, ids=ids(QUESTIONS))
def test_output_must_be_complete(question):
    text = compact(some_answer(question))
    assert not accepts(question.id, text[:-1])
    assert not accepts(question.id, text + "\n")


@pytest.mark.parametrize("escaped", ["a\\nb", '\\"q\\"', "a\\\\b", "\\u00b5"])
def test_bounded_evidence_cannot_hold_json_escapes(escaped):
    """Pins an xgrammar 0.2.8 limit: a string with maxLength admits no escape sequence, so evidence can never
    contain a line break or a double quote; quotes across a line break are written with a space (ground must cope)."""
    question = YES_NO[0]
    text = '{"evidence":"%s","answer":"yes"}' % escaped
    assert question.answer_model.model_validate_json(text)  # valid JSON for the model
    assert not accepts(question.id, text)


def test_vllm_accepts_every_question_schema_for_xgrammar():
    from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

    unsupported = [q.id for q in QUESTIONS if has_xgrammar_unsupported_json_features(q.json_schema)]
    assert unsupported == []


# --- the pattern spelling (regression) and the pure constraint functions ----------------------------------

def test_number_pattern_has_no_bounded_repetition():
    """xgrammar 0.2.8 was measured to let "444444444" through `[0-9]{1,7}`, so digits are spelled out."""
    for digits in (1, 2, 4, 7, 9):
        pattern = number_pattern(digits)
        assert not re.search(r"\{\d*,?\d*\}", pattern), pattern
        assert re.fullmatch(pattern.strip("^$"), "9" * digits)
        assert not re.fullmatch(pattern.strip("^$"), "9" * (digits + 1))


def test_xgrammar_rejects_eight_digits_for_the_default_number_pattern():
    grammar = compile_grammar({"type": "string", "pattern": NUMBER_PATTERN})
    assert INTEGER_DIGITS == 7
    assert _is_grammar_accept_string(grammar, '"1234567"')
    assert _is_grammar_accept_string(grammar, '"1234567.125"')
    assert not _is_grammar_accept_string(grammar, '"12345678"')
    assert not _is_grammar_accept_string(grammar, '"1.1234"')


def test_base_schemas_compile_and_bound_generation():
    rest = {YesNoAnswer: {"answer": "no"}, NumericAnswer: {"value": None, "unit": None},
            DateAnswer: {"phrase": None, "date": None}, CategoricalAnswer: {"choice": None}}
    for model, fields in rest.items():
        schema = json_schema_for(model)
        grammar = compile_grammar(schema)
        assert schema["additionalProperties"] is False
        assert _is_grammar_accept_string(grammar, compact({"evidence": "x" * 120, **fields}))
        assert not _is_grammar_accept_string(grammar, compact({"evidence": "x" * 121, **fields}))


def test_answer_model_uses_the_jobs_evidence_length_and_units():
    question = QuestionSpec(id="potassium", type="numeric", question="Highest potassium in the note?", unit="mmol/L",
                            units={"mmol/L": 1, "mEq/L": 1}, maximum=12)
    model = answer_model_for(question, evidence_max_chars=30)
    schema = json_schema_for(model)
    grammar = compile_grammar(schema)
    assert model.__name__ == "PotassiumAnswer"
    assert _is_grammar_accept_string(grammar, compact({"evidence": "K 4.1", "value": "4.1", "unit": "mEq/L"}))
    assert not _is_grammar_accept_string(grammar, compact({"evidence": "x" * 31, "value": "4.1", "unit": "mEq/L"}))
    assert not _is_grammar_accept_string(grammar, compact({"evidence": "", "value": "123", "unit": "mEq/L"}))



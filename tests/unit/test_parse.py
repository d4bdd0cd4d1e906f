"""engine.stages.parse: model output -> typed answer or an error row with a reason; never a made-up default."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from engine.job import load_job
from engine.plan import make_plan
from engine.stages.parse import ANSWER_FIELDS, MAX_ERROR_CHARS, parse_answers, parse_one

PLAN = make_plan(load_job(Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml"))


def parse(question_id: str, raw: str | dict | None, *, problem: str | None = None, finish_reason: str | None = "stop") -> dict:
    if isinstance(raw, dict):
        raw = json.dumps(raw, separators=(",", ":"))
    return parse_one(PLAN, question_id, problem, finish_reason, raw)


# --- yes/no ------------------------------------------------------------------------------------------------

def test_yes_is_answered_true_with_evidence():
    row = parse("atrial_fibrillation", {"evidence": "Hx: AF on warfarin", "answer": "yes"})
    assert row == {"status": "answered", "value_bool": True, "evidence": "Hx: AF on warfarin"}


def test_no_is_answered_false():
    row = parse("diabetes", {"evidence": "no history of diabetes", "answer": "no"})
    assert row["status"] == "answered" and row["value_bool"] is False
    assert row.get("error") is None and row.get("value_num") is None


def test_not_in_note_has_no_value_and_empty_evidence_is_null():
    row = parse("depression", {"evidence": "  ", "answer": "not_in_note"})
    assert row["status"] == "not_in_note"
    assert row.get("value_bool") is None and row.get("value_num") is None
    assert row.get("evidence") is None


def test_evidence_is_stripped():
    row = parse("hypertension", {"evidence": "  HTN  ", "answer": "yes"})
    assert row["evidence"] == "HTN"


# --- numeric -----------------------------------------------------------------------------------------------

def test_numeric_value_with_unit():
    row = parse("creatinine_max", {"evidence": "Cr 1.4 mg/dL", "value": "1.4", "unit": "mg/dL"})
    assert row == {"status": "answered", "value_num": 1.4, "unit": "mg/dL", "evidence": "Cr 1.4 mg/dL"}


def test_numeric_value_in_another_accepted_unit_keeps_the_unit_as_written():
    row = parse("creatinine_max", {"evidence": "Cr 400 umol/L", "value": "400", "unit": "umol/L"})
    assert row["status"] == "answered"  # 400 umol/L = 4.5 mg/dL: plausible
    assert row["value_num"] == 400.0 and row["unit"] == "umol/L"


def test_numeric_value_without_a_unit_is_taken_in_the_canonical_unit():
    row = parse("hemoglobin_min", {"evidence": "Hgb 8.9", "value": "8.9", "unit": None})
    assert row["status"] == "answered" and row["value_num"] == 8.9 and row["unit"] == "g/dL"


def test_null_value_is_not_in_note():
    row = parse("lvef_min", {"evidence": "", "value": None, "unit": None})
    assert row["status"] == "not_in_note"
    assert row.get("value_num") is None and row.get("error") is None


def test_value_outside_the_plausible_range_after_unit_conversion_is_an_error():
    row = parse("creatinine_max", {"evidence": "Cr 40 mg/dL", "value": "40", "unit": "mg/dL"})
    assert row["status"] == "error"
    assert row.get("value_num") is None
    assert "40 mg/dL" in row["error"] and "plausible range" in row["error"] and "creatinine_max" in row["error"]
    assert row["evidence"] == "Cr 40 mg/dL"
    # a small number in a unit with a large factor is out of range too: 2 mmol/L of hemoglobin is fine, 20 is not
    assert parse("hemoglobin_min", {"evidence": "", "value": "2", "unit": "mmol/L"})["status"] == "answered"
    assert parse("hemoglobin_min", {"evidence": "", "value": "20", "unit": "mmol/L"})["status"] == "error"


def test_range_bounds_are_inclusive():
    assert parse("chads2_max", {"evidence": "CHADS2 6", "value": "6", "unit": "points"})["status"] == "answered"
    assert parse("chads2_max", {"evidence": "CHADS2 0", "value": "0", "unit": "points"})["status"] == "answered"
    assert parse("chads2_max", {"evidence": "CHADS2 7", "value": "7", "unit": "points"})["status"] == "error"


def test_unit_outside_the_question_is_a_schema_error():
    row = parse("creatinine_max", {"evidence": "Cr 1.4", "value": "1.4", "unit": "mmol/L"})
    assert row["status"] == "error" and "unit" in row["error"]


# --- errors --------------------------------------------------------------------------------------------------

def test_length_finish_is_an_error_naming_max_tokens():
    row = parse("atrial_fibrillation", '{"evidence":"Hx: AF on warf', finish_reason="length")
    assert row["status"] == "error"
    assert "max_tokens" in row["error"] and str(PLAN.job.model.max_tokens) in row["error"]


def test_length_finish_wins_even_if_the_text_happens_to_parse():
    row = parse("atrial_fibrillation", {"evidence": "", "answer": "yes"}, finish_reason="length")
    assert row["status"] == "error" and "max_tokens" in row["error"]


@pytest.mark.parametrize("raw", ["not json", '{"evidence":"x","answer":"yes"', "", "[]", '{"answer":"yes"}',
                                 '{"evidence":"x","answer":"maybe"}', '{"evidence":"x","answer":"yes","extra":1}'])
def test_invalid_output_is_an_error_naming_the_schema(raw):
    row = parse("atrial_fibrillation", raw)
    assert row["status"] == "error"
    assert "answer schema" in row["error"]
    assert len(row["error"]) <= MAX_ERROR_CHARS
    assert row.get("value_bool") is None


def test_no_output_is_an_error():
    row = parse("atrial_fibrillation", None)
    assert row == {"status": "error", "error": "the model returned no output"}


def test_note_error_is_passed_through_as_the_error():
    problem = "note text is empty or whitespace only"
    row = parse("atrial_fibrillation", None, problem=problem, finish_reason=None)
    assert row == {"status": "error", "error": problem}
    # even if there were an output, the note's problem decides
    row = parse("atrial_fibrillation", {"evidence": "", "answer": "yes"}, problem=problem)
    assert row == {"status": "error", "error": problem}


# --- the batch function ------------------------------------------------------------------------------------

def batch(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("note_id", pa.string()), ("question_id", pa.string()), ("note_error", pa.string()),
                        ("generation_error", pa.string()), ("finish_reason", pa.string()), ("raw_output", pa.string()),
                        ("prompt_tokens", pa.int32())])
    full = [{"note_id": "n1", "note_error": None, "generation_error": None, "finish_reason": "stop", "prompt_tokens": 10, **r}
            for r in rows]
    return pa.Table.from_pylist(full, schema=schema)


def test_parse_answers_columns_types_and_values():
    table = batch([
        {"question_id": "atrial_fibrillation", "raw_output": '{"evidence":"AF","answer":"yes"}'},
        {"question_id": "creatinine_max", "raw_output": '{"evidence":"Cr 1.4","value":"1.4","unit":"mg/dL"}'},
        {"question_id": "lvef_min", "raw_output": '{"evidence":"","value":null,"unit":null}'},
        {"question_id": "diabetes", "raw_output": None, "generation_error": "engine hiccup", "finish_reason": None},
        {"question_id": "diabetes", "raw_output": None, "note_error": "note text is empty or whitespace only", "finish_reason": None},
        {"question_id": "depression", "raw_output": "garbage"},
    ])
    out = parse_answers(table, PLAN)
    assert out.num_rows == table.num_rows
    assert out.column_names == ["note_id", "question_id", "finish_reason", "prompt_tokens", *ANSWER_FIELDS]
    for name, dtype in ANSWER_FIELDS.items():
        assert out.schema.field(name).type == dtype, name
    for dropped in ("raw_output", "generation_error", "note_error"):
        assert dropped not in out.column_names
    assert out["status"].to_pylist() == ["answered", "answered", "not_in_note", "error", "error", "error"]
    assert out["value_bool"].to_pylist() == [True, None, None, None, None, None]
    assert out["value_num"].to_pylist() == [None, 1.4, None, None, None, None]
    assert out["unit"].to_pylist() == [None, "mg/dL", None, None, None, None]
    assert out["evidence"].to_pylist() == ["AF", "Cr 1.4", None, None, None, None]
    errors = out["error"].to_pylist()
    assert errors[:3] == [None, None, None]
    assert errors[3] == "engine hiccup" and errors[4] == "note text is empty or whitespace only"
    assert "answer schema" in errors[5]


def test_parse_answers_on_an_empty_batch_keeps_the_schema():
    out = parse_answers(batch([]), PLAN)
    assert out.num_rows == 0
    for name, dtype in ANSWER_FIELDS.items():
        assert out.schema.field(name).type == dtype

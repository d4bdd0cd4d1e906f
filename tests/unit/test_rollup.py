"""engine.cohort.rollup: per-note answers to one row per patient, with Kleene any/all, max/min/latest and sources."""

from __future__ import annotations

from datetime import datetime, timedelta

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.job import JobSpec
from engine.cohort.rollup import ROLLUP_COLUMNS, patient_schema, rollup_answers

JOB = JobSpec.model_validate({
    "name": "rollup-test",
    "input": {"uri": "x.parquet", "structured": ["sex", "age"]},
    "output": {"uri": "out"},
    "questions": [
        {"id": "yn_any", "type": "yes_no", "absent": "no", "question": "Does the note say A?"},
        {"id": "yn_unknown", "type": "yes_no", "question": "Does the note say B?"},
        {"id": "yn_all", "type": "yes_no", "absent": "no", "rollup": "all", "question": "Does the note say C?"},
        {"id": "crea_max", "type": "numeric", "rollup": "max", "question": "Highest creatinine?",
         "unit": "mg/dL", "units": {"mg/dL": 1, "umol/L": 0.01131}},
        {"id": "hb_min", "type": "numeric", "rollup": "min", "question": "Lowest hemoglobin?",
         "unit": "g/dL", "units": {"g/dL": 1, "g/L": 0.1}},
        {"id": "weight", "type": "numeric", "question": "Latest weight in kg?", "unit": "kg", "units": {"kg": 1}},
        {"id": "lvef_min", "type": "numeric", "rollup": "min", "cap": 55, "question": "Lowest LVEF?",
         "unit": "%", "units": {"%": 1}},
    ],
})
T0 = datetime(2150, 1, 1)
STRUCTURED = {"sex": pa.string(), "age": pa.int64()}


def answers(*rows: dict) -> pa.Table:
    """Answer rows with defaults: note n1 of patient p1, answered, no values, charttime T0."""
    base = {"patient_id": "p1", "note_id": "n1", "status": "answered", "value_bool": None, "value_num": None,
            "unit": None, "evidence": None, "charttime": T0, "sex": "F", "age": 70}
    full = [{**base, **row} for row in rows]
    schema = pa.schema({**ROLLUP_COLUMNS, **STRUCTURED})
    return pa.Table.from_pylist(full, schema=schema)


def one(table: pa.Table, patient: str = "p1") -> dict:
    rows = [r for r in table.to_pylist() if r["patient_id"] == patient]
    assert len(rows) == 1
    return rows[0]


def yn(qid: str, note: str, status: str = "answered", value: bool | None = None, **extra) -> dict:
    return {"question_id": qid, "note_id": note, "status": status, "value_bool": value,
            "evidence": f"{qid} in {note}" if status == "answered" else None, **extra}


def num(qid: str, note: str, value: float | None, unit: str | None = None, status: str = "answered", **extra) -> dict:
    return {"question_id": qid, "note_id": note, "status": status, "value_num": value, "unit": unit,
            "evidence": f"{qid}={value} in {note}", **extra}


def test_output_schema_is_exactly_patient_schema():
    out = rollup_answers(answers(yn("yn_any", "n1", value=True)), JOB)
    assert out.schema == patient_schema(JOB, STRUCTURED)
    assert out.column_names[:4] == ["patient_id", "n_notes", "sex", "age"]
    assert out.column_names[4:7] == ["yn_any", "yn_any__note_id", "yn_any__evidence"]


def test_any_is_kleene_or_and_keeps_the_winning_note():
    out = one(rollup_answers(answers(yn("yn_any", "n1", value=False), yn("yn_any", "n2", value=True),
                                     yn("yn_any", "n3", "error")), JOB))
    assert (out["yn_any"], out["yn_any__note_id"], out["yn_any__evidence"]) == (True, "n2", "yn_any in n2")
    out = one(rollup_answers(answers(yn("yn_any", "n1", value=False), yn("yn_any", "n2", "error")), JOB))
    assert out["yn_any"] is None and out["yn_any__note_id"] is None and out["yn_any__evidence"] is None
    out = one(rollup_answers(answers(yn("yn_any", "n1", value=False), yn("yn_any", "n2", "not_in_note")), JOB))
    assert (out["yn_any"], out["yn_any__note_id"]) == (False, "n1")  # the answered False has the evidence


def test_all_is_kleene_and():
    rolled = lambda *rows: one(rollup_answers(answers(*rows), JOB))["yn_all"]  # noqa: E731
    assert rolled(yn("yn_all", "n1", value=True), yn("yn_all", "n2", value=True)) is True
    assert rolled(yn("yn_all", "n1", value=True), yn("yn_all", "n2", "error")) is None
    assert rolled(yn("yn_all", "n1", value=False), yn("yn_all", "n2", "error")) is False
    assert rolled(yn("yn_all", "n1", value=True), yn("yn_all", "n2", "not_in_note")) is False  # absent: no


def test_not_in_note_is_no_only_when_the_question_says_so_and_error_is_unknown():
    out = one(rollup_answers(answers(yn("yn_any", "n1", "not_in_note"), yn("yn_unknown", "n1", "not_in_note")), JOB))
    assert out["yn_any"] is False and out["yn_any__note_id"] == "n1"
    assert out["yn_unknown"] is None
    out = one(rollup_answers(answers(yn("yn_any", "n1", "error"), yn("yn_unknown", "n1", "error")), JOB))
    assert out["yn_any"] is None and out["yn_unknown"] is None


@pytest.mark.parametrize("status", ["error", "timeout", "truncated", None])
def test_any_status_other_than_answered_or_not_in_note_is_unknown(status):
    out = one(rollup_answers(answers(yn("yn_any", "n1", status, value=True),
                                     num("crea_max", "n1", 9.0, "mg/dL", status=status)), JOB))
    assert out["yn_any"] is None and out["crea_max"] is None


def test_answered_without_a_value_is_unknown():
    out = one(rollup_answers(answers(yn("yn_any", "n1", value=None), num("crea_max", "n1", None)), JOB))
    assert out["yn_any"] is None and out["crea_max"] is None


def test_max_and_min_convert_units_first_and_keep_the_source():
    out = one(rollup_answers(answers(
        num("crea_max", "n1", 2.0, "mg/dL"), num("crea_max", "n2", 221, "µmol/L"), num("crea_max", "n3", 1.0),
        num("hb_min", "n1", 95, "g/L"), num("hb_min", "n2", 10.0, "g/dL"),
        num("hb_min", "n3", None, status="not_in_note"),
    ), JOB))
    assert out["crea_max"] == pytest.approx(2.49951) and out["crea_max__note_id"] == "n2"
    assert out["crea_max__evidence"] == "crea_max=221 in n2"
    assert out["hb_min"] == pytest.approx(9.5) and out["hb_min__note_id"] == "n1"


def test_a_unit_that_cannot_be_converted_is_unknown():
    out = one(rollup_answers(answers(num("crea_max", "n1", 9.0, "mmol/L"), num("crea_max", "n2", 1.5, "mg/dL")), JOB))
    assert out["crea_max"] == 1.5 and out["crea_max__note_id"] == "n2"
    out = one(rollup_answers(answers(num("crea_max", "n1", 9.0, "mmol/L")), JOB))
    assert out["crea_max"] is None and out["crea_max__note_id"] is None


def test_non_finite_numbers_are_unknown():
    out = one(rollup_answers(answers(num("crea_max", "n1", float("nan")), num("crea_max", "n2", float("inf"))), JOB))
    assert out["crea_max"] is None


def test_cap_is_applied():
    out = one(rollup_answers(answers(num("lvef_min", "n1", 70.0, "%"), num("lvef_min", "n2", 60.0, "%")), JOB))
    assert out["lvef_min"] == 55


def test_latest_is_by_charttime_not_row_order_and_skips_notes_without_a_value():
    out = one(rollup_answers(answers(
        num("weight", "n3", 80.0, charttime=T0 + timedelta(days=3)),
        num("weight", "n1", 70.0, charttime=T0 + timedelta(days=1)),
        num("weight", "n4", None, status="not_in_note", charttime=T0 + timedelta(days=9)),
        num("weight", "n5", 99.0, status="error", charttime=T0 + timedelta(days=8)),
        num("weight", "n2", 75.0, charttime=None),
    ), JOB))
    assert (out["weight"], out["weight__note_id"]) == (80.0, "n3")


def test_latest_counts_notes_without_charttime_as_oldest():
    out = one(rollup_answers(answers(num("weight", "n1", 60.0, charttime=None), num("weight", "n2", 75.0)), JOB))
    assert (out["weight"], out["weight__note_id"]) == (75.0, "n2")


def test_structured_values_come_from_the_latest_note_that_has_one():
    out = one(rollup_answers(answers(
        yn("yn_any", "n1", value=True, age=70, sex="F", charttime=T0),
        yn("yn_any", "n2", value=True, age=None, sex="M", charttime=T0 + timedelta(days=2)),
        yn("yn_any", "n0", value=True, age=68, sex="F", charttime=T0 - timedelta(days=2)),
    ), JOB))
    assert (out["age"], out["sex"], out["n_notes"]) == (70, "M", 3)


def test_one_row_per_patient_sorted_and_questions_without_rows_are_null():
    table = rollup_answers(answers(
        yn("yn_any", "a", value=True, patient_id="p2"), yn("yn_unknown", "a", value=True, patient_id="p2"),
        yn("yn_any", "b", value=False, patient_id="p1"), yn("unasked", "c", value=True, patient_id="p1"),
    ), JOB)
    assert table["patient_id"].to_pylist() == ["p1", "p2"]
    assert table["n_notes"].to_pylist() == [2, 1]
    p1 = one(table, "p1")
    assert p1["yn_unknown"] is None and p1["crea_max"] is None and p1["yn_any"] is False


def test_empty_answers_give_an_empty_patient_table():
    out = rollup_answers(answers().slice(0, 0), JOB)
    assert out.num_rows == 0 and out.schema == patient_schema(JOB, STRUCTURED)


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="sex"):
        rollup_answers(answers(yn("yn_any", "n1", value=True)).drop_columns(["sex"]), JOB)


def test_numeric_any_is_refused_when_the_job_loads():
    with pytest.raises(ValueError, match="numeric questions use max, min or latest"):
        JobSpec.model_validate({**JOB.model_dump(), "questions": [
            {"id": "x", "type": "numeric", "rollup": "any", "question": "Highest x value?",
             "unit": "u", "units": {"u": 1}}]})


# --- property test against a tiny reference implementation -----------------------------------------

def reference(values: list[tuple], how: str):
    """Kleene OR/AND, max/min over known values, latest known value by charttime (None oldest).

    `values` holds (value, charttime, answered) in note-id order; latest breaks charttime ties like the
    engine: an answered row first, then the larger note id.
    """
    known = [v for v, *_ in values if v is not None]
    if how == "any":
        return True if True in known else (False if len(known) == len(values) else None)
    if how == "all":
        return False if False in known else (True if len(known) == len(values) else None)
    if how in ("max", "min"):
        return (max if how == "max" else min)(known) if known else None
    dated = [((t or datetime.min, answered, i), v) for i, (v, t, answered) in enumerate(values) if v is not None]
    return max(dated, key=lambda x: x[0])[1] if dated else None


NOTE = st.tuples(st.sampled_from(["answered_true", "answered_false", "not_in_note", "error"]),
                 st.one_of(st.none(), st.integers(0, 1000)))


@settings(max_examples=30, deadline=None)
@given(st.lists(NOTE, min_size=1, max_size=6, unique_by=lambda n: n[1] if n[1] is not None else object()),
       st.sampled_from(["any", "all", "max", "min", "latest"]), st.booleans())
def test_yes_no_rollups_match_the_reference(notes, how, absent_no):
    job = JobSpec.model_validate({**JOB.model_dump(), "questions": [
        {"id": "q", "type": "yes_no", "rollup": how, "absent": "no" if absent_no else "unknown",
         "question": "Does the note say Q?"}]})
    rows, values = [], []
    for i, (status, minutes) in enumerate(notes):
        when = None if minutes is None else T0 + timedelta(minutes=minutes)
        value = {"answered_true": True, "answered_false": False}.get(status)
        real_status = "answered" if value is not None else status
        rows.append(yn("q", f"n{i}", real_status, value, charttime=when))
        values.append((False if status == "not_in_note" and absent_no else value, when, value is not None))
    assert one(rollup_answers(answers(*rows), job))["q"] == reference(values, how)


READING = st.tuples(st.one_of(st.none(), st.floats(0, 500, allow_nan=False)),
                    st.sampled_from(["g/dL", "g/L", "mg", None]), st.one_of(st.none(), st.integers(0, 1000)))


@settings(max_examples=30, deadline=None)
@given(st.lists(READING, min_size=1, max_size=6), st.sampled_from(["max", "min", "latest"]))
def test_numeric_rollups_match_the_reference(readings, how):
    job = JobSpec.model_validate({**JOB.model_dump(), "questions": [
        {"id": "hb", "type": "numeric", "rollup": how, "question": "Hemoglobin value?", "unit": "g/dL",
         "units": {"g/dL": 1, "g/L": 0.1}}]})
    rows, values = [], []
    for i, (value, unit, minutes) in enumerate(readings):
        when = None if minutes is None else T0 + timedelta(minutes=minutes)
        rows.append(num("hb", f"n{i}", value, unit, charttime=when))
        factor = {"g/dL": 1, None: 1, "g/L": 0.1}.get(unit)
        values.append((None if value is None or factor is None else value * factor, when, True))
    want = reference(values, how)
    assert one(rollup_answers(answers(*rows), job))["hb"] == (None if want is None else pytest.approx(want))


def test_patient_range_passes_give_the_same_table(monkeypatch):
    """Large inputs are rolled up patient range by range (PASS_ROWS rows a pass): the result must not change."""
    import engine.cohort.rollup

    rows = []
    for p in range(7):
        for n in range(3):
            note = f"p{p}-n{n}"
            rows += [yn("yn_any", note, value=(p + n) % 3 == 0, patient_id=f"p{p}"),
                     num("crea_max", note, float(p + n), "mg/dL", patient_id=f"p{p}"),
                     num("weight", note, 50.0 + n, "kg", patient_id=f"p{p}", charttime=T0 + timedelta(days=n))]
    table = answers(*rows)
    whole = rollup_answers(table, JOB)
    monkeypatch.setattr(engine.cohort.rollup, "PASS_ROWS", 10)  # 63 rows: 7 passes of one patient
    assert rollup_answers(table, JOB).to_pylist() == whole.to_pylist()
    assert rollup_answers(table, JOB).schema == whole.schema


def test_committed_parquet_files_roll_up_like_the_table(tmp_path):
    import pyarrow.parquet as pq

    from engine.store.answers import answers_dataset

    table = answers(yn("yn_any", "n1", value=True), num("crea_max", "n2", 1.5, "mg/dL", patient_id="p2"),
                    yn("yn_all", "n3", value=False, patient_id="p2"))
    (tmp_path / "answers").mkdir()
    pq.write_table(table.slice(0, 1), tmp_path / "answers" / "a.parquet")
    pq.write_table(table.slice(1), tmp_path / "answers" / "b.parquet")
    assert rollup_answers(answers_dataset(str(tmp_path)), JOB).to_pylist() == rollup_answers(table, JOB).to_pylist()


"""engine.cohort.columnar: on the engine's note-major layout the numpy roll-up gives the SQL roll-up's table."""

from __future__ import annotations

from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.store.answers import answers_dataset
from engine.job import JobSpec
from engine.cohort.rollup import ROLLUP_COLUMNS, patient_schema_of, rollup_answers, rollup_sql
from engine.cohort.columnar import columnar_rollup
from test_rollup import JOB

QUESTIONS = JOB.model_dump()["questions"]  # any/all yes_no, max/min/latest numeric with units and a cap
T0 = datetime(2150, 1, 1)
SCHEMA = pa.schema({**ROLLUP_COLUMNS, "grounding": pa.string(), "verified": pa.bool_(), "model": pa.string(),
                    "row_number": pa.int64(), "sex": pa.string(), "age": pa.int64()})


def job_for(grounded: bool, fuzzy: bool, verified: bool = True) -> JobSpec:
    return JobSpec.model_validate({**JOB.model_dump(), "review": {"require_grounded_evidence": grounded,
                                                                  "accept_fuzzy": fuzzy,
                                                                  "require_verified_answers": verified}})


ANSWER = st.fixed_dictionaries({
    "status": st.sampled_from(["answered", "answered", "not_in_note", "error", None]),
    "value_bool": st.one_of(st.none(), st.booleans()),
    "value_num": st.one_of(st.none(), st.sampled_from([0.0, 1.5, 60.0, 120.0, float("inf")]),
                           st.floats(0, 500, allow_nan=False)),
    "unit": st.sampled_from([None, "mg/dL", "umol/L", "g/dL", "g/L", "kg", "%", "lb"]),
    "evidence": st.one_of(st.none(), st.sampled_from(["quote a", "quote b"])),
    "grounding": st.sampled_from([None, "exact", "fuzzy", "not_found"]),
    "verified": st.sampled_from([None, True, False]),  # a model answer's check against the note
    "model": st.sampled_from(["m", "cues", None]),  # cues: the cue answer stood in for a failed model answer
})
NOTE = st.fixed_dictionaries({
    "patient": st.sampled_from(["p1", "p2", "p3", "p10"]),
    "minutes": st.one_of(st.none(), st.sampled_from([0, 5]), st.integers(0, 100)),  # equal times: tie-breaks
    "sex": st.one_of(st.none(), st.sampled_from(["F", "M"])),
    "age": st.one_of(st.none(), st.integers(18, 99)),
    "answers": st.lists(ANSWER, min_size=len(QUESTIONS), max_size=len(QUESTIONS)),
})


def note_major(notes: list[dict]) -> pa.Table:
    """The engine's layout: each note's rows contiguous, one per question in job order, one row_number."""
    rows = []
    for i, note in enumerate(notes):
        when = None if note["minutes"] is None else T0 + timedelta(minutes=note["minutes"])
        for question, answer in zip(QUESTIONS, note["answers"]):
            rows.append({"patient_id": note["patient"], "note_id": f"n{i:02d}", "question_id": question["id"],
                         "charttime": when, "row_number": i, "sex": note["sex"], "age": note["age"], **answer})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(NOTE, min_size=1, max_size=9), st.booleans(), st.booleans(), st.booleans())
def test_columnar_rollup_equals_the_sql_rollup(notes, grounded, fuzzy, verified):
    job = job_for(grounded, fuzzy, verified)
    table = note_major(notes)
    fast = columnar_rollup(table, job, patient_schema_of(table, job), list(ROLLUP_COLUMNS))
    assert fast is not None, "a note-major table must take the columnar path"
    assert fast.to_pylist() == rollup_sql(table, job).to_pylist()
    assert fast.schema == rollup_sql(table, job).schema


def test_committed_files_take_the_columnar_path_and_match_sql(tmp_path):
    notes = [{"patient": f"p{i % 3}", "minutes": i % 4, "sex": "F", "age": 60 + i,
              "answers": [{"status": "answered", "value_bool": i % 2 == 0, "value_num": float(i), "unit": unit,
                           "evidence": f"q{i}", "grounding": "exact",
                           # failed model answers in the second file only, some replaced by the cue answer: the
                           # first file's `model` column is never read, the second's is
                           "verified": None if i < 5 else i % 3 != 0, "model": "cues" if i % 4 == 0 else "m"}
                          for unit in (None, None, None, "mg/dL", "g/dL", "kg", "%")]} for i in range(12)]
    table = note_major(notes)
    (tmp_path / "answers").mkdir()
    pq.write_table(table.slice(0, 5 * len(QUESTIONS)), tmp_path / "answers" / "a.parquet")
    pq.write_table(table.slice(5 * len(QUESTIONS)), tmp_path / "answers" / "b.parquet")
    dataset, job = answers_dataset(str(tmp_path)), job_for(True, False)
    fast = columnar_rollup(dataset, job, patient_schema_of(dataset, job), list(ROLLUP_COLUMNS))
    assert fast is not None
    assert fast.to_pylist() == rollup_sql(table, job).to_pylist() == rollup_answers(dataset, job).to_pylist()
    assert fast.num_rows == 3 and fast["n_notes"].to_pylist() == [4, 4, 4]
    assert any(any(fast[f"{q['id']}__unverified"].to_pylist()) for q in QUESTIONS)  # a failure decides a winner


def _base() -> pa.Table:
    return note_major([{"patient": "p1", "minutes": 1, "sex": "F", "age": 70,
                        "answers": [{"status": "answered", "value_bool": True, "value_num": 1.0, "unit": None,
                                     "evidence": None, "grounding": None}] * len(QUESTIONS)},
                       {"patient": "p2", "minutes": 2, "sex": "M", "age": 71,
                        "answers": [{"status": "not_in_note", "value_bool": None, "value_num": None, "unit": None,
                                     "evidence": None, "grounding": None}] * len(QUESTIONS)}])


@pytest.mark.parametrize("break_layout", [
    lambda t: t.drop_columns(["row_number"]),                                      # not the engine's output
    lambda t: t.take(list(range(1, t.num_rows)) + [0]),                           # a note's rows out of order
    lambda t: t.slice(1),                                                          # a note missing a question
    lambda t: t.set_column(t.schema.get_field_index("question_id"), "question_id",
                           pa.array(["other"] + t["question_id"].to_pylist()[1:])),  # a question the job lacks
    lambda t: t.set_column(t.schema.get_field_index("patient_id"), "patient_id",
                           pa.array([None] + t["patient_id"].to_pylist()[1:], pa.string())),
    lambda t: t.set_column(t.schema.get_field_index("note_id"), "note_id",
                           pa.array(["x"] + t["note_id"].to_pylist()[1:])),         # two notes under one row number
], ids=["no-row-number", "rotated", "short", "unknown-question", "null-patient", "split-note"])
def test_other_layouts_fall_back_to_sql(break_layout):
    job = job_for(False, False)
    table = break_layout(_base())
    assert columnar_rollup(table, job, patient_schema_of(table, job), list(ROLLUP_COLUMNS)) is None
    assert rollup_answers(table, job).to_pylist() == rollup_sql(table, job).to_pylist()


# --- windows: both roll-ups, equal; and equal to the columnar roll-up of the rows a window keeps, worked out in Python ---
DAY_NOTE = st.fixed_dictionaries({
    "patient": st.sampled_from(["p1", "p2", "p3"]),
    "days": st.one_of(st.none(), st.integers(0, 40)),  # day of the note; None: no charttime (counted, flagged)
    "sex": st.just("F"), "age": st.just(70),
    "answers": st.lists(ANSWER, min_size=len(QUESTIONS), max_size=len(QUESTIONS)),
})
# the window each question may take: yes/no questions rolled up with any (absent: "no": a note outside says "no")
# and numeric ones (a note outside is left out)
WINDOWABLE = [q["id"] for q in QUESTIONS if q["type"] == "numeric" or (q["type"] == "yes_no" and q.get("absent") == "no"
                                                                      and q.get("rollup") in (None, "any"))]
WINDOW_DAYS = {"0d": 0, "3d": 3, "1w": 7, "2w": 14}


def windowed_job(windows: dict[str, str], verified: bool) -> JobSpec:
    questions = [{**q, "lookback": windows.get(q["id"])} for q in QUESTIONS]
    return JobSpec.model_validate({**job_for(True, True, verified).model_dump(), "questions": questions})


def kept_by_windows(notes: list[dict], windows: dict[str, str]) -> pa.Table:
    """The note-major table as a window leaves it, worked out here in Python: index date = the patient's latest
    note's day; an answer of a dated note before index - lookback says "not in note" (a yes/no question: "no") or
    is an error row (a number: left out of max/min/latest)."""
    latest = {}
    for note in notes:
        if note["days"] is not None:
            latest[note["patient"]] = max(latest.get(note["patient"], -1), note["days"])
    changed = []
    for note in notes:
        answers = []
        for question, answer in zip(QUESTIONS, note["answers"]):
            window = windows.get(question["id"])
            outside = window is not None and note["days"] is not None and \
                not latest[note["patient"]] - WINDOW_DAYS[window] <= note["days"]
            if outside:
                status = "not_in_note" if question["type"] == "yes_no" else "error"
                answer = {**answer, "status": status, "value_bool": None, "evidence": None, "grounding": None,
                          "verified": None}
            answers.append(answer)
        changed.append({**note, "answers": answers, "minutes": None if note["days"] is None else note["days"] * 1440})
    return note_major(changed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(DAY_NOTE, min_size=1, max_size=9),
       st.dictionaries(st.sampled_from(WINDOWABLE), st.sampled_from(list(WINDOW_DAYS)), min_size=1), st.booleans())
def test_windows_keep_what_the_columnar_rollup_of_the_kept_rows_gives(notes, windows, verified):
    job = windowed_job(windows, verified)
    table = note_major([{**n, "minutes": None if n["days"] is None else n["days"] * 1440} for n in notes])
    fast = columnar_rollup(table, job, patient_schema_of(table, job), list(ROLLUP_COLUMNS))
    assert fast is not None, "windows take the columnar path too"
    assert fast.to_pylist() == rollup_sql(table, job).to_pylist() and fast.schema == rollup_sql(table, job).schema
    plain = job_for(True, True, verified)
    kept = kept_by_windows(notes, windows)
    expected = columnar_rollup(kept, plain, patient_schema_of(kept, plain), list(ROLLUP_COLUMNS))
    got = rollup_answers(table, job).select(expected.column_names)
    assert got.to_pylist() == expected.to_pylist()
    counts = rollup_answers(table, job)
    for qid in windows:  # the undated notes each window counted
        undated = {p: sum(1 for n in notes if n["patient"] == p and n["days"] is None) for p in {n["patient"] for n in notes}}
        assert dict(zip(counts["patient_id"].to_pylist(), counts[f"{qid}__undated_notes"].to_pylist())) == undated


# --- date and categorical questions, windowed or not, and an index table with missing patients --------------------
TIMED_QUESTIONS = [
    {"id": "event_date", "type": "date", "question": "When did the event occur?"},
    {"id": "first_date", "type": "date", "rollup": "min", "question": "When did it first occur?", "lookback": "1w"},
    {"id": "last_said", "type": "date", "rollup": "latest", "question": "What date does the latest note give?"},
    {"id": "af_type", "type": "categorical", "question": "Which AF type?", "choices": ["paroxysmal", "persistent", "permanent"]},
    {"id": "nyha", "type": "categorical", "rollup": "max", "question": "Which NYHA class?", "choices": ["I", "II", "III", "IV"],
     "lookback": "3d", "lookahead": "2d"},
    {"id": "any_event", "type": "yes_no", "question": "Does the note say an event happened?", "lookback": "2w"},  # absent unknown
    {"id": "all_event", "type": "yes_no", "rollup": "all", "absent": "no", "question": "Is the event in every note?", "lookback": "3d"},
]
TIMED_SCHEMA = pa.schema({**ROLLUP_COLUMNS, "value_date": pa.date32(), "value_text": pa.string(), "grounding": pa.string(),
                          "verified": pa.bool_(), "model": pa.string(), "row_number": pa.int64(), "sex": pa.string(),
                          "age": pa.int64()})
TIMED_ANSWER = st.fixed_dictionaries({
    "status": st.sampled_from(["answered", "answered", "not_in_note", "error"]),
    "value_bool": st.one_of(st.none(), st.booleans()),
    "value_date": st.one_of(st.none(), st.dates(datetime(2149, 12, 1).date(), datetime(2150, 3, 1).date())),
    "value_text": st.sampled_from([None, "paroxysmal", "permanent", "II", "IV", "other"]),
    "evidence": st.sampled_from([None, "quote"]),
    "grounding": st.sampled_from([None, "exact", "not_found"]),
    "verified": st.sampled_from([None, True, False]),
    "model": st.sampled_from(["m", "cues"]),
})
TIMED_NOTE = st.fixed_dictionaries({
    "patient": st.sampled_from(["p1", "p2", "p3"]),
    "days": st.one_of(st.none(), st.integers(0, 20)),
    "answers": st.lists(TIMED_ANSWER, min_size=len(TIMED_QUESTIONS), max_size=len(TIMED_QUESTIONS)),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(TIMED_NOTE, min_size=1, max_size=8), st.sampled_from([None, "latest_note", "unknown"]), st.booleans())
def test_dates_choices_and_windows_equal_in_both_rollups(tmp_path, notes, index, verified):
    base = {**JOB.model_dump(), "questions": TIMED_QUESTIONS,
            "review": {"require_grounded_evidence": True, "require_verified_answers": verified}}
    if index is not None:  # p1 in the table (day 10), p2 and p3 not: they fall back as `missing` says
        path = tmp_path / "index.parquet"
        pq.write_table(pa.table({"patient_id": ["p1", "p9"], "index_date": [datetime(2150, 1, 11), datetime(2150, 1, 1)]}), path)
        base["index"] = {"uri": str(path), "missing": index}
    job = JobSpec.model_validate(base)
    rows = []
    for i, note in enumerate(notes):
        when = None if note["days"] is None else T0 + timedelta(days=note["days"], hours=i % 24)
        for question, answer in zip(TIMED_QUESTIONS, note["answers"]):
            rows.append({"patient_id": note["patient"], "note_id": f"n{i:02d}", "question_id": question["id"],
                         "charttime": when, "row_number": i, "sex": "F", "age": 70, "value_num": None, "unit": None, **answer})
    table = pa.Table.from_pylist(rows, schema=TIMED_SCHEMA)
    fast = columnar_rollup(table, job, patient_schema_of(table, job), list(ROLLUP_COLUMNS))
    assert fast is not None
    slow = rollup_sql(table, job)
    assert fast.schema == slow.schema
    assert fast.to_pylist() == slow.to_pylist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dates(min_value=datetime(1900, 1, 1).date(), max_value=datetime(2199, 12, 31).date()), min_size=1, max_size=40),
       st.sampled_from(["1d", "30d", "2w", "1mo", "6mo", "13mo", "1y", "4y"]), st.sampled_from([-1, 1]))
def test_shift_days_is_relativedeltas_calendar_arithmetic(days, duration, sign):
    """The columnar roll-up's vectorised window bounds against dateutil, day by day (month ends, 29 February)."""
    from datetime import date

    from dateutil.relativedelta import relativedelta

    from engine.cohort.windows import shift_days
    from engine.job import parse_duration

    count, unit = parse_duration(duration)
    epoch = date(1970, 1, 1)
    moved = shift_days([(d - epoch).days for d in days], duration, sign)
    expected = [(d + relativedelta(**{f"{unit}s": sign * count}) - epoch).days for d in days]
    assert moved.tolist() == expected


def test_shift_days_at_month_ends_by_hand():
    from engine.cohort.windows import shift_days

    epoch = datetime(1970, 1, 1).date()
    day = lambda y, m, d: (datetime(y, m, d).date() - epoch).days  # noqa: E731
    assert shift_days([day(2136, 8, 31), day(2135, 8, 31), day(2135, 9, 14)], "6mo", -1).tolist() == [
        day(2136, 2, 29), day(2135, 2, 28), day(2135, 3, 14)]
    assert shift_days([day(2136, 2, 29)], "1y", 1).tolist() == [day(2137, 2, 28)]
    assert shift_days([day(2136, 1, 3)], "2w", -1).tolist() == [day(2135, 12, 20)]

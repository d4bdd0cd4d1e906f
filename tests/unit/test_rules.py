"""engine.cohort.rules: SQL rules with Kleene logic, per-criterion unknown handling, status, reasons, funnel, checks."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import JobError
from engine.job import JobSpec, load_job
from engine.cohort.rollup import ROLLUP_COLUMNS, patient_schema
from engine.cohort.rules import apply_rules, check_rules, cohort_funnel, screen
from engine.cohort.sql import sandbox

APIXABAN = load_job(Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml")
TYPES = {"sex": pa.string(), "age": pa.int64()}
YN = lambda qid: {"id": qid, "type": "yes_no", "absent": "no", "question": f"Does the note say {qid}?"}  # noqa: E731


def make_job(criteria: list[dict], derived: list[dict] | None = None, questions: list[dict] | None = None) -> JobSpec:
    """A small job: yes/no a, b, c; numeric x (mg/dL); structured sex, age."""
    questions = questions or [YN("a"), YN("b"), YN("c"), {"id": "x", "type": "numeric", "question": "Highest x value?",
                                                           "unit": "mg/dL", "units": {"mg/dL": 1}}]
    return JobSpec.model_validate({
        "name": "rules-test", "input": {"uri": "x.parquet", "structured": ["sex", "age"]}, "output": {"uri": "out"},
        "questions": questions, "derived": derived or [],
        "criteria": [{"kind": "exclusion", "description": "d", **c} for c in criteria],
    })


def patients(job: JobSpec, *rows: dict) -> pa.Table:
    """A patient table as roll-up returns it, from partial rows (missing columns NULL)."""
    schema = patient_schema(job, TYPES)
    full = [{"patient_id": f"p{i}", "n_notes": 1, **row} for i, row in enumerate(rows)]
    return pa.Table.from_pylist(full, schema=schema)


def states(table: pa.Table, column: str) -> list:
    return table[column].to_pylist()


# --- three-valued logic ----------------------------------------------------------------------------

TRUTH = [True, False, None]


def kleene_not(a):
    return None if a is None else not a


def kleene_and(a, b):
    return False if False in (a, b) else (None if None in (a, b) else True)


def kleene_or(a, b):
    return True if True in (a, b) else (None if None in (a, b) else False)


EXPR = st.recursive(
    st.sampled_from(["a", "b", "c"]),
    lambda inner: st.one_of(
        st.builds(lambda e: ("not", e), inner),
        st.builds(lambda left, right: ("and", left, right), inner, inner),
        st.builds(lambda left, right: ("or", left, right), inner, inner),
    ),
    max_leaves=6,
)


def to_sql(e) -> str:
    if isinstance(e, str):
        return e
    if e[0] == "not":
        return f"(NOT {to_sql(e[1])})"
    return f"({to_sql(e[1])} {e[0].upper()} {to_sql(e[2])})"


def evaluate(e, env: dict):
    if isinstance(e, str):
        return env[e]
    if e[0] == "not":
        return kleene_not(evaluate(e[1], env))
    fn = kleene_and if e[0] == "and" else kleene_or
    return fn(evaluate(e[1], env), evaluate(e[2], env))


ALL_COMBOS = [{"a": a, "b": b, "c": c} for a in TRUTH for b in TRUTH for c in TRUTH]


@settings(max_examples=30, deadline=None)
@given(st.lists(EXPR, min_size=1, max_size=3))
def test_rules_follow_kleene_truth_tables(exprs):
    job = make_job([{"id": f"r{i}", "rule": to_sql(e)} for i, e in enumerate(exprs)])
    out = apply_rules(patients(job, *ALL_COMBOS), job)
    name = {True: "met", False: "not_met", None: "unknown"}
    for i, e in enumerate(exprs):
        assert states(out, f"r{i}") == [name[evaluate(e, env)] for env in ALL_COMBOS]


def test_unknown_numbers_propagate_and_kleene_or_can_still_decide():
    job = make_job([{"id": "high_x", "rule": "x > 2.5"}, {"id": "old_or_a", "rule": "age >= 75 OR a"},
                    {"id": "old_and_a", "rule": "age >= 75 AND a"}])
    out = apply_rules(patients(job, {"x": None, "age": None, "a": True}, {"x": 3.0, "age": None, "a": False},
                               {"x": 2.5, "age": 80, "a": None}), job)
    assert states(out, "high_x") == ["unknown", "met", "not_met"]
    assert states(out, "old_or_a") == ["met", "unknown", "met"]
    assert states(out, "old_and_a") == ["unknown", "not_met", "unknown"]


# --- the real job ----------------------------------------------------------------------------------

def test_the_real_job_checks_clean():
    assert check_rules(APIXABAN) == []
    assert check_rules(APIXABAN, TYPES) == []


@pytest.mark.parametrize(("sex", "ast", "expected"), [
    ("F", 64.0, "not_met"), ("F", 65.0, "met"), ("M", 65.0, "not_met"), ("M", 80.0, "not_met"), ("M", 81.0, "met"),
    ("F", None, "unknown"),
])
def test_ast_limit_is_sex_specific_through_derived_ast_uln(sex, ast, expected):
    out = apply_rules(patients(APIXABAN, {"sex": sex, "ast_max": ast}), APIXABAN)
    assert states(out, "ast_uln") == [32 if sex == "F" else 40]
    assert states(out, "exc_ast") == [expected]


def test_real_job_thresholds_and_derived_values():
    out = apply_rules(patients(APIXABAN, {
        "sex": "M", "age": 76, "atrial_fibrillation": True, "hypertension": True, "heart_failure": False,
        "diabetes": False, "prior_stroke_tia": True, "creatinine_max": 2.5, "bilirubin_max": 1.8,
        "hemoglobin_min": 9.0, "platelets_min": 100.0, "chads2_max": 4.0,
    }), APIXABAN)
    row = out.to_pylist()[0]
    assert row["chads2_computed"] == 4 and row["chads2_disagrees"] is False
    assert (row["exc_creatinine"], row["exc_hemoglobin"], row["exc_platelets"]) == ("not_met", "not_met", "met")
    assert row["exc_bilirubin"] == "met"  # 1.8 >= 1.5 * 1.2
    assert row["status"] == "excluded" and row["reasons"] == ["exc_platelets", "exc_bilirubin"]


def test_real_job_eligible_patient_and_unknown_labs_read_as_not_met():
    out = apply_rules(patients(APIXABAN, {
        "sex": "F", "age": 60, **{q.id: False for q in APIXABAN.questions if q.type == "yes_no"},
        "atrial_fibrillation": True, "diabetes": True,
    }), APIXABAN)
    row = out.to_pylist()[0]
    assert row["exc_creatinine"] == "unknown" and row["status"] == "eligible" and row["reasons"] == []


# --- unknown handling, status, reasons, funnel -----------------------------------------------------

UNKNOWN_JOB = make_job([
    {"id": "inc_a", "kind": "inclusion", "rule": "a", "unknown": "needs_review"},
    {"id": "exc_b", "rule": "b", "unknown": "not_met"},
    {"id": "exc_c", "rule": "c", "unknown": "met"},
    {"id": "inc_x", "kind": "inclusion", "rule": "x < 10", "unknown": "not_met"},
])


@pytest.mark.parametrize(("row", "status", "reasons"), [
    ({"a": True, "b": False, "c": False, "x": 1.0}, "eligible", []),
    ({"a": None, "b": False, "c": False, "x": 1.0}, "needs_review", ["inc_a"]),
    ({"a": True, "b": None, "c": False, "x": 1.0}, "eligible", []),
    ({"a": True, "b": False, "c": None, "x": 1.0}, "excluded", ["exc_c"]),
    ({"a": True, "b": False, "c": False, "x": None}, "excluded", ["inc_x"]),
    ({"a": False, "b": True, "c": False, "x": 1.0}, "excluded", ["inc_a", "exc_b"]),
    ({"a": None, "b": True, "c": None, "x": 20.0}, "excluded", ["exc_b", "exc_c", "inc_x"]),
])
def test_status_precedence_and_reasons_in_job_order(row, status, reasons):
    out = apply_rules(patients(UNKNOWN_JOB, row), UNKNOWN_JOB)
    assert states(out, "status") == [status]
    assert states(out, "reasons") == [reasons]


def test_output_keeps_the_patient_columns_and_adds_typed_decisions():
    table = patients(UNKNOWN_JOB, {"a": True}, {"a": None})
    out = apply_rules(table, UNKNOWN_JOB)
    assert out.select(table.column_names).equals(table)
    assert out.schema.field("status").type == pa.string()
    assert out.schema.field("reasons").type == pa.list_(pa.string())
    assert all(out.schema.field(c.id).type == pa.string() for c in UNKNOWN_JOB.criteria)


def test_funnel_counts_and_drops_patients_at_their_first_excluding_criterion():
    rows = [
        {"a": True, "b": False, "c": False, "x": 1.0},   # eligible
        {"a": None, "b": False, "c": False, "x": 1.0},   # needs review at inc_a, stays in
        {"a": False, "b": True, "c": False, "x": 1.0},   # out at inc_a
        {"a": True, "b": True, "c": None, "x": 1.0},     # out at exc_b
        {"a": True, "b": None, "c": None, "x": None},    # out at exc_c (unknown: met)
        {"a": True, "b": False, "c": False, "x": None},  # out at inc_x (unknown: not_met)
    ]
    funnel = cohort_funnel(apply_rules(patients(UNKNOWN_JOB, *rows), UNKNOWN_JOB), UNKNOWN_JOB)
    assert [f["criterion"] for f in funnel] == ["inc_a", "exc_b", "exc_c", "inc_x"]
    assert [(f["met"], f["not_met"], f["unknown"]) for f in funnel] == [(4, 1, 1), (2, 3, 1), (0, 4, 2), (4, 0, 2)]
    assert [f["entering"] for f in funnel] == [6, 5, 4, 3]
    assert [f["excluded"] for f in funnel] == [1, 1, 1, 1]
    assert [f["needs_review"] for f in funnel] == [1, 0, 0, 0]
    assert [f["remaining"] for f in funnel] == [5, 4, 3, 2]


def test_funnel_applies_rules_itself_when_given_a_bare_patient_table():
    table = patients(UNKNOWN_JOB, {"a": True, "b": False, "c": False, "x": 1.0})
    assert cohort_funnel(table, UNKNOWN_JOB)[-1]["remaining"] == 1


def test_screen_runs_rollup_rules_and_funnel():
    rows = [{"patient_id": "p1", "note_id": "n1", "question_id": q, "status": s, "value_bool": v, "value_num": None,
             "unit": None, "evidence": None, "charttime": datetime(2150, 1, 1), "sex": "F", "age": 80}
            for q, s, v in [("a", "answered", True), ("b", "not_in_note", None), ("c", "error", None)]]
    answers = pa.Table.from_pylist(rows, schema=pa.schema({**ROLLUP_COLUMNS, **TYPES}))
    out, funnel = screen(answers, UNKNOWN_JOB)
    row = out.to_pylist()[0]
    assert (row["inc_a"], row["exc_b"], row["exc_c"], row["inc_x"]) == ("met", "not_met", "unknown", "unknown")
    assert row["status"] == "excluded" and row["reasons"] == ["exc_c", "inc_x"]
    assert funnel[-1]["remaining"] == 0


# --- check_rules ---------------------------------------------------------------------------------

def only_problem(job: JobSpec, types=TYPES) -> str:
    problems = check_rules(job, types)
    assert len(problems) == 1, problems
    return problems[0]


def test_unknown_name_names_the_yaml_path_and_the_known_names():
    job = make_job([{"id": "ok", "rule": "a"}, {"id": "typo", "rule": "a AND diabtes"}])
    message = only_problem(job)
    assert message.startswith("criteria[1].rule:") and "diabtes" in message
    assert "known names:" in message and "age" in message and "x" in message


def test_derived_may_use_earlier_derived_but_not_later_ones():
    one, twice = {"id": "one", "expr": "x"}, {"id": "twice", "expr": "2 * one"}
    assert check_rules(make_job([{"id": "r", "rule": "twice > 4"}], derived=[one, twice]), TYPES) == []
    bad = make_job([{"id": "r", "rule": "twice > 4"}], derived=[twice, one])
    message = only_problem(bad)
    assert message.startswith("derived[0].expr:") and "defined before" in message


def test_a_criterion_must_be_boolean_but_derived_may_be_any_type():
    job = make_job([{"id": "r", "rule": "x * 2"}], derived=[{"id": "label", "expr": "CASE WHEN a THEN 'yes' END"}])
    message = only_problem(job)
    assert message.startswith("criteria[0].rule:") and "boolean" in message and "DOUBLE" in message


def test_type_errors_are_reported_with_the_input_types():
    job = make_job([{"id": "r", "rule": "age >= 75"}])
    assert check_rules(job, TYPES) == []
    message = only_problem(job, {"sex": pa.string(), "age": pa.string()})
    assert message.startswith("criteria[0].rule:") and "VARCHAR" in message


@pytest.mark.parametrize("rule", [
    "1) FROM x; DROP TABLE y; SELECT (1",
    "a; DROP TABLE patients",
    "a; SELECT 1",
    "a FROM patients",
    "a WHERE b",
    "a AS b",
    "a LIMIT 1",
    "a UNION SELECT TRUE",
    "a, b",
    "(SELECT bool_or(a) FROM patients)",
    "EXISTS (SELECT 1)",
    "bool_or(a)",
    "count(*) > 1",
    "bool_or(a) OVER ()",
    "a AND",
    "__import__('os').system('true')",
])
def test_anything_but_one_scalar_expression_is_refused(rule):
    message = only_problem(make_job([{"id": "ok", "rule": "a"}, {"id": "evil", "rule": rule}]))
    assert message.startswith("criteria[1].rule:")


@pytest.mark.parametrize("rule", [
    "read_csv('/etc/passwd') IS NOT NULL",
    "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0",
    "(SELECT count(*) FROM '/etc/passwd') > 0",
    "getenv('HOME') IS NOT NULL",
    "length(read_text('/etc/passwd')) > 0",
])
def test_rules_cannot_read_files_or_the_environment(rule):
    message = only_problem(make_job([{"id": "peek", "rule": rule}]))
    assert message.startswith("criteria[0].rule:")


def test_derived_problems_name_their_path_too():
    job = make_job([{"id": "r", "rule": "a"}], derived=[{"id": "d", "expr": "read_csv('/etc/passwd')"}])
    assert only_problem(job).startswith("derived[0].expr:")


def test_apply_rules_refuses_a_job_whose_rules_do_not_check():
    job = make_job([{"id": "r", "rule": "nonsense > 1"}])
    with pytest.raises(JobError, match=r"criteria\[0\]\.rule"):
        apply_rules(patients(job, {"a": True}), job)


def test_ids_that_clash_with_output_columns_are_refused_when_the_job_loads():
    with pytest.raises(ValueError, match="duplicate .* id\\(s\\): status"):
        make_job([{"id": "status", "rule": "a"}])
    with pytest.raises(ValueError, match="duplicate .* id\\(s\\): sex"):
        make_job([{"id": "r", "rule": "a"}], questions=[YN("a"), YN("sex")])


def test_the_sandbox_cannot_read_files_or_be_reconfigured():
    con = sandbox()
    with pytest.raises(duckdb.Error):
        con.sql("SELECT * FROM read_csv('/etc/passwd')").fetchall()
    with pytest.raises(duckdb.Error):
        con.sql("SET enable_external_access = true")


def test_empty_tables_and_jobs_without_criteria():
    empty = apply_rules(patients(APIXABAN), APIXABAN)
    assert empty.num_rows == 0 and "status" in empty.column_names
    assert cohort_funnel(empty, APIXABAN)[0]["entering"] == 0
    job = make_job([])
    out = apply_rules(patients(job, {"a": True}), job)
    assert states(out, "status") == ["eligible"] and states(out, "reasons") == [[]]
    assert cohort_funnel(out, job) == []


# --- dates -----------------------------------------------------------------------------------------------------------

def test_days_between_counts_calendar_days_and_a_missing_date_is_unknown():
    import datetime as dt

    questions = [{"id": "stroke_date", "type": "date", "question": "When did the stroke occur?"},
                 {"id": "af_type", "type": "categorical", "question": "Which type of AF?", "choices": ["paroxysmal", "permanent"]},
                 {**YN("recent_stroke"), "lookback": "30d"}]
    job = make_job([{"id": "exc", "rule": "days_between(stroke_date, index_date) <= 30"},
                    {"id": "exc_or", "rule": "recent_stroke OR coalesce(days_between(stroke_date, index_date) BETWEEN 0 AND 30, FALSE)"},
                    {"id": "permanent", "rule": "af_type = 'permanent'"}], questions=questions)
    D = dt.date
    table = patients(job,
                     {"stroke_date": D(2026, 2, 8), "index_date": D(2026, 3, 10), "recent_stroke": False},   # 30 days
                     {"stroke_date": D(2026, 2, 7), "index_date": D(2026, 3, 10), "recent_stroke": False},   # 31 days
                     {"stroke_date": D(2025, 12, 31), "index_date": D(2026, 1, 1), "recent_stroke": False},  # 1 day, over a year end
                     {"stroke_date": None, "index_date": D(2026, 3, 10), "recent_stroke": False, "af_type": "permanent"},
                     {"stroke_date": None, "index_date": D(2026, 3, 10), "recent_stroke": True, "af_type": "paroxysmal"},
                     {"stroke_date": D(2026, 3, 12), "index_date": D(2026, 3, 10), "recent_stroke": False})  # after the index
    ruled = apply_rules(table, job)
    assert states(ruled, "exc") == ["met", "not_met", "met", "unknown", "unknown", "met"]
    assert states(ruled, "exc_or") == ["met", "not_met", "met", "not_met", "met", "not_met"]
    assert states(ruled, "permanent") == ["unknown", "unknown", "unknown", "met", "not_met", "unknown"]
    text = make_job([{"id": "bad", "rule": "days_between(stroke_date, 'soon') IS NULL AND days_between('2026-03-01', index_date) = 9"}],
                    questions=questions)
    # text that is no date is unknown; 1 March to 10 March is 9 days (the third patient's index date is 1 January)
    assert states(apply_rules(table, text), "bad") == ["met", "met", "not_met", "met", "met", "met"]


def test_within_is_the_lookback_windows_calendar_arithmetic_and_a_missing_date_is_unknown():
    import datetime as dt

    questions = [{"id": "bleeding_date", "type": "date", "question": "When did the serious bleed occur?"},
                 {**YN("recent_bleed"), "lookback": "6mo"}]
    job = make_job([{"id": "six_months", "rule": "within(bleeding_date, index_date, '6mo')"},
                    {"id": "two_weeks", "rule": "within(bleeding_date, index_date, '2w')"}], questions=questions)
    D = dt.date
    table = patients(job,
                     {"bleeding_date": D(2135, 3, 14), "index_date": D(2135, 9, 14)},  # exactly 6 calendar months
                     {"bleeding_date": D(2135, 3, 13), "index_date": D(2135, 9, 14)},  # a day more
                     {"bleeding_date": D(2136, 2, 29), "index_date": D(2136, 8, 31)},  # 31 Aug - 6 months = 29 Feb (leap)
                     {"bleeding_date": D(2136, 2, 28), "index_date": D(2136, 8, 31)},
                     {"bleeding_date": D(2135, 12, 20), "index_date": D(2136, 1, 3)},   # 14 days over a year end
                     {"bleeding_date": D(2136, 1, 4), "index_date": D(2136, 1, 3)},     # after the index date
                     {"bleeding_date": None, "index_date": D(2136, 1, 3)})
    ruled = apply_rules(table, job)
    assert states(ruled, "six_months") == ["met", "not_met", "met", "not_met", "met", "not_met", "unknown"]
    assert states(ruled, "two_weeks") == ["not_met", "not_met", "not_met", "not_met", "met", "not_met", "unknown"]


@pytest.mark.parametrize("rule, says", [
    ("within(bleeding_date, index_date, '6 months')", "not a duration"),
    ("within(bleeding_date, index_date, bleeding_date)", "literal duration"),
    ("within(bleeding_date, index_date, NULL)", "literal duration"),
])
def test_within_refuses_a_span_that_is_not_the_jobs_duration_form(rule, says):
    questions = [{"id": "bleeding_date", "type": "date", "question": "When did the serious bleed occur?"},
                 {**YN("recent_bleed"), "lookback": "6mo"}]
    problems = check_rules(make_job([{"id": "c", "rule": rule}], questions=questions))
    assert len(problems) == 1 and says in problems[0] and "criteria[0].rule" in problems[0], problems

"""engine.reporting.evaluate: a perfect predictor scores 1.0 everywhere, corrupted predictions score exactly what a hand count
says, metric properties hold (hypothesis), and `engine eval` writes eval.md, eval.parquet and report.html."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from report_fixtures import EXPECTED, GOLD, ROOT, gold_answers, write_output_folder
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import EngineError, InputError
from engine.reporting.evaluate import (
    EVAL_MARKDOWN,
    EVAL_PARQUET,
    balanced_accuracy,
    bootstrap_sums,
    criterion_counts,
    evaluate,
    f1_yes,
    output_folder,
    read_evaluation,
    read_parquet,
    to_markdown,
    write_evaluation,
    yes_no_counts,
)
from engine.job import JobSpec, load_job
from engine.store.layout import OutputStore

DRAWS = 200  # enough to check intervals; the CLI default is 1000


@pytest.fixture(scope="module")
def job() -> JobSpec:
    return load_job(ROOT / "jobs" / "apixaban.yaml")


@pytest.fixture(scope="module")
def gold() -> pa.Table:
    return pq.read_table(GOLD)


@pytest.fixture(scope="module")
def perfect(job) -> pa.Table:
    return gold_answers(job)


def metric(evaluation, item: str, name: str) -> dict:
    return next(r for r in evaluation.table.to_pylist() if r["id"] == item and r["metric"] == name)


def small_job() -> JobSpec:
    """Two yes/no questions (absent no / unknown) and one numeric question, for hand-counted cases."""
    return JobSpec.model_validate({
        "name": "small", "input": {"uri": "notes.parquet"}, "output": {"uri": "out"},
        "questions": [
            {"id": "af", "type": "yes_no", "absent": "no", "question": "Does the note document atrial fibrillation?"},
            {"id": "af_unknown", "type": "yes_no", "absent": "unknown", "question": "Does the note document atrial fibrillation?"},
            {"id": "creatinine", "type": "numeric", "question": "Highest serum creatinine?", "unit": "mg/dL",
             "units": {"mg/dL": 1, "umol/L": 0.01131}, "maximum": 30, "tolerance": 0.1},
        ],
    })


# gold and predicted answers of the hand-counted case: (gold value, (status, predicted value))
YES_NO_CASE = [(True, ("answered", True)), (True, ("answered", False)), (True, ("not_in_note", None)),
               (False, ("answered", False)), (False, ("not_in_note", None)), (False, ("answered", True)),
               (False, ("error", None)), (False, ("answered", False))]
NUMERIC_CASE = [((1.0, "mg/dL"), ("answered", 1.05, "mg/dL")), ((2.0, "mg/dL"), ("answered", 2.2, "mg/dL")),
                ((None, None), ("not_in_note", None, None)), ((None, None), ("answered", 1.0, "mg/dL")),
                ((88.4, "umol/L"), ("answered", 1.0, "mg/dL")), ((3.0, "mg/dL"), ("error", None, None))]


def hand_case() -> tuple[pa.Table, pa.Table]:
    """(predictions, labels) for YES_NO_CASE (asked as af and af_unknown) and NUMERIC_CASE."""
    answers, labels = [], []
    for i, (g, (status, value)) in enumerate(YES_NO_CASE):
        for qid in ("af", "af_unknown"):
            labels.append({"note_id": f"n{i}", "question_id": qid, "value_bool": g, "value_num": None, "unit": None})
            answers.append({"patient_id": f"p{i}", "note_id": f"n{i}", "question_id": qid, "status": status,
                            "value_bool": value, "value_num": None, "unit": None})
    for i, ((g, g_unit), (status, value, unit)) in enumerate(NUMERIC_CASE):
        labels.append({"note_id": f"n{i}", "question_id": "creatinine", "value_bool": None, "value_num": g, "unit": g_unit})
        answers.append({"patient_id": f"p{i}", "note_id": f"n{i}", "question_id": "creatinine", "status": status,
                        "value_bool": None, "value_num": value, "unit": unit})
    return pa.Table.from_pylist(answers), pa.Table.from_pylist(labels)


# --- a perfect predictor ---------------------------------------------------------------------------------------
def test_a_perfect_predictor_scores_one_everywhere(job, perfect, gold):
    evaluation = evaluate(job, perfect, gold, pq.read_table(EXPECTED), draws=DRAWS)
    rows = evaluation.table.to_pylist()
    assert {r["metric"] for r in rows} >= {"balanced_accuracy", "f1_yes", "accuracy", "not_in_note_precision",
                                            "not_in_note_recall", "agreement", "mean_balanced_accuracy", "mean_accuracy"}
    assert all((r["value"], r["ci_low"], r["ci_high"]) == (1.0, 1.0, 1.0) for r in rows), [r for r in rows if r["value"] != 1.0]
    assert (evaluation.matched, evaluation.labels, evaluation.notes) == (gold.num_rows, gold.num_rows, 64)
    assert sum(evaluation.unmatched.values()) == 0
    assert (evaluation.patients, evaluation.unmatched_patients) == (40, 0)
    assert len([r for r in rows if r["scope"] == "question"]) == 15 * 2 + 8 * 3
    assert len([r for r in rows if r["scope"] == "criterion"]) == len(job.criteria) * 2


def test_predictions_for_some_notes_are_scored_on_those_notes_only(job, gold):
    evaluation = evaluate(job, gold_answers(job, notes=10), gold, draws=DRAWS)
    assert evaluation.notes == 10
    assert evaluation.matched == 10 * 23  # the gold labels the 23 yes/no and numeric questions, not the date ones
    assert evaluation.unmatched == {"note not in predictions": gold.num_rows - 10 * 23, "question not in the job": 0,
                                    "no prediction for the question": 0}
    assert all(r["value"] == 1.0 or math.isnan(r["value"]) for r in evaluation.table.to_pylist())


# --- corrupted copies of the gold, counted by hand ---------------------------------------------------------------
def test_flipped_gold_rows_give_the_hand_counted_numbers(job, perfect, gold):
    rows = perfect.to_pylist()
    af_yes = [r for r in rows if r["question_id"] == "atrial_fibrillation" and r["value_bool"]][:2]
    creatinine = [r for r in rows if r["question_id"] == "creatinine_max" and r["value_num"] is not None][:3]
    for r in af_yes:
        r.update(value_bool=False)  # two of the 53 gold "yes" answered "no"
    for r in creatinine:
        r.update(status="not_in_note", value_num=None, unit=None)  # three of the 57 values missed
    evaluation = evaluate(job, pa.Table.from_pylist(rows, schema=perfect.schema), gold, draws=DRAWS)

    assert metric(evaluation, "atrial_fibrillation", "balanced_accuracy")["value"] == pytest.approx((51 / 53 + 1) / 2)
    assert metric(evaluation, "atrial_fibrillation", "f1_yes")["value"] == pytest.approx(2 * 51 / (2 * 51 + 0 + 2))
    assert metric(evaluation, "creatinine_max", "accuracy")["value"] == pytest.approx(61 / 64)
    precision = metric(evaluation, "creatinine_max", "not_in_note_precision")
    assert (precision["value"], precision["n"]) == (pytest.approx(7 / 10), 10)
    assert metric(evaluation, "creatinine_max", "not_in_note_recall")["value"] == 1.0
    assert metric(evaluation, "depression", "balanced_accuracy")["value"] == 1.0
    low, high = metric(evaluation, "atrial_fibrillation", "balanced_accuracy")["ci_low"], 1.0
    assert low < (51 / 53 + 1) / 2 <= high


def test_the_hand_counted_small_case():
    predictions, labels = hand_case()
    evaluation = evaluate(small_job(), predictions, labels, draws=DRAWS)
    # absent "no": sensitivity 1/3 (notes 1-3: yes, no, not in note), specificity 3/5 (no, not-in-note=no, NO: yes,
    # NO: error, no); predicted yes twice (one right).
    assert metric(evaluation, "af", "balanced_accuracy")["value"] == pytest.approx((1 / 3 + 3 / 5) / 2)
    assert metric(evaluation, "af", "f1_yes")["value"] == pytest.approx(2 * 1 / (3 + 2))
    assert metric(evaluation, "af", "balanced_accuracy")["errors"] == 1
    # absent "unknown": 'not in note' is a wrong answer of its own, so specificity is 2/5
    assert metric(evaluation, "af_unknown", "balanced_accuracy")["value"] == pytest.approx((1 / 3 + 2 / 5) / 2)
    # numeric: 1.05 vs 1.0 ok, 2.2 vs 2.0 wrong, both not in note ok, a value where gold has none wrong,
    # 88.4 umol/L = 0.9998 mg/dL vs 1.0 ok, error wrong
    assert metric(evaluation, "creatinine", "accuracy")["value"] == pytest.approx(3 / 6)
    assert metric(evaluation, "creatinine", "not_in_note_precision")["value"] == 1.0
    assert metric(evaluation, "creatinine", "not_in_note_recall")["value"] == pytest.approx(1 / 2)
    assert metric(evaluation, "creatinine", "accuracy")["errors"] == 1
    overall = {r["metric"]: r["value"] for r in evaluation.table.to_pylist() if r["scope"] == "overall"}
    assert overall["mean_balanced_accuracy"] == pytest.approx(((1 / 3 + 3 / 5) / 2 + (1 / 3 + 2 / 5) / 2) / 2)
    assert overall["micro_f1_yes"] == pytest.approx(2 * 2 / (6 + 4))
    assert overall["mean_accuracy"] == pytest.approx(0.5)


def test_tolerance_is_inclusive_and_units_convert_both_sides():
    labels = pa.Table.from_pylist([{"note_id": f"n{i}", "question_id": "creatinine", "value_bool": None, "value_num": g, "unit": u}
                                   for i, (g, u) in enumerate([(2.0, "mg/dL"), (2.0, "mg/dL"), (1.0, "mg/dL"), (1.0, "mg/dL")])])
    predicted = [("answered", 2.1, "mg/dL"), ("answered", 2.1000001, "mg/dL"), ("answered", 88.4, "µmol/l"), ("answered", 1.0, "mmol/L")]
    answers = pa.Table.from_pylist([{"patient_id": "p", "note_id": f"n{i}", "question_id": "creatinine", "status": s,
                                     "value_bool": None, "value_num": v, "unit": u} for i, (s, v, u) in enumerate(predicted)])
    evaluation = evaluate(small_job(), answers, labels, draws=DRAWS)
    # exactly the tolerance apart: right; a hair beyond: wrong; another spelling of umol/L: right; mmol/L not accepted: wrong
    assert metric(evaluation, "creatinine", "accuracy")["value"] == pytest.approx(2 / 4)


def test_criteria_agreement_and_balanced_accuracy_by_hand():
    counts = criterion_counts(["met", "met", "not_met", "unknown"], ["met", "not_met", "not_met", "met"])
    sums = {k: v.sum() for k, v in counts.items()}
    assert sums["agree"] / sums["n"] == 0.5
    assert balanced_accuracy(sums) == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_criteria_labels_against_a_changed_rule(job, perfect, gold):
    expected = pq.read_table(EXPECTED)
    states = expected["exc_hemoglobin"].to_pylist()
    met = [i for i, s in enumerate(states) if s == "met"]
    swapped = [i for i, s in enumerate(states) if s == "not_met"][:len(met)]
    flipped = ["not_met" if i in met else "met" if i in swapped else s for i, s in enumerate(states)]
    expected = expected.set_column(expected.schema.get_field_index("exc_hemoglobin"), "exc_hemoglobin", pa.array(flipped))
    evaluation = evaluate(job, perfect, gold, expected, draws=DRAWS)
    # gold met: the k patients the rules call not met (sensitivity 0); gold not met: 40 - k, of which the k
    # patients the rules call met are wrong
    k = len(met)
    assert k == 3
    assert metric(evaluation, "exc_hemoglobin", "agreement")["value"] == pytest.approx((40 - 2 * k) / 40)
    assert metric(evaluation, "exc_hemoglobin", "balanced_accuracy")["value"] == pytest.approx((0 + (40 - 2 * k) / (40 - k)) / 2)
    assert metric(evaluation, "inc_af", "agreement")["value"] == 1.0


def test_balanced_accuracy_is_undefined_with_one_gold_class():
    counts = yes_no_counts([False, False, False], ["answered"] * 3, [False, True, False], "no")
    sums = {k: v.sum() for k, v in counts.items()}
    assert math.isnan(balanced_accuracy(sums))
    assert f1_yes(sums) == 0.0
    assert math.isnan(f1_yes({k: v.sum() for k, v in yes_no_counts([False], ["answered"], [False], "no").items()}))


# --- properties ------------------------------------------------------------------------------------------------
ANSWER = st.sampled_from([("answered", True), ("answered", False), ("not_in_note", None), ("error", None)])


@settings(max_examples=60, deadline=None)
@given(gold=st.lists(st.booleans(), min_size=2, max_size=30).filter(lambda g: any(g) and not all(g)),
       data=st.data(), scale_yes=st.integers(1, 5), scale_no=st.integers(1, 5), absent=st.sampled_from(["no", "unknown"]))
def test_balanced_accuracy_ignores_class_sizes_and_stays_in_range(gold, data, scale_yes, scale_no, absent):
    predicted = data.draw(st.lists(ANSWER, min_size=len(gold), max_size=len(gold)))
    counts = yes_no_counts(gold, [p[0] for p in predicted], [p[1] for p in predicted], absent)
    sums = {k: v.sum() for k, v in counts.items()}
    value = float(balanced_accuracy(sums))
    assert 0.0 <= value <= 1.0
    assert 0.0 <= float(f1_yes(sums)) <= 1.0
    repeat = [scale_yes if g else scale_no for g in gold]  # every yes note k times, every no note m times
    scaled = {k: (v * np.array(repeat)).sum() for k, v in counts.items()}
    assert float(balanced_accuracy(scaled)) == pytest.approx(value)


@settings(max_examples=30, deadline=None)
@given(units=st.integers(1, 40), draws=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_every_bootstrap_draw_resamples_all_units(units, draws, seed):
    counts = np.column_stack([np.ones(units), np.arange(units, dtype=float)])
    sums = bootstrap_sums(counts, draws, seed)
    assert sums.shape == (draws, 2)
    assert np.all(sums[:, 0] == units)
    assert np.array_equal(sums, bootstrap_sums(counts, draws, seed))  # a fixed seed repeats


def test_intervals_repeat_with_the_seed_and_bracket_the_value(job, gold):
    predictions, labels = hand_case()
    first = evaluate(small_job(), predictions, labels, draws=DRAWS, seed=7).table
    assert first.equals(evaluate(small_job(), predictions, labels, draws=DRAWS, seed=7).table)
    for r in first.to_pylist():
        if not math.isnan(r["ci_low"]):
            assert 0.0 <= r["ci_low"] <= r["ci_high"] <= 1.0


# --- problems are one-line errors ------------------------------------------------------------------------------
def test_duplicate_labels_are_refused():
    predictions, labels = hand_case()
    with pytest.raises(EngineError, match="more than once"):
        evaluate(small_job(), predictions, pa.concat_tables([labels, labels.slice(0, 1)]))


def test_a_label_in_a_unit_the_job_does_not_accept_is_refused():
    predictions, labels = hand_case()
    rows = labels.to_pylist()
    rows[-1]["unit"] = "furlongs"
    with pytest.raises(EngineError, match="furlongs"):
        evaluate(small_job(), predictions, pa.Table.from_pylist(rows, schema=labels.schema))


def test_unmatched_labels_are_counted_by_reason():
    predictions, labels = hand_case()
    extra = pa.Table.from_pylist([
        {"note_id": "elsewhere", "question_id": "af", "value_bool": True, "value_num": None, "unit": None},
        {"note_id": "n0", "question_id": "not_asked", "value_bool": True, "value_num": None, "unit": None},
        {"note_id": "n7", "question_id": "creatinine", "value_bool": None, "value_num": 1.0, "unit": "mg/dL"},
    ], schema=labels.schema)
    evaluation = evaluate(small_job(), predictions, pa.concat_tables([labels, extra]), draws=DRAWS)
    assert evaluation.unmatched == {"note not in predictions": 1, "question not in the job": 1, "no prediction for the question": 1}


def test_missing_label_columns_name_what_is_there(tmp_path):
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"note_id": ["a"], "answer": [1]}), path)
    with pytest.raises(InputError, match="lacks column.*question_id.*it has: note_id, answer"):
        read_parquet(str(path), None, ("note_id", "question_id"), "labels")
    with pytest.raises(InputError, match="not found"):
        read_parquet(str(tmp_path / "missing.parquet"), None, (), "labels")


def test_output_folder_of_a_predictions_uri():
    assert output_folder("out/run1") == "out/run1"
    assert output_folder("out/run1/answers/") == "out/run1"
    assert output_folder("answers") == "."
    assert output_folder("s3://bucket/run/answers") == "s3://bucket/run"


# --- files and the command -------------------------------------------------------------------------------------
def test_markdown_and_parquet_round_trip(tmp_path):
    predictions, labels = hand_case()
    evaluation = evaluate(small_job(), predictions, labels, draws=DRAWS)
    markdown = to_markdown(evaluation, small_job(), "out/small", "gold.parquet")
    assert "| Question / criterion | Type | n | Metric | Value | 95% CI | Errors |" in markdown
    assert "| af | yes_no | 8 | balanced accuracy | 0.467 |" in markdown
    assert "2TP / (2TP + FP + FN)" in markdown and "Overall: yes/no: mean balanced accuracy 0.417" in markdown
    store = OutputStore(str(tmp_path), {})
    write_evaluation(evaluation, store, markdown)
    table, summary = read_evaluation(str(tmp_path))
    assert table.equals(evaluation.table.replace_schema_metadata(table.schema.metadata))
    assert summary["matched"] == labels.num_rows and summary["draws"] == DRAWS
    assert (tmp_path / EVAL_MARKDOWN).read_text() == markdown


def test_the_eval_command_on_a_perfect_run(job, perfect, tmp_path):
    write_output_folder(tmp_path / "run", job, perfect)
    result = CliRunner().invoke(app, ["eval", str(ROOT / "jobs" / "apixaban.yaml"), "--predictions", str(tmp_path / "run" / "answers"),
                                      "--labels", str(GOLD), "--criteria-labels", str(EXPECTED), "--draws", "200"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "1472 of 1472 labels matched on 64 notes; 0 unmatched" in result.output
    assert "mean balanced accuracy 1.000 [1.000-1.000]" in result.output
    for name in (EVAL_MARKDOWN, EVAL_PARQUET, "report.html"):
        assert (tmp_path / "run" / name).exists(), name
    assert 'id="eval-plot"' in (tmp_path / "run" / "report.html").read_text()
    assert pq.read_table(tmp_path / "run" / EVAL_PARQUET).num_rows > 0


def test_the_eval_command_writes_where_it_is_told_and_fails_in_one_line(job, perfect, tmp_path):
    write_output_folder(tmp_path / "run", job, perfect.filter(pc.is_in(perfect["note_id"], value_set=perfect["note_id"].unique()[:5])))
    args = ["eval", str(ROOT / "jobs" / "apixaban.yaml"), "--predictions", str(tmp_path / "run"), "--draws", "100"]
    result = CliRunner().invoke(app, [*args, "--labels", str(GOLD), "--output", str(tmp_path / "elsewhere")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "1357 unmatched (note not in predictions 1357)" in result.output
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["eval.md", "eval.parquet", "report.html"]
    assert not (tmp_path / "run" / EVAL_MARKDOWN).exists()
    failed = CliRunner().invoke(app, [*args, "--labels", str(tmp_path / "nope.parquet")])
    assert failed.exit_code == 1
    assert failed.output.startswith("Error: labels ") and failed.output.count("\n") == 1 and "Traceback" not in failed.output


# --- date and categorical answers -----------------------------------------------------------------------------------
def test_date_and_categorical_answers_score_what_a_hand_count_says():
    import datetime as dt

    job = JobSpec.model_validate({
        "name": "t", "input": {"uri": "x"}, "output": {"uri": "y"},
        "questions": [{"id": "stroke_date", "type": "date", "question": "When was the stroke?", "tolerance": 1},
                      {"id": "af_type", "type": "categorical", "question": "Which type of AF?",
                       "choices": ["paroxysmal", "persistent", "permanent"]}]})
    D = dt.date
    gold_dates = [D(2026, 3, 2), D(2026, 3, 2), D(2026, 3, 2), None, None, D(2025, 12, 31)]
    # predictions: exact, 1 day off (within tolerance), 2 days off, both not in note, a date where gold has none, error
    pred_dates = [("answered", D(2026, 3, 2)), ("answered", D(2026, 3, 3)), ("answered", D(2026, 2, 29 - 1)),
                  ("not_in_note", None), ("answered", D(2026, 1, 1)), ("error", None)]
    gold_choices = ["paroxysmal", "paroxysmal", "persistent", "permanent", None, "persistent"]
    pred_choices = [("answered", "paroxysmal"), ("answered", "persistent"), ("answered", "persistent"),
                    ("answered", "permanent"), ("not_in_note", None), ("not_in_note", None)]
    notes = [f"n{i}" for i in range(6)]
    labels = pa.table({"note_id": notes * 2, "question_id": ["stroke_date"] * 6 + ["af_type"] * 6,
                       "value_bool": pa.nulls(12, pa.bool_()), "value_num": pa.nulls(12, pa.float64()),
                       "value_date": pa.array(gold_dates + [None] * 6, pa.date32()),
                       "value_text": pa.array([None] * 6 + gold_choices, pa.string())})
    predictions = pa.table({
        "note_id": notes * 2, "question_id": ["stroke_date"] * 6 + ["af_type"] * 6,
        "status": [s for s, _ in pred_dates] + [s for s, _ in pred_choices],
        "value_bool": pa.nulls(12, pa.bool_()), "value_num": pa.nulls(12, pa.float64()), "unit": pa.nulls(12, pa.string()),
        "value_date": pa.array([d for _, d in pred_dates] + [None] * 6, pa.date32()),
        "value_text": pa.array([None] * 6 + [c for _, c in pred_choices], pa.string())})
    rows = {(r["id"], r["metric"]): r for r in evaluate(job, predictions, labels, draws=DRAWS).table.to_pylist()}
    assert rows[("stroke_date", "accuracy")]["value"] == pytest.approx(3 / 6)  # exact, 1 day off, both not in note
    assert rows[("stroke_date", "not_in_note_recall")]["value"] == pytest.approx(1 / 2)
    assert rows[("stroke_date", "accuracy")]["errors"] == 1
    assert rows[("af_type", "accuracy")]["value"] == pytest.approx(4 / 6)  # n0, n2, n3, n4 (both not in note)
    # one-vs-rest: paroxysmal tp 1, gold 2, pred 1 -> 2/3; persistent tp 1, gold 2, pred 2 -> 1/2; permanent 1
    assert rows[("af_type", "f1:paroxysmal")]["value"] == pytest.approx(2 / 3)
    assert rows[("af_type", "f1:persistent")]["value"] == pytest.approx(1 / 2)
    assert rows[("af_type", "f1:permanent")]["value"] == pytest.approx(1.0)
    assert rows[("af_type", "macro_f1")]["value"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert rows[("date", "mean_accuracy")]["value"] == pytest.approx(0.5)
    evaluation = evaluate(job, predictions, labels, draws=DRAWS)
    assert "F1 (persistent)" in to_markdown(evaluation, job)
    with pytest.raises(EngineError, match="not among the choices"):
        evaluate(job, predictions, labels.set_column(5, "value_text", pa.array([None] * 6 + ["chronic"] * 6)), draws=DRAWS)

"""engine.store.answers: the report's aggregates over committed answers."""

from __future__ import annotations

import pyarrow as pa

from engine.store.answers import answer_totals


def test_report_totals_count_each_truncated_note_once():
    """notes_truncated counts distinct notes with a truncated row (all of a long note's questions are truncated)."""
    n = 4
    table = pa.table({
        "patient_id": ["p1"] * n, "note_id": ["n1", "n1", "n2", "n3"], "question_id": ["a", "b", "a", "a"],
        "status": ["answered", "answered", "not_in_note", "not_in_note"], "truncated": [True, True, True, False],
        "prompt_tokens": pa.array([10] * n, pa.int32()), "cached_tokens": pa.nulls(n, pa.int32()),
        "completion_tokens": pa.nulls(n, pa.int32()), "error": pa.nulls(n, pa.string()),
        "grounding": pa.nulls(n, pa.string()), "route": pa.nulls(n, pa.string()),
        "value_bool": [True, False, None, None], "value_num": pa.nulls(n, pa.float64()), "unit": pa.nulls(n, pa.string()),
    })
    totals = answer_totals(table)
    assert (totals["notes_truncated"], totals["notes"], totals["rows"], totals["prompt_tokens"]) == (2, 3, 4, 40)
    assert totals["by_status"] == {"answered": 2, "not_in_note": 2}


def test_the_report_scan_gives_the_pages_counts_too():
    """answer_totals counts each question's answers and the distinct answered numbers in its one scan, the same
    as the page's own queries (answer_categories, answered_numbers) would."""
    from report_fixtures import ROOT, gold_answers, with_errors

    from engine.job import load_job
    from engine.store.answers import answer_categories, answered_numbers

    job = load_job(ROOT / "jobs" / "apixaban.yaml")
    answers = with_errors(gold_answers(job, notes=12), 3)
    totals = answer_totals(answers)
    assert totals["by_question"] == answer_categories(answers) and len(totals["by_question"]) == len([q for q in job.questions if q.type in ("yes_no", "numeric")])  # the gold's questions
    assert totals["numbers"].equals(answered_numbers(answers)) and totals["numbers"].num_rows > 10

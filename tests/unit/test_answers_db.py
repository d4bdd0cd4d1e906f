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
    })
    totals = answer_totals(table)
    assert (totals["notes_truncated"], totals["notes"], totals["rows"], totals["prompt_tokens"]) == (2, 3, 4, 40)
    assert totals["by_status"] == {"answered": 2, "not_in_note": 2}

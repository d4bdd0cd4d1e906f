"""Candidate recall and model calls saved: what the candidate stage would skip, measured against gold labels.

Recall is the share of gold positives (a yes, or a value, for a (note, question)) where the stage found at least
one cue mention, i.e. that hybrid mode would not have decided without the model. Calls saved is the share of
(note, question) pairs that hybrid mode answers without the model, under each `ask_model` setting.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from engine.tools.inprocess import candidate_rows
from engine.job import JobSpec


def candidate_recall(job: JobSpec, gold: pa.Table) -> dict:
    """Per question and overall: gold positives, those with a candidate, recall; and model calls saved."""
    hybrid = _with_extraction(job, mode="hybrid", ask_model="candidates")
    rows = candidate_rows(hybrid).select(["note_id", "question_id", "route", "candidates", "note_error"])
    rows = rows.set_column(1, "question_id", rows["question_id"].cast(pa.string()))
    rows = rows.filter(pc.is_null(rows["note_error"]))
    positives = gold.filter(pc.or_(pc.fill_null(gold["value_bool"], False), pc.is_valid(gold["value_num"])))
    joined = positives.select(["note_id", "question_id"]).join(rows, ["note_id", "question_id"], join_type="inner")
    per_question = {}
    for question in job.questions:
        mine = joined.filter(pc.equal(joined["question_id"], question.id))
        found = int(pc.sum(pc.greater(pc.fill_null(mine["candidates"], 0), 0)).as_py() or 0)
        per_question[question.id] = {"positives": mine.num_rows, "with_candidate": found,
                                     "recall": round(found / mine.num_rows, 4) if mine.num_rows else None}
    positives_n = sum(v["positives"] for v in per_question.values())
    found_n = sum(v["with_candidate"] for v in per_question.values())
    unresolved = candidate_rows(_with_extraction(job, mode="hybrid", ask_model="unresolved"))
    unresolved = unresolved.filter(pc.is_null(unresolved["note_error"]))
    return {
        "pairs": rows.num_rows,
        "positives": positives_n,
        "recall": round(found_n / positives_n, 4) if positives_n else None,
        "missed": [(r["note_id"], r["question_id"]) for r in joined.filter(pc.equal(pc.fill_null(joined["candidates"], 0), 0)).to_pylist()],
        "model_calls_saved": {
            "ask_model=candidates": _saved(rows),
            "ask_model=unresolved": _saved(unresolved),
        },
        "per_question": per_question,
    }


def _saved(rows: pa.Table) -> float:
    to_model = int(pc.sum(pc.equal(rows["route"], "model")).as_py() or 0)
    return round(1 - to_model / rows.num_rows, 4) if rows.num_rows else 0.0


def _with_extraction(job: JobSpec, **settings) -> JobSpec:
    return job.model_copy(update={"extraction": job.extraction.model_copy(update=settings)})

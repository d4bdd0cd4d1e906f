"""Candidate recall against gold, and the lexical backend behind the model interface (real medspaCy, no model)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from conftest import GOLD, SAMPLE_NOTES
from engine.backends import Request, load_backend
from engine.plan import make_plan
from engine.tools.recall import candidate_recall


def test_candidate_recall_on_the_bundled_gold(apixaban_job):
    job = apixaban_job.model_copy(update={"input": apixaban_job.input.model_copy(update={"uri": str(SAMPLE_NOTES), "limit": None})})
    recall = candidate_recall(job, pq.read_table(GOLD))
    assert recall["positives"] > 300
    assert recall["recall"] >= 0.98, recall["missed"]
    saved = recall["model_calls_saved"]
    assert saved["ask_model=candidates"] >= 0.5 and saved["ask_model=unresolved"] >= saved["ask_model=candidates"]
    assert set(recall["per_question"]) == {q.id for q in job.questions}


def test_lexical_backend_answers_like_the_candidate_stage(apixaban_job):
    job = apixaban_job.model_copy(update={"model": apixaban_job.model.model_copy(update={"backend": "lexical"})})
    plan = make_plan(job)
    backend = load_backend(plan)
    note = "PMH: HTN, DM2. No AF.\nLabs: Creat-2.7* Hgb-8.1*"
    generations = backend.generate([Request("n1", note, q) for q in plan.questions])
    answers = {q.id: json.loads(g.text) for q, g in zip(plan.questions, generations)}
    assert answers["hypertension"]["answer"] == "yes" and answers["diabetes"]["answer"] == "yes"
    assert answers["atrial_fibrillation"]["answer"] == "no"
    assert answers["creatinine_max"]["value"] == "2.7" and answers["hemoglobin_min"]["value"] == "8.1"
    assert answers["bipolar_disorder"]["answer"] == "not_in_note"
    assert backend.model_name == "lexical" and all(g.error is None for g in generations)

"""Candidate recall against gold, and model.backend lexical as the lexical mode (real medspaCy, no model)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import GOLD, SAMPLE_NOTES
from engine.backends import load_backend
from engine.errors import BackendError
from engine.job import JobSpec
from engine.plan import make_plan
from engine.stages.candidates import assess_note
from engine.tools.recall import candidate_recall


def test_candidate_recall_on_the_bundled_gold(apixaban_job):
    job = apixaban_job.model_copy(update={"input": apixaban_job.input.model_copy(update={"uri": str(SAMPLE_NOTES), "limit": None})})
    recall = candidate_recall(job, pq.read_table(GOLD))
    assert recall["positives"] > 300
    assert recall["recall"] >= 0.98, recall["missed"]
    saved = recall["model_calls_saved"]
    assert saved["ask_model=candidates"] >= 0.5 and saved["ask_model=unresolved"] >= saved["ask_model=candidates"]
    assert set(recall["per_question"]) == {q.id for q in job.questions}


def test_the_lexical_backend_is_the_lexical_mode(apixaban_job):
    """`model.backend: lexical` loads no model: the job runs in extraction mode lexical, the cues alone."""
    spec = apixaban_job.model_dump(mode="json")
    spec["model"]["backend"] = "lexical"
    spec["extraction"]["mode"] = "hybrid"
    job = JobSpec.model_validate(spec)
    assert job.extraction.mode == "lexical"
    with pytest.raises(BackendError, match="extraction mode lexical"):
        load_backend(make_plan(job))
    note = "PMH: HTN, DM2. No AF.\nLabs: Creat-2.7* Hgb-8.1*"
    plan = make_plan(job)
    verdicts = {q.id: json.loads(v.output) for q, v in zip(plan.questions, assess_note(note, plan.questions, plan))}
    assert verdicts["hypertension"]["answer"] == "yes" and verdicts["diabetes"]["answer"] == "yes"
    assert verdicts["atrial_fibrillation"]["answer"] == "no"
    assert verdicts["creatinine_max"]["value"] == "2.7" and verdicts["hemoglobin_min"]["value"] == "8.1"
    assert verdicts["bipolar_disorder"]["answer"] == "not_in_note"

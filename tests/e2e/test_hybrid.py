"""Hybrid and lexical extraction on the real stack: local Ray, the candidate stage with medspaCy, a real vLLM CPU
engine (tiny random model) for the pairs routed to it, and the bundled gold notes for the lexical baseline."""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import E2E_NOTES, GOLD, SAMPLE_NOTES, job_for
from engine.store.answers import read_answers

pytestmark = pytest.mark.e2e


def test_only_pairs_with_a_candidate_reach_the_model(e2e_hybrid_run):
    job, report, output = e2e_hybrid_run
    answers = read_answers(str(output))
    assert answers.num_rows == E2E_NOTES * len(job.questions)
    live = answers.filter(pc.is_valid(answers["route"]))  # rows of failed notes are routed nowhere
    failed = answers.filter(pc.is_null(answers["route"]))
    assert failed.num_rows >= 3 * len(job.questions) and set(failed["status"].to_pylist()) == {"error"}
    routes = dict(zip(*[c.to_pylist() for c in pc.value_counts(live["route"]).flatten()]))
    assert routes.get("no_candidate", 0) > routes.get("model", 0) > 0
    to_model = live.filter(pc.equal(live["route"], "model"))
    skipped = live.filter(pc.equal(live["route"], "no_candidate"))
    assert pc.min(to_model["prompt_tokens"]).as_py() > 0 and pc.min(to_model["candidates"]).as_py() >= 1
    # the model's answer, or the cue answer where the model's failed its check against the note (engine.stages.verify)
    for row in to_model.select(["model", "verified"]).to_pylist():
        assert row["model"] == ("cues" if row["verified"] is False else job.model.name)
    assert skipped["prompt_tokens"].null_count == skipped.num_rows and set(skipped["model"].to_pylist()) == {"cues"}
    assert set(skipped["status"].to_pylist()) == {"not_in_note"}
    assert report["model_outputs"] == to_model.num_rows


def test_windows_prompts_are_shorter_than_whole_notes(e2e_run, e2e_hybrid_run):
    whole = read_answers(str(e2e_run[3]))
    windows = read_answers(str(e2e_hybrid_run[2]))
    mean = lambda t: pc.mean(t.filter(pc.is_valid(t["prompt_tokens"]))["prompt_tokens"]).as_py()
    # whole prompts, instructions included (the same in both): measured 1,045 vs 1,700 tokens with 120-char windows
    assert mean(windows) < 0.75 * mean(whole)


def test_lexical_mode_on_the_bundled_gold(apixaban_job, ray_local, tmp_path):
    """No model at all: the cue answers through the Ray pipeline, scored by engine eval against the gold."""
    from engine.reporting.evaluate import evaluate
    from engine.run import run_job

    job = job_for(apixaban_job, model="none", output=tmp_path / "lexical", input_uri=str(SAMPLE_NOTES),
                  extraction={"mode": "lexical"})
    report, _ = run_job(job, limit=64)
    answers = read_answers(str(tmp_path / "lexical"))
    routed = answers.filter(pc.is_valid(answers["route"]))  # the bundled blank note is an error row, routed nowhere
    assert set(routed["model"].to_pylist()) == {"cues"} and report["model_outputs"] == 0
    overall = {r["metric"]: r["value"] for r in evaluate(job, answers, pq.read_table(GOLD), draws=20).table.to_pylist()
               if r["metric"].startswith("mean_")}
    # the bundled notes are what the cues were written against: this pins them, it does not measure them
    assert overall["mean_balanced_accuracy"] >= 0.95 and overall["mean_accuracy"] >= 0.95
    assert report["cohort"]["status"] == {"eligible": 12, "excluded": 24, "needs_review": 4}

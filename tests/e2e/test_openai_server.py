"""model.backend openai against a real `vllm serve` (vLLM's OpenAI-compatible server on CPU, the tiny model).

The server sees the very prompt the engine renders in process (same chat template, same cut of a long note: the
prompt token counts agree); a run answers through it with schema-valid answers, the server's token counts and a
token cost; the server is killed mid-run and the rows that met it down are error rows counted in report.json; the
server comes back and a re-run of the same job asks only those rows again and ends complete, the other rows as
they were.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE_NOTES, job_for

pytestmark = pytest.mark.e2e

QUESTIONS = ("atrial_fibrillation", "heart_failure", "stroke_date", "creatinine_max", "platelets_min", "hemoglobin_min")
NOTES = 8
PRICES = {"usd_per_million_prompt_tokens": 0.15, "usd_per_million_cached_prompt_tokens": 0.075,
          "usd_per_million_completion_tokens": 0.60}


def served_job(apixaban_job, server, output: Path):
    """Six of the job's questions (yes/no, a date and numbers) over 8 bundled notes, 2 notes a shard, asked of
    the server; one retry, so a dead server is an error row within a second or two."""
    job = job_for(apixaban_job, model=server.model, output=output, backend="openai", base_url=server.base_url,
                  api_key_env=None, max_model_len=1024, evidence_max_chars=24, max_tokens=64, max_retries=1, timeout_s=30.0)
    return job.model_copy(update={
        "questions": [q for q in job.questions if q.id in QUESTIONS], "derived": [], "criteria": [],
        "batching": job.batching.model_copy(update={"notes_per_shard": 2, "notes_per_batch": 2}),
        "pricing": job.pricing.model_copy(update=PRICES),
    })


def test_the_server_sees_the_prompt_the_engine_renders(apixaban_job, vllm_server, tmp_path):
    from engine.backends import Request
    from engine.backends.fit import TokenFitter
    from engine.backends.openai import OpenAIBackend
    from engine.plan import make_plan

    plan = make_plan(served_job(apixaban_job, vllm_server, tmp_path))
    backend = OpenAIBackend(plan)
    assert isinstance(backend.fitter, TokenFitter)  # the model is a local folder: cut by its own tokenizer
    texts = pq.read_table(SAMPLE_NOTES)["text"].to_pylist()[5:7]  # a note of a few words and one of 12,568 characters
    requests = [Request(f"n{i}", text, q) for i, text in enumerate(texts) for q in plan.questions[:3]]
    generations = backend.generate(requests)
    backend.close()
    for request, generation in zip(requests, generations):
        fitted, truncated = backend.fitter.fit(request.note_text)
        assert generation.error is None, generation.error
        assert generation.prompt_tokens == len(backend.fitter.prompt_ids(fitted, request.question))
        assert generation.truncated == truncated
        request.question.answer_model.model_validate_json(generation.text)  # guided decoding by the schema sent
        assert generation.completion_tokens > 0
    assert [g.truncated for g in generations] == [False] * 3 + [True] * 3
    assert sum(g.cached_tokens for g in generations) > 0  # the note prefix served from vLLM's cache


def _stop_after_first_commit(answers: Path, server, stopped: list) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if answers.is_dir() and any(answers.glob("*.parquet")):
            server.stop(signal.SIGKILL)
            stopped.append(time.monotonic())
            return
        time.sleep(0.05)


def _rows(output: Path):
    from engine.store.answers import read_answers

    return read_answers(str(output)).sort_by([("row_number", "ascending"), ("question_id", "ascending")])


def test_a_server_stopped_mid_run_leaves_error_rows_a_rerun_asks_again(apixaban_job, vllm_server, ray_local, tmp_path):
    from engine.backends import SERVER_UNAVAILABLE
    from engine.reporting.report import token_cost
    from engine.run import run_job

    output = tmp_path / "out"
    job = served_job(apixaban_job, vllm_server, output)
    stopped: list = []
    stopper = threading.Thread(target=_stop_after_first_commit, args=(output / "answers", vllm_server, stopped), daemon=True)
    stopper.start()
    first, _ = run_job(job, limit=NOTES)
    stopper.join(10)
    assert stopped and not vllm_server.healthy()

    rows = _rows(output)
    pairs = NOTES * len(QUESTIONS)
    assert rows.num_rows == first["rows"] == pairs
    down = pc.fill_null(pc.starts_with(rows["error"], SERVER_UNAVAILABLE), False)
    unavailable = rows.filter(down)
    assert 0 < unavailable.num_rows < pairs
    assert first["server_unavailable_rows"] == unavailable.num_rows
    assert unavailable["prompt_tokens"].null_count == unavailable.num_rows  # no model answered them
    assert all(vllm_server.base_url in e for e in unavailable["error"].to_pylist())
    # what the server did answer: parsed under the schema, with its token counts, priced by token
    answered = rows.filter(pc.invert(down))
    assert pc.min(answered["prompt_tokens"]).as_py() > 0 and pc.min(answered["completion_tokens"]).as_py() > 0
    assert first["schema_valid_rate"] == 1.0 and first["model_outputs"] == answered.num_rows
    tokens = [int(pc.sum(answered[c]).as_py()) for c in ("prompt_tokens", "cached_tokens", "completion_tokens")]
    assert [first["prompt_tokens"], first["cached_prompt_tokens"], first["completion_tokens"]] == tokens
    assert first["cost_basis"] == "tokens"
    assert first["token_cost_usd"] == round(token_cost(job.pricing, *tokens), 6) > 0
    assert first["cost_per_10k_patients_usd"] == round(token_cost(job.pricing, *tokens) / first["patients"] * 10_000, 4)

    vllm_server.start()
    second, stats = run_job(job, limit=NOTES)
    redone_shards = set(unavailable["shard_id"].to_pylist())
    assert (stats.pairs_redone, stats.shards_redone) == (unavailable.num_rows, len(redone_shards))
    assert second["this_run"]["pairs_redone"] == second["this_run"]["pairs_processed"] == unavailable.num_rows
    assert second["this_run"]["shards_redone"] == len(redone_shards)
    assert second["server_unavailable_rows"] == 0
    after = _rows(output)
    assert after.num_rows == second["rows"] == pairs  # every (note, question) once
    assert pc.sum(pc.fill_null(pc.starts_with(after["error"], SERVER_UNAVAILABLE), False)).as_py() == 0
    assert after.filter(pc.invert(down)).to_pylist() == answered.to_pylist()  # the rows that were answered stay as they were
    redone = after.filter(down)
    assert pc.min(redone["prompt_tokens"]).as_py() > 0 and set(redone["model"].to_pylist()) == {vllm_server.model}
    assert second["token_cost_usd"] > first["token_cost_usd"]
    order = [q.id for q in job.questions]
    for shard in redone_shards:  # a redone shard keeps its row order: notes in input order, questions in job order
        table = pq.read_table(output / "answers" / f"{shard}.parquet")
        keys = list(zip(table["row_number"].to_pylist(), (order.index(q) for q in table["question_id"].to_pylist())))
        assert keys == sorted(keys)

    third, stats = run_job(job, limit=NOTES)
    assert stats.pairs_processed == 0 and stats.shards_resumed == stats.shards_total and stats.pairs_redone == 0

"""Generate: the one stateful stage. A Ray actor holds a backend (model loaded once) and answers batches of rows."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.backends import Request, load_backend
from engine.job import JobSpec
from engine.plan import make_plan
from engine.stages import require_columns
from engine.stages.candidates import NO_CUES_ERROR

REQUIRED_COLUMNS = ("note_id", "question_id", "text", "note_error", "route", "cue_output", "model_text", "cue_hint")

GENERATION_COLUMNS = {
    "raw_output": pa.string(),
    "finish_reason": pa.string(),
    "prompt_tokens": pa.int32(),
    "cached_tokens": pa.int32(),
    "completion_tokens": pa.int32(),
    "truncated": pa.bool_(),
    "generation_error": pa.string(),
    "model": pa.string(),
}


def _texts(text: pa.Array):
    """Row -> note text without copying the text per question (the column is dictionary-encoded per note)."""
    if pa.types.is_dictionary(text.type):
        notes = text.dictionary.to_pylist()
        indices = text.indices.to_pylist()
        return lambda row: notes[indices[row]]
    values = text.to_pylist()
    return lambda row: values[row]


def _scatter(values: list, rows: list[int], n: int, dtype: pa.DataType) -> pa.Array:
    """Values for `rows` of an n-row column, null elsewhere (rows whose note already failed)."""
    if len(rows) == n:
        return pa.array(values, dtype)
    full = [None] * n
    for row, value in zip(rows, values):
        full[row] = value
    return pa.array(full, dtype)


def _constant_columns(batch: pa.Table, to_model: pa.Array, answers: dict[str, str]) -> dict[str, pa.Array]:
    """A backend whose answer depends only on the question (null): whole columns, no per-row Python."""
    questions = batch["question_id"].combine_chunks()
    if pa.types.is_dictionary(questions.type):
        per_code = pa.array([answers[q] for q in questions.dictionary.to_pylist()], pa.string())
        raw = per_code.take(questions.indices)
    else:
        keys = list(answers)
        raw = pa.array([answers[k] for k in keys], pa.string()).take(pc.index_in(questions, value_set=pa.array(keys)))
    when = lambda value, dtype: pc.if_else(to_model, pa.scalar(value, dtype), pa.scalar(None, dtype))  # noqa: E731
    return {"raw_output": raw, "finish_reason": when("stop", pa.string()), "prompt_tokens": when(0, pa.int32()),
            "cached_tokens": when(0, pa.int32()), "completion_tokens": when(0, pa.int32()),
            "truncated": when(False, pa.bool_()), "generation_error": pa.nulls(batch.num_rows, pa.string())}


CUE_MODEL_NAME = "cues"  # the `model` of rows answered without a model (routes lexical and no_candidate)


class GenerateAnswers:
    """Ray Data actor UDF. Rows whose note already failed (`note_error`) are not sent to the model, nor are rows
    the candidate stage answered (`route` lexical or no_candidate): their `cue_output` is their output. A lexical
    run never starts a model."""

    def __init__(self, job_json: str):
        self.plan = make_plan(JobSpec.model_validate_json(job_json))
        self.backend = None if self.plan.job.extraction.mode == "lexical" else load_backend(self.plan)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, "generate", REQUIRED_COLUMNS)
        started = time.perf_counter()
        n = batch.num_rows
        live = pc.is_null(batch["note_error"].combine_chunks())
        route = batch["route"].combine_chunks()
        to_model = pc.and_(live, pc.fill_null(pc.equal(route, "model"), False))
        constant = self.backend.constant_answers() if self.backend is not None else None
        if constant is not None:
            columns = _constant_columns(batch, to_model, constant)
        else:
            columns = self._generated_columns(batch, to_model, n)
        columns["raw_output"] = pc.if_else(to_model, columns["raw_output"], batch["cue_output"].combine_chunks())
        lexical = pc.fill_null(pc.equal(route, "lexical"), False)
        no_cues = pc.and_(live, pc.and_(lexical, pc.is_null(batch["cue_output"].combine_chunks())))
        columns["generation_error"] = pc.if_else(no_cues, pa.scalar(NO_CUES_ERROR), columns["generation_error"])
        for name in GENERATION_COLUMNS:
            if name != "model":
                batch = batch.append_column(name, columns[name])
        model_name = self.backend.model_name if self.backend is not None else self.plan.job.model.name
        by_model = pc.equal(pc.fill_null(route, "model"), "model")  # failed notes keep the job's model, as before
        batch = batch.append_column("model", pc.if_else(by_model, pa.scalar(model_name), pa.scalar(CUE_MODEL_NAME)))
        seconds = time.perf_counter() - started
        return batch.append_column("batch_seconds", pa.array(np.full(n, seconds / max(n, 1))))

    def _generated_columns(self, batch: pa.Table, to_model: pa.Array, n: int) -> dict[str, pa.Array]:
        todo = pc.indices_nonzero(to_model).to_pylist()
        generations = self._generate(batch, todo)
        values = {
            "raw_output": [g.text for g in generations],
            "finish_reason": [g.finish_reason for g in generations],
            "prompt_tokens": [g.prompt_tokens for g in generations],
            "cached_tokens": [g.cached_tokens for g in generations],
            "completion_tokens": [g.completion_tokens for g in generations],
            "truncated": [g.truncated for g in generations],
            "generation_error": [g.error for g in generations],
        }
        return {name: _scatter(v, todo, n, GENERATION_COLUMNS[name]) for name, v in values.items()}

    def _generate(self, batch: pa.Table, todo: list[int]) -> list:
        if not todo:
            return []
        notes = batch["note_id"].to_pylist()
        text_of = _texts(batch["text"].combine_chunks())
        window_of = batch["model_text"].to_pylist()
        hint_of = batch["cue_hint"].to_pylist()
        questions = batch["question_id"].to_pylist()
        by_id = self.plan.by_id
        requests = []
        for i in todo:
            if window_of[i] is not None:  # model_sees: windows; one text per (note, question)
                requests.append(Request(f"{notes[i]}\x1f{questions[i]}", window_of[i], by_id[questions[i]], hint_of[i] or ""))
            else:
                requests.append(Request(notes[i], text_of(i), by_id[questions[i]], hint_of[i] or ""))
        return self.backend.generate(requests)

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()

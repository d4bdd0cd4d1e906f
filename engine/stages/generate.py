"""Generate: the one stateful stage. A Ray actor holds a backend (model loaded once) and answers batches of rows."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from engine.backends import Request, load_backend
from engine.job import JobSpec
from engine.plan import make_plan

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


class GenerateAnswers:
    """Ray Data actor UDF. Rows whose note already failed (`note_error`) are not sent to the model."""

    def __init__(self, job: dict):
        self.plan = make_plan(JobSpec.model_validate(job))
        self.backend = load_backend(self.plan)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        n = batch.num_rows
        notes = batch["note_id"].to_pylist()
        text_of = _texts(batch["text"].combine_chunks())
        questions = batch["question_id"].to_pylist()
        todo = pc.indices_nonzero(pc.is_null(batch["note_error"])).to_pylist()
        by_id = self.plan.by_id
        requests = [Request(notes[i], text_of(i), by_id[questions[i]]) for i in todo]
        generations = self.backend.generate(requests) if requests else []
        columns = {
            "raw_output": [g.text for g in generations],
            "finish_reason": [g.finish_reason for g in generations],
            "prompt_tokens": [g.prompt_tokens for g in generations],
            "cached_tokens": [g.cached_tokens for g in generations],
            "completion_tokens": [g.completion_tokens for g in generations],
            "truncated": [g.truncated for g in generations],
            "generation_error": [g.error for g in generations],
        }
        for name, values in columns.items():
            batch = batch.append_column(name, _scatter(values, todo, n, GENERATION_COLUMNS[name]))
        batch = batch.append_column("model", pa.array([self.backend.model_name] * n, pa.string()))
        seconds = time.perf_counter() - started
        return batch.append_column("batch_seconds", pa.array([seconds / max(n, 1)] * n, pa.float64()))

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()

"""Generate: the one stateful stage. A Ray actor holds a backend (model loaded once) and answers batches of rows."""

from __future__ import annotations

import time

import pyarrow as pa

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


class GenerateAnswers:
    """Ray Data actor UDF. Rows whose note already failed (`note_error`) are not sent to the model."""

    def __init__(self, job: dict):
        self.plan = make_plan(JobSpec.model_validate(job))
        self.backend = load_backend(self.plan)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        notes = batch["note_id"].to_pylist()
        texts = batch["text"].to_pylist()
        questions = batch["question_id"].to_pylist()
        note_errors = batch["note_error"].to_pylist()
        todo = [i for i, problem in enumerate(note_errors) if problem is None]
        requests = [Request(notes[i], texts[i], self.plan.by_id[questions[i]]) for i in todo]
        generations = self.backend.generate(requests) if requests else []
        values = {name: [None] * batch.num_rows for name in GENERATION_COLUMNS}
        for i, generation in zip(todo, generations):
            values["raw_output"][i] = generation.text
            values["finish_reason"][i] = generation.finish_reason
            values["prompt_tokens"][i] = generation.prompt_tokens
            values["cached_tokens"][i] = generation.cached_tokens
            values["completion_tokens"][i] = generation.completion_tokens
            values["truncated"][i] = generation.truncated
            values["generation_error"][i] = generation.error
        values["model"] = [self.backend.model_name] * batch.num_rows
        for name, dtype in GENERATION_COLUMNS.items():
            batch = batch.append_column(name, pa.array(values[name], dtype))
        seconds = time.perf_counter() - started
        return batch.append_column("batch_seconds", pa.array([seconds / max(batch.num_rows, 1)] * batch.num_rows, pa.float64()))

    def __del__(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()

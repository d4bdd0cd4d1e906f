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


NO_CUES_ERROR = "extraction mode lexical: this question has no cues in the job; add cues: to it or use mode hybrid"


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


CUE_MODEL_NAME = "cues"  # the `model` of rows answered without a model (routes lexical and no_candidate)


class GenerateAnswers:
    """Ray Data actor UDF. Rows whose note already failed (`note_error`) are not sent to the model, nor are rows
    the candidate stage answered (`route` lexical or no_candidate): their `cue_output` is their output. A lexical
    run never starts a model."""

    def __init__(self, job: dict):
        self.plan = make_plan(JobSpec.model_validate(job))
        self.backend = None if self.plan.job.extraction.mode == "lexical" else load_backend(self.plan)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        n = batch.num_rows
        live = pc.is_null(batch["note_error"].combine_chunks())
        route = batch["route"].combine_chunks()
        to_model = pc.and_(live, pc.fill_null(pc.equal(route, "model"), False))
        todo = pc.indices_nonzero(to_model).to_pylist()
        generations = self._generate(batch, todo)
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
            column = _scatter(values, todo, n, GENERATION_COLUMNS[name])
            if name == "raw_output":
                column = pc.if_else(to_model, column, batch["cue_output"].combine_chunks())
            elif name == "generation_error":
                column = pc.if_else(pc.and_(live, pc.and_(pc.equal(route, "lexical"), pc.is_null(batch["cue_output"].combine_chunks()))),
                                    pa.scalar(NO_CUES_ERROR), column)
            batch = batch.append_column(name, column)
        model_name = self.backend.model_name if self.backend is not None else self.plan.job.model.name
        by_model = pc.equal(pc.fill_null(route, "model"), "model")  # failed notes keep the job's model, as before
        batch = batch.append_column("model", pc.if_else(by_model, pa.scalar(model_name), pa.scalar(CUE_MODEL_NAME)))
        seconds = time.perf_counter() - started
        return batch.append_column("batch_seconds", pa.array([seconds / max(n, 1)] * n, pa.float64()))

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

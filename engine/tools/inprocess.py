"""The pipeline's stages in this process, without Ray: read -> expand -> candidates -> generate -> parse -> ground -> verify.

For cue-only (lexical) answers on small inputs, the candidate-recall figures of benchmarks/hybrid.py and the
tests. The stages are the same functions the Ray pipeline maps over its batches; only the driver differs.
"""

from __future__ import annotations

import pyarrow as pa

from engine.job import JobSpec
from engine.store.layout import answer_schema, to_answer_table
from engine.plan import make_plan
from engine.stages.candidates import find_candidates
from engine.stages.expand import expand_questions
from engine.stages.answer import answer_rows
from engine.stages.generate import GenerateAnswers
from engine.stages.read import plan_input, read_shards


def candidate_rows(job: JobSpec, limit: int | None = None) -> pa.Table:
    """Every (note, question) of the job's input after the candidate stage (route, cue answer, flags, text)."""
    plan = make_plan(job)
    inputs = plan_input(job.input, job.batching.notes_per_shard, limit)
    tables = [_decoded(find_candidates(expand_questions(read_shards(job.input, [shard], inputs.schema), plan.question_ids), plan))
              for shard in inputs.shards]
    return pa.concat_tables(tables)


def _decoded(rows: pa.Table) -> pa.Table:
    """Plain strings for the id columns (each shard has its own dictionaries, which joins cannot unify)."""
    for i, field in enumerate(rows.schema):
        if pa.types.is_dictionary(field.type) and field.name != "text":
            rows = rows.set_column(i, field.name, rows[field.name].cast(field.type.value_type))
    return rows


def lexical_answers(job: JobSpec, limit: int | None = None) -> pa.Table:
    """answers/ rows for the job's input answered from the cues alone (extraction mode lexical), in process."""
    job = job.model_copy(update={"extraction": job.extraction.model_copy(update={"mode": "lexical"})})
    plan = make_plan(job)
    inputs = plan_input(job.input, job.batching.notes_per_shard, limit)
    schema = answer_schema(job, inputs.schema)
    generate = GenerateAnswers(job.model_dump_json())
    tables = []
    for shard in inputs.shards:
        rows = find_candidates(expand_questions(read_shards(job.input, [shard], inputs.schema), plan.question_ids), plan)
        answered = answer_rows(generate(rows), plan)
        tables.append(to_answer_table(answered, schema, job.fingerprint()))
    return pa.concat_tables(tables)

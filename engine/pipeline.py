"""The whole run on one screen: job -> plan -> read -> expand -> candidates -> generate -> parse -> ground -> commit
-> rules -> report."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.job import JobSpec
from engine.output import OutputStore, answer_schema, to_answer_table, ShardCollector
from engine.plan import Plan, make_plan
from engine.stages.candidates import find_candidates
from engine.stages.expand import expand_questions
from engine.stages.generate import GenerateAnswers
from engine.stages.ground import ground_evidence
from engine.stages.parse import parse_answers
from engine.stages.read import InputPlan, Shard, plan_input, read_shards

ACTOR_RESTARTS = 2  # a crashed engine actor is restarted by Ray and its batch retried this many times


@dataclass
class RunStats:
    """What this run did (the report adds what the committed output holds)."""

    started: float = field(default_factory=time.time)
    first_result: float | None = None
    finished: float | None = None
    shards_total: int = 0
    shards_resumed: int = 0
    shards_committed: int = 0
    notes_processed: int = 0
    pairs_processed: int = 0
    engine_seconds: float = 0.0  # summed busy time of the model actors (measured inside them)
    actors: int = 1
    patients_processed: set = field(default_factory=set, repr=False)


@lru_cache(maxsize=4)
def _plan(job_json: str) -> Plan:
    return make_plan(JobSpec.model_validate_json(job_json))


# --- stages as Ray Data UDFs (each a thin wrapper over a pure function) ---------------------------------------
def notes_stage(batch: pa.Table, job_json: str, schema: pa.Schema):
    """read -> expand -> candidates, one model batch of notes at a time.

    A row group is read once, then expanded and searched for cues in slices of `notes_per_batch` notes, each
    yielded as its own block: a block then carries only its own notes' text (a 50,000-note row group expanded
    at once made 1.15M-row blocks whose slices each held the whole group's text), and a task's memory stays
    bounded by one slice. The cue search's busy time goes into the run's processing seconds (and so the cost).
    """
    plan = _plan(job_json)
    step = plan.job.batching.notes_per_batch
    for item in batch["shards"].to_pylist():
        notes = read_shards(plan.job.input, [Shard(**s) for s in json.loads(item)], schema)
        for start in range(0, notes.num_rows, step):
            started = time.perf_counter()
            rows = find_candidates(expand_questions(notes.slice(start, step), plan.question_ids), plan)
            share = (time.perf_counter() - started) / max(rows.num_rows, 1)
            yield rows.append_column("cue_seconds", pa.array(np.full(rows.num_rows, share)))
        del notes
        pa.default_memory_pool().release_unused()  # an idle worker would keep the row group's pages otherwise


def compact_text(batch: pa.Table) -> pa.Table:
    """The batch's note text with a dictionary of only its own notes.

    Ray Data cuts a model batch out of a larger block, and the slice keeps the block's whole dictionary of note
    texts: serialised after the model stage, every batch carried all the block's notes (3.4x the bytes at 100k
    notes). Rows are note-major, so a batch's notes are one contiguous range of the dictionary.
    """
    column = batch["text"]
    if not pa.types.is_dictionary(column.type) or batch.num_rows == 0:
        return batch
    text = column.combine_chunks()
    low, high = (v.as_py() for v in pc.min_max(text.indices).values())
    notes = pa.concat_arrays([text.dictionary.slice(low, high - low + 1)])  # a copy, not a view of the block's dictionary
    own = pa.DictionaryArray.from_arrays(pc.subtract(text.indices, pa.scalar(low, text.indices.type)), notes)
    return batch.set_column(batch.schema.get_field_index("text"), "text", own)


PART_SCHEMA = pa.schema([("shard_id", pa.string()), ("path", pa.string()), ("rows", pa.int64()), ("seconds", pa.float64()),
                         ("patients", pa.list_(pa.string())), ("statuses", pa.string())])


class AnswerBatches(GenerateAnswers):
    """The model actor: a batch of (note, question) rows -> generate -> parse -> ground -> answers/ rows, staged as
    parts in the output by this actor.

    Parsing and grounding cost about a microsecond a row against milliseconds of generation, and doing them here
    means the answers never travel back through the object store: the driver receives one small row per (batch,
    shard) (where the part is, its rows, busy seconds, patients, status counts), so it stays light however large
    the extract, and on a cluster no answer crosses to the head node.
    """

    def __init__(self, job: dict, schema: pa.Schema, fingerprint: str):
        super().__init__(job)
        self.schema, self.fingerprint = schema, fingerprint
        self.store = OutputStore(self.plan.job.output.uri, self.plan.job.output.storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        cue_seconds = batch["cue_seconds"]
        answered = ground_evidence(parse_answers(super().__call__(compact_text(batch)), self.plan))
        return stage_parts(self.store, to_answer_table(answered, self.schema, self.fingerprint), cue_seconds, started)


def stage_parts(store: OutputStore, answers: pa.Table, cue_seconds: pa.ChunkedArray, started: float) -> pa.Table:
    """Stage each shard's rows of a batch as a part; one PART_SCHEMA row per part. A part's busy seconds are its
    rows' share of the actor's time on the batch (start to staged) plus its rows' cue-search time."""
    shard_ids = answers["shard_id"]
    parts = []
    for shard_id in pc.unique(shard_ids).to_pylist():
        mask = pc.equal(shard_ids, shard_id)
        part = answers.filter(mask)
        parts.append((shard_id, store.stage_part(shard_id, part), part, float(pc.sum(cue_seconds.filter(mask)).as_py() or 0.0)))
    share = (time.perf_counter() - started) / max(answers.num_rows, 1)
    return pa.Table.from_pylist([
        {"shard_id": shard_id, "path": path, "rows": part.num_rows, "seconds": cues + share * part.num_rows,
         "patients": pc.unique(part["patient_id"]).to_pylist(),
         "statuses": json.dumps({r["values"]: r["counts"] for r in pc.value_counts(part["status"]).to_pylist()})}
        for shard_id, path, part, cues in parts], schema=PART_SCHEMA)


def build_dataset(job: JobSpec, inputs: InputPlan, pending: list[Shard], schema: pa.Schema):
    """The Ray Data graph. Shards of one row group are read together; a note's questions stay in one batch."""
    import ray.data

    warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
    job_json = job.model_dump_json()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for shard in pending:
        groups[(shard.path, shard.row_group)].append(asdict(shard))
    items = [{"shards": json.dumps(group)} for group in groups.values()]
    n_questions = len(job.questions)
    batching = job.batching
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(notes_stage, fn_kwargs={"job_json": job_json, "schema": inputs.schema}, batch_size=1, batch_format="pyarrow",
                     concurrency=min(batching.read_tasks or batching.actors + 1, len(items)))
        .map_batches(
            AnswerBatches,
            fn_constructor_kwargs={"job": job.model_dump(mode="json"), "schema": schema, "fingerprint": job.fingerprint()},
            compute=ray.data.ActorPoolStrategy(size=batching.actors),
            batch_size=batching.notes_per_batch * n_questions,
            num_cpus=batching.cpus_per_actor,
            num_gpus=batching.gpus_per_actor or None,
            batch_format="pyarrow",
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
        )
    )


def run_job(job: JobSpec, *, limit: int | None = None, overwrite: bool = False, progress=None) -> tuple[dict, RunStats]:
    """Run the job into its output folder, resuming committed shards; return the report and this run's stats."""
    from engine.answers_db import answers_dataset
    from engine.html_report import write_report_html
    from engine.report import build_report
    from engine.rules import screen
    from engine.runtime import ensure_ray

    stats = RunStats(actors=job.batching.actors)
    limit = limit if limit is not None else job.input.limit
    inputs = plan_input(job.input, job.batching.notes_per_shard, limit)
    _check_rules_against_input(job, inputs)
    store = OutputStore(job.output.uri, job.output.storage_options)
    committed = store.prepare(job, inputs, limit, overwrite)
    pending = [s for s in inputs.shards if s.shard_id not in committed]
    stats.shards_total, stats.shards_resumed = len(inputs.shards), len(inputs.shards) - len(pending)
    if progress is not None:
        progress.start(total_notes=inputs.num_notes, done_notes=inputs.num_notes - sum(s.num_rows for s in pending))
    if pending:
        ensure_ray()
        _stream_answers(job, inputs, pending, store, stats, progress)
    stats.finished = time.time()
    answers = answers_dataset(store.uri, store.storage_options)  # read in place, column by column, by DuckDB
    patients, funnel = screen(answers, job)
    store.write_table("patients/patients.parquet", patients)
    report = build_report(job, answers, patients, funnel, stats, store)
    store.write_json("report.json", report)
    write_report_html(store, job, report=report, answers=answers, patients=patients)
    return report, stats


def _check_rules_against_input(job: JobSpec, inputs: InputPlan) -> None:
    """Rules type-check against the input's real column types (a string `age` cannot be compared with 75)."""
    from engine.errors import JobError
    from engine.rules import check_rules

    problems = check_rules(job, {name: inputs.schema.field(name).type for name in job.input.structured})
    if problems:
        raise JobError(f"{job.name} (with input {job.input.uri})", problems)


def _stream_answers(job, inputs, pending, store, stats, progress) -> None:
    n_questions = len(job.questions)
    schema = answer_schema(job, inputs.schema)
    collector = ShardCollector({s.shard_id: s.num_rows * n_questions for s in pending})
    dataset = build_dataset(job, inputs, pending, schema)
    with ShardCommitter(job.output, stats, n_questions) as committer:
        _consume(dataset, job, collector, committer, stats, progress)
    store.remove_staging()
    if collector.incomplete:
        raise RuntimeError(f"the pipeline ended with incomplete shards {collector.incomplete[:3]}: a bug; re-run to resume")


@lru_cache(maxsize=4)
def _store(uri: str, storage_options_json: str) -> OutputStore:
    return OutputStore(uri, json.loads(storage_options_json))


def commit_task(uri: str, storage_options_json: str, shard_id: str, paths: list[str]) -> None:
    _store(uri, storage_options_json).commit_staged(shard_id, paths)
    pa.default_memory_pool().release_unused()


class ShardCommitter:
    """Commits complete shards as Ray tasks (merge the staged parts, sort, write answers/<shard>.parquet), so the
    driver never holds answers; a few commits run at once, and the driver waits only when that many are busy."""

    IN_FLIGHT = 2

    def __init__(self, output, stats, n_questions: int):
        import ray

        self.task = ray.remote(commit_task).options(num_cpus=1, max_retries=ACTOR_RESTARTS, retry_exceptions=False)
        self.args = (output.uri, json.dumps(output.storage_options))
        self.stats, self.n_questions = stats, n_questions
        self.running: dict = {}  # object ref -> rows of the shard

    def submit(self, shard_id: str, paths: list[str], rows: int) -> None:
        while len(self.running) >= self.IN_FLIGHT:
            self._finish(timeout=None)
        self.running[self.task.remote(*self.args, shard_id, paths)] = rows

    def _finish(self, timeout) -> None:
        import ray

        done, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        for ref in done:
            rows = self.running.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the task's own error (an OutputError says what to do)
                raise exc.cause from None
            self.stats.shards_committed += 1
            self.stats.notes_processed += rows // self.n_questions

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            while self.running:
                self._finish(timeout=None)


def _consume(dataset, job, collector, committer, stats, progress) -> None:
    n_questions = len(job.questions)
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        if stats.first_result is None:
            stats.first_result = time.time()
        for part in batch.to_pylist():
            stats.engine_seconds += part["seconds"]
            stats.pairs_processed += part["rows"]
            stats.patients_processed.update(part["patients"])
            if progress is not None:
                progress.advance(part["rows"] / n_questions, part["rows"], json.loads(part["statuses"]))
            paths = collector.add(part["shard_id"], part["path"], part["rows"])
            if paths is not None:
                committer.submit(part["shard_id"], paths, collector.expected[part["shard_id"]])

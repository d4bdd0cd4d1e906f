"""The whole run on one screen: job -> plan -> read -> expand -> candidates -> generate -> parse -> ground -> commit
-> rules -> report."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.job import JobSpec
from engine.store.commit import batch_key, stage_parts
from engine.store.layout import OutputStore, answer_schema, to_answer_table
from engine.plan import Plan, make_plan
from engine.stages.candidates import find_candidates
from engine.stages.answer import answer_rows
from engine.stages.expand import expand_questions
from engine.stages.generate import GenerateAnswers
from engine.stages.read import InputPlan, Shard, iter_notes, plan_input
from engine.store.redo import keep_redo_pairs

# A model actor whose process or node is lost is restarted by Ray (elsewhere, if its node is gone) up to
# MODEL_ACTOR_RESTARTS times, and the batch it had in flight is retried on it once it is back. The retries are not
# bounded: until the head declares a silent node dead (Ray's health checks: seconds to a minute) every retry fails
# at once with "actor unavailable", and a bound of 3 was spent within a second (measured, tests/e2e/test_multinode.py:
# the run failed). A batch that crashes its engine every time still ends: its actor is dead after the restarts.
# An actor whose start fails is not restarted by Ray (Ray Data replaces it, within max_consecutive_actor_init_deaths).
MODEL_ACTOR_RESTARTS = 8
ACTOR_TASK_RETRIES = -1


@dataclass
class RunStats:
    """What this run did (the report adds what the committed output holds)."""

    started: float = field(default_factory=time.time)
    first_result: float | None = None
    finished: float | None = None
    shards_total: int = 0
    shards_resumed: int = 0
    shards_committed: int = 0
    shards_redone: int = 0  # committed shards whose model-server-unavailable rows this run asked again
    pairs_redone: int = 0
    notes_processed: int = 0
    pairs_processed: int = 0
    engine_seconds: float = 0.0  # summed busy time of the model actors (measured inside them)
    actors: int = 1
    patients_processed: set = field(default_factory=set, repr=False)
    limit: int | None = None  # the --limit (or input.limit) the run was planned with
    notes_in_input: int | None = None  # rows in the input, past the limit too (None: not counted)
    nodes: int = 1  # Ray nodes alive when the run started
    recovery: dict = field(default_factory=dict)  # work done again after a lost worker or node (ShardLedger.recovery)


@lru_cache(maxsize=4)
def _plan(job_json: str) -> Plan:
    return make_plan(JobSpec.model_validate_json(job_json))


# --- stages as Ray Data UDFs (each a thin wrapper over a pure function) ---------------------------------------
def notes_stage(batch: pa.Table, job_json: str, schema: pa.Schema):
    """read -> expand -> candidates, one model batch of notes at a time.

    A row group is decoded, expanded and searched for cues in slices of `notes_per_batch` notes, each yielded as
    its own block: a block then carries only its own notes' text (a 50,000-note row group expanded at once made
    1.15M-row blocks whose slices each held the whole group's text), and a task's memory stays bounded by one
    slice. The cue search's busy time goes into the run's processing seconds (and so the cost).
    """
    plan = _plan(job_json)
    step = plan.job.batching.notes_per_batch
    for item in batch["shards"].to_pylist():
        shards = [Shard(**s) for s in json.loads(item)]
        redo = {s.shard_id: {(row, question) for row, question in s.redo} for s in shards if s.redo}
        for notes in iter_notes(plan.job.input, shards, schema, step):
            started = time.perf_counter()
            rows = keep_redo_pairs(expand_questions(notes, plan.question_ids), redo)
            if rows.num_rows == 0:
                continue
            rows = find_candidates(rows, plan)
            share = (time.perf_counter() - started) / max(rows.num_rows, 1)
            yield rows.append_column("cue_seconds", pa.array(np.full(rows.num_rows, share)))
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


class AnswerBatches(GenerateAnswers):
    """The model actor: a batch of (note, question) rows -> generate -> parse -> ground -> verify -> answers/ rows,
    written to the output by this actor.

    Parsing and grounding cost about a microsecond a row against milliseconds of generation, and doing them here
    means the answers never travel back through the object store: the driver receives one small row per (batch,
    shard) (busy seconds, patients), so it stays light however large the extract, and on a cluster no answer
    crosses to the head node. A shard whose rows are all in the batch (notes_per_batch >= notes_per_shard) is
    committed here, straight to answers/; the rows of other shards are staged as parts. Either way the ledger
    (engine.store.commit) hears of them before the batch returns, and commits the staged shards as they complete.
    """

    def __init__(self, job_json: str, schema: pa.Schema, fingerprint: str, ledger, expected: dict[str, int],
                 redo_shards: tuple = ()):
        import ray

        from engine.runtime import node_label

        super().__init__(job_json)
        self.schema, self.fingerprint, self.ledger, self.expected = schema, fingerprint, ledger, expected
        self.redo_shards = frozenset(redo_shards)
        self.store = OutputStore(self.plan.job.output.uri, self.plan.job.output.storage_options)
        self.node = node_label()
        ledger.actor_started.remote(self.node, ray.get_runtime_context().was_current_actor_reconstructed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        started = time.perf_counter()
        self.ledger.begin.remote(batch_key(batch), batch.num_rows)  # no wait: an actor's calls arrive in order
        cue_seconds = batch["cue_seconds"]
        answered = answer_rows(super().__call__(compact_text(batch)), self.plan)
        parts = stage_parts(self.store, to_answer_table(answered, self.schema, self.fingerprint), cue_seconds, started,
                            self.expected, self.redo_shards)
        ray.get(self.ledger.report.remote(parts.drop_columns(["seconds", "patients"]).to_pylist(), self.node))
        return parts.select(["seconds", "patients"])  # what the driver sums; the ledger has the rest


def build_dataset(job: JobSpec, inputs: InputPlan, pending: list[Shard], schema: pa.Schema, ledger, expected: dict[str, int]):
    """The Ray Data graph. Shards of one row group are read together; a note's questions stay in one batch."""
    import ray.data
    from ray.data import ExecutionResources

    warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
    job_json = job.model_dump_json()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for shard in pending:
        groups[(shard.path, shard.row_group)].append(asdict(shard))
    items = [{"shards": json.dumps(group)} for group in groups.values()]
    n_questions = len(job.questions)
    batching = job.batching
    items_ds = ray.data.from_items(items, override_num_blocks=len(items))
    # At most `read_tasks` read tasks at once, set as the dataset's CPU budget (the model actors' CPUs plus one per
    # read task) rather than as the read stage's pool size: a sized pool is not fused with the repartition below,
    # and every expanded row then crossed the object store twice (measured at 1M notes: stream 27.6 -> 25.4 s).
    reads = min(batching.read_tasks or batching.actors + 1, len(items))
    items_ds.context.execution_options.resource_limits = ExecutionResources(cpu=batching.actors * batching.cpus_per_actor + reads)
    return (
        items_ds
        .map_batches(notes_stage, fn_kwargs={"job_json": job_json, "schema": inputs.schema}, batch_size=1, batch_format="pyarrow")
        # One block per model batch: Ray Data joins a task's small outputs into 32 MiB blocks, and an actor task
        # takes a whole block, so a row group of short notes became one task of thousands of batches (no
        # output, no commit, and Ray Data's no-progress timeout after 30 minutes with a slow model). Fused into
        # the read tasks (MapBatches(notes_stage)->StreamingRepartition): the slicing happens where rows are made.
        .repartition(target_num_rows_per_block=batching.notes_per_batch * n_questions)
        .map_batches(
            AnswerBatches,
            fn_constructor_kwargs={"job_json": job_json, "schema": schema, "fingerprint": job.fingerprint(),
                                   "ledger": ledger, "expected": expected, "redo_shards": redo_shards(pending)},
            compute=ray.data.ActorPoolStrategy(size=batching.actors),
            batch_size=batching.notes_per_batch * n_questions,
            num_cpus=batching.cpus_per_actor,
            num_gpus=batching.gpus_per_actor or None,
            resources=batching.actor_resources or None,  # custom resources: the nodes the engines may use
            batch_format="pyarrow",
            max_restarts=MODEL_ACTOR_RESTARTS,
            max_task_retries=ACTOR_TASK_RETRIES,
        )
    )


def run_job(job: JobSpec, *, limit: int | None = None, overwrite: bool = False, progress=None) -> tuple[dict, RunStats]:
    """Run the job into its output folder, resuming committed shards; return the report and this run's stats."""
    from engine.store.answers import answers_dataset
    from engine.reporting.html import write_report_html
    from engine.reporting.report import build_report
    from engine.store.answers import answer_totals
    from engine.cohort.rules import screen
    from engine.runtime import cluster_nodes, ensure_ray

    check_backend(job)
    stats = RunStats(actors=job.batching.actors)
    source = f"--limit {limit}" if limit is not None else f"input.limit {job.input.limit} in the job"
    limit = limit if limit is not None else job.input.limit
    inputs = plan_input(job.input, job.batching.notes_per_shard, limit, count_all=limit is not None)
    stats.limit, stats.notes_in_input = limit, inputs.notes_in_input
    if progress is not None and limit is not None and inputs.notes_in_input != inputs.num_notes:
        of = f" of {inputs.notes_in_input}" if inputs.notes_in_input is not None else ""
        progress.say(f"Limit: answering {inputs.num_notes}{of} notes ({source})")
    _check_rules_against_input(job, inputs)
    store = OutputStore(job.output.uri, job.output.storage_options)
    _check_paths_reach_every_node(job, store)
    committed = store.prepare(job, inputs, limit, overwrite)
    redo = _rows_to_redo(job, store) if committed else {}
    pending = [replace(s, redo=tuple(redo[s.shard_id])) if s.shard_id in redo else s
               for s in inputs.shards if s.shard_id not in committed or s.shard_id in redo]
    stats.shards_total, stats.shards_resumed = len(inputs.shards), len(inputs.shards) - len(pending)
    stats.shards_redone, stats.pairs_redone = len(redo), sum(len(rows) for rows in redo.values())
    if progress is not None:
        if redo:
            progress.say(f"Asking again {stats.pairs_redone} (note, question) pairs in {len(redo)} shard(s): their model "
                         "server was unavailable in an earlier run")
        todo = sum(len(s.redo) / len(job.questions) if s.redo else s.num_rows for s in pending)
        progress.start(total_notes=inputs.num_notes, done_notes=round(inputs.num_notes - todo))
    if pending:
        ensure_ray()
        stats.nodes = cluster_nodes()
        _stream_answers(job, inputs, pending, store, stats, progress)
    stats.finished = time.time()
    answers = answers_dataset(store.uri, store.storage_options)  # read in place, column by column, by DuckDB
    patients, funnel = screen(answers, job)
    store.write_patients(patients)
    totals = answer_totals(answers, patients)  # one scan of answers/ for the report's counts and the page's
    report = build_report(job, answers, patients, funnel, stats, store, totals)
    store.write_json("report.json", report)
    write_report_html(store, job, report=report, answers=answers, patients=patients, numbers=totals["numbers"])
    return report, stats


def check_backend(job: JobSpec) -> None:
    """Before Ray starts: a model server (backend openai) has its key set, answers and serves the job's model."""
    if job.model.backend == "openai" and job.extraction.mode != "lexical":
        from engine.backends.openai import check_server

        check_server(job)


def _rows_to_redo(job: JobSpec, store: OutputStore) -> dict[str, list[tuple[int, str]]]:
    """Committed rows whose model server was unavailable (only backend openai writes them), by shard."""
    if job.model.backend != "openai":
        return {}
    from engine.store.answers import answers_dataset
    from engine.store.redo import rows_to_redo

    return rows_to_redo(answers_dataset(store.uri, store.storage_options))


def redo_shards(pending: list[Shard]) -> tuple[str, ...]:
    return tuple(s.shard_id for s in pending if s.redo)


def _check_rules_against_input(job: JobSpec, inputs: InputPlan) -> None:
    """Rules type-check against the input's real column types (a string `age` cannot be compared with 75)."""
    from engine.errors import JobError
    from engine.cohort.rules import check_rules

    problems = check_rules(job, {name: inputs.schema.field(name).type for name in job.input.structured})
    if problems:
        raise JobError(f"{job.name} (with input {job.input.uri})", problems)


def _check_paths_reach_every_node(job: JobSpec, store: OutputStore) -> None:
    """On a Ray cluster of several nodes read tasks run on any node, the model actors write answers on the worker
    nodes and commit tasks merge them on any node: a local input or output path must be one filesystem shared by all
    of them. Refused before the run starts (nothing written), unless the job says the path is shared. A local run (its
    own one-node Ray) is never refused."""
    import os

    from engine.errors import InputError, OutputError
    from engine.runtime import cluster_nodes, ensure_ray
    from engine.storage import filesystem, is_remote

    import ray

    local_input = not job.input.shared and not is_remote(filesystem(job.input.uri, job.input.storage_options)[0])
    local_output = not job.output.shared and not is_remote(store.fs)
    if not (local_input or local_output) or not (os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        return
    ensure_ray()
    nodes = cluster_nodes()
    if nodes <= 1:
        return
    for local, section, error, what in ((local_input, "input", InputError, "read notes from"),
                                        (local_output, "output", OutputError, "write answers to")):
        if local:
            uri = getattr(job, section).uri
            raise error(
                f"{section}.uri {uri!r} is a local path, and this Ray cluster has {nodes} nodes: each node would "
                f"{what} its own disk. Set {section}.uri to s3://bucket/prefix, or, if this path is one shared "
                f"filesystem mounted at the same place on every node (NFS, EFS), set {section}.shared: true in the job")


PROGRESS_SECONDS = 2.0  # how often the driver asks the ledger how far the run is


def _stream_answers(job, inputs, pending, store, stats, progress) -> None:
    """Run the dataset; the model actors stage parts and the ledger commits shards; the driver drains the
    dataset's small part rows (busy seconds, patients) on a thread and polls the ledger for progress."""
    import threading

    import ray

    from engine.store.commit import ShardLedger

    n_questions = len(job.questions)
    schema = answer_schema(job, inputs.schema)
    expected = {s.shard_id: len(s.redo) if s.redo else s.num_rows * n_questions for s in pending}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node (under `ray job submit`, the head): losing a worker node never loses the ledger.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ledger = ray.remote(ShardLedger).options(num_cpus=0, scheduling_strategy=here, max_restarts=0).remote(
        expected, job.output.uri, json.dumps(job.output.storage_options), redo_shards(pending))
    dataset = build_dataset(job, inputs, pending, schema, ledger, expected)
    failure: list[BaseException] = []

    def drain() -> None:
        try:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                stats.engine_seconds += float(pc.sum(batch["seconds"]).as_py() or 0.0)
                for patients in batch["patients"].to_pylist():
                    stats.patients_processed.update(patients)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            failure.append(exc)

    thread = threading.Thread(target=drain, name="drain", daemon=True)
    thread.start()
    seen = {"pairs": 0, "statuses": {}}
    while thread.is_alive():
        thread.join(PROGRESS_SECONDS)
        seen = _advance(progress, _ledger_call(ledger.status), seen, n_questions, stats)
    if failure:
        raise failure[0]
    final = _ledger_call(ledger.finish)
    _advance(progress, final, seen, n_questions, stats)
    stats.pairs_processed = final["pairs"]
    stats.shards_committed = final["shards_committed"]
    stats.notes_processed = final["rows_committed"] // max(n_questions, 1)
    stats.recovery = final["recovery"]
    if final["error"] is not None:
        raise final["error"]
    store.remove_staging()
    if final["incomplete"]:
        raise RuntimeError(f"the pipeline ended with incomplete shards {final['incomplete'][:3]}: a bug; re-run to resume")


def _ledger_call(method) -> dict:
    import ray

    try:
        return ray.get(method.remote())
    except ray.exceptions.RayTaskError as exc:
        raise exc.cause from None


def _advance(progress, status: dict, seen: dict, n_questions: int, stats: RunStats) -> dict:
    """Move the progress display on by what the ledger heard since the last poll."""
    if status["error"] is not None:
        raise status["error"]
    # start-up ends when the first batch's answers are staged (Ray Data hands the driver its outputs in blocks, late)
    stats.first_result = stats.first_result or status["first_part"]
    if progress is not None and status["pairs"] > seen["pairs"]:
        statuses = {k: v - seen["statuses"].get(k, 0) for k, v in status["statuses"].items()}
        pairs = status["pairs"] - seen["pairs"]
        progress.advance(pairs / n_questions, pairs, statuses)
    return {"pairs": status["pairs"], "statuses": status["statuses"]}

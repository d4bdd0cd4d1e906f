"""Output folder: answers/ committed one shard at a time (atomically), a manifest that ties it to one job, resume.

Layout under the output URI:
  _engine.json            manifest: job name and fingerprint, input files, limit (a different job is refused)
  answers/<shard>.parquet one file per committed shard: every (note, question) of that shard exactly once
  _staging/<shard>/*.arrow parts written by the workers as batches finish; merged into answers/<shard>.parquet when
                          the shard is complete, then removed (a run that stops leaves them; the next one removes them)
  patients/patients.parquet, report.json, report.html
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import __version__
from engine.errors import OutputError
from engine.job import JobSpec
from engine.stages.parse import ANSWER_FIELDS
from engine.stages.read import InputPlan
from engine.storage import describe_error, filesystem, is_remote, join, require_bucket

MANIFEST = "_engine.json"
ANSWERS = "answers"
PATIENTS = "patients"
STAGING = "_staging"
ENGINE_OWNED = (ANSWERS, STAGING, PATIENTS, "report.json", "report.html", "eval.md", "eval.parquet", MANIFEST)
PATIENTS_FILE = f"{PATIENTS}/patients.parquet"
# answers/ and patients/ hold only Parquet (read as datasets: pd.read_parquet("out/patients")). Earlier versions
# wrote the funnel here; it is in report.json's cohort now, and a patients/ written again loses the old file.
LEGACY_PATIENT_FILES = (f"{PATIENTS}/funnel.json",)

ANSWER_COLUMNS: dict[str, pa.DataType] = {  # answers/ files' columns in order; the answer's own fields are parse's
    "patient_id": pa.string(),
    "note_id": pa.string(),
    "question_id": pa.string(),
    **{name: ANSWER_FIELDS[name] for name in ("status", "value_bool", "value_num", "unit", "value_date", "value_text",
                                               "evidence")},
    "evidence_start": pa.int32(),
    "evidence_end": pa.int32(),
    "grounding": pa.string(),
    "verified": pa.bool_(),
    "verification": pa.string(),
    "error": ANSWER_FIELDS["error"],
    "route": pa.string(),
    "candidates": pa.int32(),
    "cue_flags": pa.string(),
    "model": pa.string(),
    "truncated": pa.bool_(),
    "prompt_tokens": pa.int32(),
    "cached_tokens": pa.int32(),
    "completion_tokens": pa.int32(),
    "charttime": pa.timestamp("us"),
    "row_number": pa.int64(),
    "shard_id": pa.string(),
    "job_fingerprint": pa.string(),
}


OPTIONAL_ANSWER_COLUMNS = ("value_date", "value_text")  # null where a batch has none (tools, older stages)
ANSWER_STATISTICS = ["patient_id", "note_id", "row_number"]  # min/max kept in answers/ files (others cost write time)


def answer_schema(job: JobSpec, input_schema: pa.Schema) -> pa.Schema:
    """The fixed answers/ schema: engine columns, then the job's structured input columns with their input types."""
    structured = [pa.field(name, input_schema.field(name).type) for name in job.input.structured]
    return pa.schema([pa.field(n, t) for n, t in ANSWER_COLUMNS.items()] + structured)


def to_answer_table(batch: pa.Table, schema: pa.Schema, fingerprint: str) -> pa.Table:
    """Select and cast a pipeline batch to the answers schema (dictionary columns decoded)."""
    batch = batch.append_column("job_fingerprint", pa.array([fingerprint] * batch.num_rows, pa.string()))
    columns = []
    for field in schema:
        if field.name in OPTIONAL_ANSWER_COLUMNS and field.name not in batch.column_names:
            columns.append(pa.nulls(batch.num_rows, field.type))  # a batch without date or categorical answers
            continue
        column = batch[field.name]
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def output_folder(uri: str) -> str:
    """The output folder of a URI that names it or its answers/ folder (what --answers and --predictions take)."""
    trimmed = uri.rstrip("/")
    head, _, tail = trimmed.rpartition("/")
    return (head or ".") if tail == ANSWERS else trimmed


@dataclass
class OutputStore:
    uri: str
    storage_options: dict

    def __post_init__(self):
        self.fs, self.root = filesystem(self.uri, self.storage_options)
        self.answers_dir = join(self.fs, self.root, ANSWERS)

    # --- manifest and resume -------------------------------------------------------------------------------
    def prepare(self, job: JobSpec, inputs: InputPlan, limit: int | None, overwrite: bool) -> set[str]:
        """Make the folder ready; return the shard ids already committed by an earlier run of the same job."""
        manifest = self._manifest(job, inputs, limit)
        try:
            existing = self.read_json(MANIFEST)
            if overwrite:
                self._remove_engine_files()
                existing = None
            elif existing is None and self._has_answers():
                raise OutputError(f"output {self.uri} holds answers but no {MANIFEST}; it was not written by engine. Use another --output or --overwrite")
            if existing is not None:
                _check_same_job(self.uri, existing, manifest)
            else:
                if is_remote(self.fs):  # object stores have no folders; a missing bucket is an error, not created
                    require_bucket(self.fs, self.root)
                else:
                    self.fs.makedirs(self.answers_dir, exist_ok=True)
                self.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
            self._remove_partial_files()
            return self.committed_shards()
        except OutputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise OutputError(f"output {self.uri}: {describe_error(exc)}") from None

    def _remove_engine_files(self) -> None:
        """--overwrite deletes what engine writes there, never anything else in the folder."""
        for name in ENGINE_OWNED:
            path = join(self.fs, self.root, name)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def _manifest(self, job: JobSpec, inputs: InputPlan, limit: int | None) -> dict:
        return {
            "engine_version": __version__,
            "job_name": job.name,
            "job_fingerprint": job.fingerprint(),
            "input_files": [[path, size] for path, size in inputs.files],
            "limit": limit,
            "notes_per_shard": job.batching.notes_per_shard,
            "questions": [q.id for q in job.questions],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def committed_shards(self) -> set[str]:
        if not self.fs.exists(self.answers_dir):
            return set()
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.answers_dir, detail=False)]
        return {n.removesuffix(".parquet") for n in names if n.endswith(".parquet") and not n.startswith(".")}

    def _has_answers(self) -> bool:
        return bool(self.committed_shards())

    def remove_staging(self) -> None:
        staging = join(self.fs, self.root, STAGING)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)

    def _remove_partial_files(self) -> None:
        """What a stopped run left: parts of shards it never committed, and half-written files."""
        self.remove_staging()
        if self.fs.exists(self.answers_dir):
            for path in self.fs.ls(self.answers_dir, detail=False):
                if path.rsplit("/", 1)[-1].startswith(".tmp-"):
                    self.fs.rm(path)

    # --- writes --------------------------------------------------------------------------------------------
    def commit_shard(self, shard_id: str, table: pa.Table) -> None:
        """Write one shard's answers so that it is either wholly there or absent (rename; an S3 PUT is atomic).

        Rows in input order; a note's rows keep the order they came in (the job's question order): a stable sort
        on the row number alone, three times cheaper than also sorting the question ids, and skipped when the rows
        are in order already (a batch that is a whole shard). Column statistics are kept for the columns that
        readers filter on (roll-up reads patient ranges); those of the other 20-odd columns took a third of the
        write's time."""
        rows = table["row_number"].to_numpy()
        if rows.size and not (rows[1:] >= rows[:-1]).all():
            table = table.take(pc.sort_indices(table["row_number"]))
        self.write_table(join(self.fs, ANSWERS, f"{shard_id}.parquet"), table, statistics=ANSWER_STATISTICS)

    def stage_part(self, shard_id: str, part: pa.Table) -> str:
        """Write rows of one shard as a part (Arrow IPC, lz4) under _staging/<shard>/, from the worker that made
        them; return its path. Only a committed answers/ file counts: a part is merged only once the driver has
        heard of it, so the parts of a task that failed and was retried are never read."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, part.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
            writer.write_table(part)
        folder = join(self.fs, self.root, STAGING, shard_id)
        path = join(self.fs, folder, f"{uuid.uuid4().hex}.arrow")
        if not is_remote(self.fs):
            self.fs.makedirs(folder, exist_ok=True)
        self.fs.pipe_file(path, sink.getvalue().to_pybytes())
        return path

    def commit_staged(self, shard_id: str, paths: list[str], merge: bool = False) -> None:
        """Merge a complete shard's parts into answers/<shard>.parquet (atomically), then remove them. Safe to run
        again after a stop anywhere in it: a shard already committed only has its leftover parts removed.

        `merge`: the parts are rows of a committed shard asked again (engine.store.redo); they replace their rows in
        it. A part already gone means that merge is done (parts are removed only after it)."""
        if merge or not self.fs.exists(join(self.fs, self.answers_dir, f"{shard_id}.parquet")):
            tables = self._read_parts(shard_id, paths, gone_means_done=merge)
            if tables is not None:
                commit = self.merge_into_shard if merge else self.commit_shard
                commit(shard_id, pa.concat_tables(tables))
        for path in paths:  # after the commit: a stop in between leaves only parts, which the next run removes
            if self.fs.exists(path):
                self.fs.rm(path)
        folder = join(self.fs, self.root, STAGING, shard_id)
        if not is_remote(self.fs) and self.fs.exists(folder) and not self.fs.ls(folder):
            self.fs.rmdir(folder)

    def _read_parts(self, shard_id: str, paths: list[str], gone_means_done: bool) -> list[pa.Table] | None:
        tables = []
        for path in paths:
            try:
                data = self.fs.cat_file(path)
            except FileNotFoundError:
                if gone_means_done:
                    return None
                raise OutputError(
                    f"output {self.uri}: staged part {path} of shard {shard_id} is not where a worker wrote it. On "
                    "a cluster of several nodes the output must be shared by all of them (s3://... or one shared "
                    "filesystem mounted at the same path); re-run to resume") from None
            tables.append(pa.ipc.open_file(pa.py_buffer(data)).read_all())
        return tables

    def merge_into_shard(self, shard_id: str, redone: pa.Table) -> None:
        """Write a committed shard again with `redone` rows in place of their old ones (engine.store.redo), atomically."""
        with self.fs.open(join(self.fs, self.answers_dir, f"{shard_id}.parquet"), "rb") as handle:
            committed = pq.read_table(handle)
        self.write_table(join(self.fs, ANSWERS, f"{shard_id}.parquet"), replace_rows(committed, redone), statistics=ANSWER_STATISTICS)

    def write_patients(self, patients: pa.Table) -> None:
        """patients/patients.parquet, and patients/ left with Parquet only (files of earlier versions removed)."""
        self.write_table(PATIENTS_FILE, patients)
        for relative in LEGACY_PATIENT_FILES:
            path = join(self.fs, self.root, relative)
            if self.fs.exists(path):
                self.fs.rm(path)

    def write_table(self, relative: str, table: pa.Table, statistics: bool | list[str] = True) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd", write_statistics=statistics)
        self.write_bytes(relative, buffer.getvalue())

    def write_bytes(self, relative: str, data: bytes) -> None:
        final = join(self.fs, self.root, relative)
        parent = final.rsplit("/", 1)[0]
        if is_remote(self.fs):
            self.fs.pipe_file(final, data)
            return
        self.fs.makedirs(parent, exist_ok=True)
        scratch = join(self.fs, parent, f".tmp-{uuid.uuid4().hex}")
        self.fs.pipe_file(scratch, data)
        self.fs.mv(scratch, final)

    def write_json(self, relative: str, payload: dict) -> None:
        self.write_bytes(relative, json.dumps(payload, indent=2, default=str).encode())

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode())

    # --- reads ---------------------------------------------------------------------------------------------
    def read_json(self, relative: str) -> dict | None:
        path = join(self.fs, self.root, relative)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))


def _check_same_job(uri: str, existing: dict, manifest: dict) -> None:
    for key, what in (("job_fingerprint", "a different job (model, questions or input)"),
                      ("input_files", "different input files"), ("limit", "a different --limit"),
                      ("notes_per_shard", "a different batching.notes_per_shard")):
        if existing.get(key) != manifest[key]:
            raise OutputError(
                f"output {uri} was written by {what} (job {existing.get('job_name')!r}); "
                "use --overwrite to start afresh or choose another --output"
            )


_KEY_SEPARATOR = "\x1f"


def _keys(table: pa.Table) -> pa.Array:
    joined = pc.binary_join_element_wise(pc.cast(table["row_number"], pa.string()), table["question_id"], _KEY_SEPARATOR)
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def replace_rows(committed: pa.Table, redone: pa.Table) -> pa.Table:
    """The committed shard with each redone (row_number, question_id) row in place of its old row, order kept."""
    positions = pc.index_in(_keys(redone), value_set=_keys(committed))
    if positions.null_count:
        raise RuntimeError("a redone answer row that its committed shard does not hold: a pipeline bug")
    order = np.arange(committed.num_rows)
    order[positions.to_numpy()] = committed.num_rows + np.arange(redone.num_rows)
    both = pa.concat_tables([committed, redone], promote_options="permissive")
    return both.take(pa.array(order))

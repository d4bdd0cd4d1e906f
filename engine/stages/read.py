"""Read: plan the input as shards (stable units of committed output) and read one row group into note rows.

A shard is a slice of one Parquet row group; its id depends only on the file and row range, so a resumed run
finds the same shards. Every input row yields exactly one note row: bad rows are marked, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.errors import InputError
from engine.job import InputSpec
from engine.storage import describe_error, describe_missing, filesystem

NOTE_COLUMNS = ["shard_id", "row_number", "note_id", "patient_id", "charttime", "text", "note_error"]


@dataclass(frozen=True)
class Shard:
    shard_id: str
    path: str
    row_group: int
    start: int  # row offset inside the row group
    stop: int
    file_row: int  # row number of `start` inside the file (for error messages)
    duplicates: tuple = ()  # (row_number, note_id, first file, first row) of rows whose note id was seen before
    # A committed shard asked again: the (row_number, question_id) pairs whose model server was unavailable (backend
    # openai). Only these pairs go through the pipeline and they replace their rows in answers/<shard>.parquet.
    redo: tuple = ()

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class InputPlan:
    files: list[tuple[str, int]]  # (path, size in bytes)
    schema: pa.Schema
    shards: list[Shard]
    notes_in_input: int | None = None  # every row of the input, past the limit too (None: not counted)

    @property
    def num_notes(self) -> int:
        return sum(s.num_rows for s in self.shards)


def plan_input(spec: InputSpec, notes_per_shard: int, limit: int | None, count_all: bool = False) -> InputPlan:
    """List the Parquet files, check the columns, cut row groups into shards (first `limit` notes only).

    `notes_in_input` is the input's row count: known when the limit leaves nothing out; where it cuts the input,
    counted from the other files' footers only with `count_all` (a run says how much its limit leaves out)."""
    fs, root = filesystem(spec.uri, spec.storage_options)
    try:
        if fs.isdir(root):
            paths = sorted(p for p in fs.find(root) if p.endswith((".parquet", ".pq")))
        elif fs.exists(root):
            paths = [root]
        else:
            paths = None
            missing = describe_missing(fs, root)
    except Exception as exc:  # noqa: BLE001 - storage libraries raise many kinds; one clear line instead
        raise InputError(f"input {spec.uri}: {describe_error(exc)}") from None
    if paths is None:
        raise InputError(f"input {spec.uri}: {missing}; point input.uri (or --input) at a Parquet file or folder")
    if not paths:
        raise InputError(f"input {spec.uri}: no .parquet files found; point input.uri (or --input) at a Parquet file or folder")
    files, shards, schema, remaining = [], [], None, limit
    for file_index, path in enumerate(paths):
        meta = _metadata(fs, path)
        schema = schema or meta.schema.to_arrow_schema()
        _check_columns(spec, meta.schema.to_arrow_schema(), path)
        files.append((path, int(fs.size(path))))
        file_row = 0
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            for start in range(0, rows, notes_per_shard):
                stop = min(start + notes_per_shard, rows)
                if remaining is not None:
                    stop = min(stop, start + remaining)
                    remaining -= stop - start
                shards.append(Shard(f"f{file_index:05d}-g{rg:05d}-r{start:09d}-{stop:09d}", path, rg, start, stop, file_row + start))
                if remaining == 0:
                    planned = sum(s.num_rows for s in shards)
                    total = planned + meta.num_rows - file_row - stop if count_all else None
                    if total is not None:
                        total = _count_rows(fs, paths[file_index + 1:], total)
                    elif stop == rows and rg == meta.num_row_groups - 1 and file_index == len(paths) - 1:
                        total = planned  # the limit ended exactly at the end of the input
                    return InputPlan(files, schema, _mark_duplicates(fs, spec, shards), total)
            file_row += rows
    return InputPlan(files, schema, _mark_duplicates(fs, spec, shards), sum(s.num_rows for s in shards))


def _count_rows(fs, paths: list[str], counted: int) -> int | None:
    """`counted` plus the rows of `paths`, from their Parquet footers (read side by side: on S3 each is a request).
    None if a footer cannot be read: the count is a figure for the report, never a reason to stop a run."""
    from concurrent.futures import ThreadPoolExecutor

    if not paths:
        return counted
    try:
        with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
            return counted + sum(pool.map(lambda path: _metadata(fs, path).num_rows, paths))
    except InputError:
        return None


def _mark_duplicates(fs, spec: InputSpec, shards: list[Shard]) -> list[Shard]:
    """A note id that occurs twice is answered once, at its first row (file order); later rows become error
    rows that name the first. Reads only the id column, so it stays cheap for millions of notes."""
    first_seen: dict[str, tuple[str, int]] = {}
    repeated: dict[tuple[str, int], list] = {}
    for path in dict.fromkeys(s.path for s in shards):
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            file_row = 0
            for rg in range(parquet.num_row_groups):
                ids = _as_string(parquet.read_row_group(rg, columns=[spec.note_id])[spec.note_id]).to_pylist()
                for offset, note_id in enumerate(ids):
                    if note_id is None:
                        continue
                    if note_id in first_seen:
                        repeated.setdefault((path, rg), []).append((file_row + offset, note_id, *first_seen[note_id]))
                    else:
                        first_seen[note_id] = (path, file_row + offset)
                file_row += len(ids)
    if not repeated:
        return shards
    marked = []
    for shard in shards:
        rows = tuple(d for d in repeated.get((shard.path, shard.row_group), ()) if shard.file_row <= d[0] < shard.file_row + shard.num_rows)
        marked.append(replace(shard, duplicates=rows) if rows else shard)
    return marked


def _metadata(fs, path: str) -> pq.FileMetaData:
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"input file {path}: cannot read Parquet metadata ({describe_error(exc)}); is it a Parquet file?") from None


def _check_columns(spec: InputSpec, schema: pa.Schema, path: str) -> None:
    wanted = [spec.note_id, spec.patient_id, spec.text, *spec.structured] + ([spec.charttime] if spec.charttime else [])
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        raise InputError(
            f"input file {path}: missing column(s) {', '.join(missing)}; columns present: {', '.join(schema.names)}. "
            "Map them in the job's input: section (note_id, patient_id, text, charttime, structured)."
        )


def read_shards(spec: InputSpec, shards: list[Shard], schema: pa.Schema) -> pa.Table:
    """Read the shards of one row group (one read) into normalised note rows."""
    return pa.concat_tables(iter_notes(spec, shards, schema, step=max(s.stop for s in shards)))


def iter_notes(spec: InputSpec, shards: list[Shard], schema: pa.Schema, step: int) -> Iterator[pa.Table]:
    """The shards of one row group as normalised note rows, at most `step` notes at a time, in row order.

    The row group is decoded `step` rows at a time (pyarrow's batch reader), so a reading worker holds one slice of
    decoded notes, not the whole row group (a 50,000-note group kept about 1 GB in each reading worker)."""
    first = shards[0]
    fs, _ = filesystem(spec.uri, spec.storage_options)
    columns = list(dict.fromkeys([spec.note_id, spec.patient_id, spec.text, *spec.structured] + ([spec.charttime] if spec.charttime else [])))
    wanted = sorted(shards, key=lambda s: s.start)
    with fs.open(first.path, "rb") as handle:
        offset = 0
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=step, row_groups=[first.row_group], columns=columns):
            low, high = offset, offset + batch.num_rows
            offset = high
            for shard in wanted:
                start, stop = max(low, shard.start), min(high, shard.stop)
                if start >= stop:
                    continue
                file_row = shard.file_row + (start - shard.start)
                piece = replace(shard, start=start, stop=stop, file_row=file_row,
                                duplicates=tuple(d for d in shard.duplicates if file_row <= d[0] < file_row + stop - start))
                yield normalise_notes(pa.Table.from_batches([batch.slice(start - low, stop - start)]), spec, piece, schema)
            if offset >= wanted[-1].stop:
                break


def normalise_notes(raw: pa.Table, spec: InputSpec, shard: Shard, schema: pa.Schema) -> pa.Table:
    """Engine column names and types; problems with a row go to `note_error` (the row is kept)."""
    n = raw.num_rows
    note_id = _as_string(raw[spec.note_id])
    patient_id = _as_string(raw[spec.patient_id])
    text, bad_utf8 = _as_text(raw[spec.text])
    errors = [None] * n
    stripped = pc.utf8_trim_whitespace(text)
    checks = [
        (pc.is_null(note_id), f"note id column '{spec.note_id}' is empty"),
        (pc.is_null(patient_id), f"patient id column '{spec.patient_id}' is empty"),
        (pc.is_null(text), f"text column '{spec.text}' is null"),
        (pc.equal(pc.fill_null(stripped, "x"), ""), "note text is empty or whitespace only"),
    ]
    for mask, message in checks:
        for i, flagged in enumerate(mask.to_pylist()):
            if flagged and errors[i] is None:
                errors[i] = message
    for i in bad_utf8:
        errors[i] = errors[i] or f"text column '{spec.text}' is not valid UTF-8 (invalid bytes replaced)"
    for row_number, repeated_id, first_path, first_row in shard.duplicates:
        i = row_number - shard.file_row
        errors[i] = errors[i] or f"duplicate note id {repeated_id!r}: answered once, at row {first_row} of {first_path.rsplit('/', 1)[-1]}"
    columns = {
        "shard_id": pa.array([shard.shard_id] * n, pa.string()),
        "row_number": pa.array(range(shard.file_row, shard.file_row + n), pa.int64()),
        "note_id": pc.fill_null(note_id, ""),
        "patient_id": pc.fill_null(patient_id, ""),
        "charttime": _as_timestamp(raw[spec.charttime]) if spec.charttime else pa.nulls(n, pa.timestamp("us")),
        "text": pc.fill_null(text, ""),
        "note_error": pa.array(errors, pa.string()),
    }
    for name in spec.structured:
        columns[name] = _cast_like(raw[name], schema.field(name).type)
    return pa.table(columns)


def _as_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_floating(column.type):  # ids read as float because of nulls: 10000032.0 -> "10000032"
        return pc.cast(column, pa.int64(), safe=False).cast(pa.string())
    return column.cast(pa.string())


def _as_text(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, list[int]]:
    """Text as UTF-8 strings; binary columns are decoded with invalid bytes replaced and the rows reported."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string()), []
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        values, bad = [], []
        for i, raw in enumerate(column.to_pylist()):
            if raw is None:
                values.append(None)
                continue
            try:
                values.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(raw.decode("utf-8", errors="replace"))
                bad.append(i)
        return pa.chunked_array([pa.array(values, pa.string())]), bad
    return column.cast(pa.string()), []


def _as_timestamp(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Naive UTC microseconds. Strings are parsed one by one when the fast cast fails: a bad value becomes null
    without erasing the others, and ISO strings with an offset ("...Z", "+01:00") are converted to UTC."""
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.timestamp("us"), safe=False)
    try:
        return pc.cast(column, pa.timestamp("us"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.chunked_array([pa.array([_parse_time(v) for v in column.to_pylist()], pa.timestamp("us"))])


def _parse_time(value) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).strip())
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


def _cast_like(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.chunked_array([pa.nulls(len(column), target)])


def shard_to_dict(shard: Shard) -> dict:
    return asdict(shard)

"""Time in the roll-up: each patient's index date and the lookback windows of questions around it.

Index date (the job's `index`): a structured column of the notes (each patient's latest non-null value), a Parquet
table (patient id, index date), or, without either or for a patient the column or table lacks (`missing:
latest_note`), the date of the patient's latest note. The patient table says which in `index_date_source`
(`column`, `table`, `latest_note`; null where the index date is unknown).

Windows (a question's `lookback`, `lookahead`): a note counts in that question's roll-up when its charttime's day lies
in [index date - lookback, index date + lookahead] (calendar arithmetic: 6mo before 31 August is 29 February or
28 February). A note without a charttime cannot be placed: it counts, and `<question>__undated_notes` says how many
such notes there were; `<question>__notes_outside_window` counts the notes the window left out. For a patient whose
index date is unknown (`missing: unknown`) no dated note can be placed: what those notes say is unknown for every
windowed question (undated notes still count, flagged, as for every patient).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.errors import InputError
from engine.job import JobSpec, QuestionSpec, parse_duration
from engine.storage import describe_error, filesystem

OUTSIDE = "__notes_outside_window"
UNDATED = "__undated_notes"


def interval_sql(duration: str | None) -> str | None:
    """'6mo' -> '6 month' (a DuckDB interval literal's text); None stays None."""
    if duration is None:
        return None
    count, unit = parse_duration(duration)
    return f"{count} {unit}"


def shift_days(days: np.ndarray, duration: str, sign: int) -> np.ndarray:
    """Days since 1970-01-01 moved by a duration ('30d', '2w', '6mo', '1y') back (sign -1) or forward (+1), with
    calendar arithmetic for months and years: the same day number, clamped to the target month's last day (6 months
    before 31 August is 29 February in a leap year, else 28), as dateutil's relativedelta and DuckDB's intervals do.
    Vectorised: the roll-up moves every patient's index date."""
    count, unit = parse_duration(duration)
    days = np.asarray(days, dtype=np.int64)
    if unit in ("day", "week"):
        return days + sign * count * (7 if unit == "week" else 1)
    months = sign * count * (12 if unit == "year" else 1)
    day = days.astype("datetime64[D]")
    month = day.astype("datetime64[M]")
    day_of_month = (day - month.astype("datetime64[D]")).astype(np.int64)
    target = month + np.timedelta64(months, "M")
    first = target.astype("datetime64[D]")
    length = ((target + np.timedelta64(1, "M")).astype("datetime64[D]") - first).astype(np.int64)
    return (first + np.minimum(day_of_month, length - 1)).astype(np.int64)


def window_columns(question: QuestionSpec) -> list[str]:
    """The patient table's window columns of a question (none for a question without a window)."""
    return [f"{question.id}{OUTSIDE}", f"{question.id}{UNDATED}"] if question.windowed else []


def read_index_table(job: JobSpec) -> pa.Table | None:
    """The job's index table as (patient_id string, index_date date32), one row per patient; None without one.

    Rows without a patient id or an index date are left out (those patients fall back as `index.missing` says);
    a patient with two different index dates, a missing column or an unreadable date stops the roll-up with an error
    naming the file, the column and what to do."""
    spec = job.index
    if spec is None or spec.uri is None:
        return None
    fs, path = filesystem(spec.uri, spec.storage_options)
    where = f"index table {spec.uri}"
    try:
        schema = pq.read_schema(path, filesystem=fs) if fs.isfile(path) else pq.ParquetDataset(path, filesystem=fs).schema
        missing = [c for c in (spec.patient_id, spec.date) if c not in schema.names]
        if missing:
            raise InputError(f"{where}: no column {', '.join(map(repr, missing))} (has: {', '.join(schema.names)}); "
                             "set index.patient_id and index.date to its column names")
        table = pq.read_table(path, filesystem=fs, columns=[spec.patient_id, spec.date])
    except InputError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{where}: cannot read it ({describe_error(exc)})") from None
    patient = table[spec.patient_id].cast(pa.string())
    date = _as_date(table[spec.date], where, spec.date)
    table = pa.table({"patient_id": patient, "index_date": date}).filter(
        pc.and_(pc.is_valid(patient), pc.is_valid(date)))
    distinct = table.group_by("patient_id").aggregate([("index_date", "count_distinct")])
    clashes = distinct.filter(pc.greater(distinct["index_date_count_distinct"], 1))["patient_id"].to_pylist()
    if clashes:
        raise InputError(f"{where}: {len(clashes)} patient(s) with more than one index date (e.g. {clashes[0]!r}); "
                         "keep one row per patient")
    return table.group_by("patient_id").aggregate([("index_date", "min")]).rename_columns(["patient_id", "index_date"])


def _as_date(column, where: str, name: str) -> pa.ChunkedArray:
    kind = column.type
    try:
        if pa.types.is_date(kind):
            return column.cast(pa.date32())
        if pa.types.is_timestamp(kind):
            return column.cast(pa.timestamp(kind.unit)).cast(pa.date32())
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return pc.strptime(pc.utf8_slice_codeunits(column, 0, 10), format="%Y-%m-%d", unit="s",
                               error_is_null=True).cast(pa.date32())
    except pa.ArrowException as exc:
        raise InputError(f"{where}: column {name!r} does not read as dates ({exc}); write dates or ISO text") from None
    raise InputError(f"{where}: column {name!r} is {kind}, not a date; write a date, timestamp or ISO text (YYYY-MM-DD)")


def window_summary(patients: pa.Table, job: JobSpec) -> dict | None:
    """report.json's `windows`: per windowed question its window, the notes it left out and the undated notes it
    counted; and how each patient's index date was found. None for a job without windows or index."""
    if not job.uses_index_date:
        return None
    questions = {}
    for q in job.questions:
        if not q.windowed:
            continue
        outside, undated = (patients[c] for c in window_columns(q))
        questions[q.id] = {
            "lookback": q.lookback, "lookahead": q.lookahead or "0d",
            "notes_excluded": int(pc.sum(outside).as_py() or 0),
            "patients_with_notes_excluded": int(pc.sum(pc.greater(outside, 0)).as_py() or 0),
            "undated_notes_counted": int(pc.sum(undated).as_py() or 0),
        }
    sources = patients["index_date_source"].value_counts().to_pylist() if patients.num_rows else []
    return {"index_date": {str(s["values"]) if s["values"] is not None else "unknown": int(s["counts"]) for s in sources},
            "questions": questions}

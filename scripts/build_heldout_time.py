#!/usr/bin/env python
"""Build the time-bound held-out set (ARISTOTLE stroke/bleeding windows) from notes.yaml.

notes.yaml holds two top-level lists:
  patients: subject_id, index_date, criteria {exc_recent_stroke, exc_bleeding_risk}, why
  notes:    note_id, subject_id, hadm_id, note_type, charttime (ISO or null), sex, age,
            why, labels {recent_stroke, recent_serious_bleeding, bleeding_tendency,
            prior_stroke_tia, stroke_date, bleeding_date}, text

Writes, into the same folder:
  notes.parquet     one row per note
  gold.parquet      one row per note x question (long format)
  criteria.parquet  one row per patient (the patient-level exclusion criteria)

Everything is validated before anything is written; any problem exits non-zero.
Besides field formats, the labels are checked against each other: a dated stroke or
bleed must agree with the note's own "recent" flag under the 30-day / 6-calendar-month
windows, a month-only date may not straddle a window edge, each date phrase must occur
in the note text, and each patient's criteria must agree with the dated events and
bleeding-tendency labels across all of that patient's notes.

Usage: .venv/bin/python scripts/build_heldout_time.py [--dir data/heldout_t]
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from build_heldout import fail, note_errors  # scripts/ is on the path when a builder runs as a script

BOOL_QUESTIONS = [
    "recent_stroke",
    "recent_serious_bleeding",
    "bleeding_tendency",
    "prior_stroke_tia",
]
DATE_QUESTIONS = ["stroke_date", "bleeding_date"]
QUESTIONS = BOOL_QUESTIONS + DATE_QUESTIONS
# date question -> the yes/no question whose window it must agree with
DATE_WINDOW = {"stroke_date": "recent_stroke", "bleeding_date": "recent_serious_bleeding"}
PRECISIONS = ("day", "month")
NOTE_FIELDS = ["note_id", "subject_id", "hadm_id", "note_type", "charttime", "sex", "age", "why", "labels", "text"]
PATIENT_FIELDS = ["subject_id", "index_date", "criteria", "why"]
CRITERIA = ["exc_recent_stroke", "exc_bleeding_risk"]
CRITERION_VALUES = ("met", "not_met")
STROKE_WINDOW_DAYS = 30
BLEED_WINDOW_MONTHS = 6


def months_before(d: dt.date, months: int) -> dt.date:
    """The same day `months` calendar months earlier (clamped to the month's last day)."""
    y, m = divmod(d.year * 12 + (d.month - 1) - months, 12)
    m += 1
    return dt.date(y, m, min(d.day, calendar.monthrange(y, m)[1]))


def stroke_window(ref: dt.date) -> tuple[dt.date, dt.date]:
    return ref - dt.timedelta(days=STROKE_WINDOW_DAYS), ref


def bleed_window(ref: dt.date) -> tuple[dt.date, dt.date]:
    return months_before(ref, BLEED_WINDOW_MONTHS), ref


WINDOW_OF = {"stroke_date": stroke_window, "bleeding_date": bleed_window}


def parse_datetime(v) -> dt.datetime | None:
    """charttime: None, a datetime/date (YAML may parse it) or an ISO string. Raises ValueError."""
    if v is None:
        return None
    if isinstance(v, dt.datetime):
        return v
    if isinstance(v, dt.date):
        return dt.datetime(v.year, v.month, v.day)
    if not isinstance(v, str):
        raise ValueError(f"not a date-time: {v!r}")
    return dt.datetime.fromisoformat(v)


def parse_date(v) -> dt.date:
    if isinstance(v, dt.datetime):
        raise ValueError(f"expected a date, got a date-time: {v!r}")
    if isinstance(v, dt.date):
        return v
    if not isinstance(v, str):
        raise ValueError(f"not an ISO date: {v!r}")
    return dt.date.fromisoformat(v)


def norm_ws(s: str) -> str:
    return " ".join(s.replace("\u00a0", " ").replace("\u2011", "-").split())


def shape_errors(item, position: str, id_field: str, fields: list[str]) -> tuple[str, list[str], bool]:
    """A note's or patient's name for messages, what is wrong with its keys, and whether its fields can be read."""
    if not isinstance(item, dict):
        return position, [f"{position}: must be a mapping"], False
    where = f"{position} {item.get(id_field, '?')}"
    missing = [k for k in fields if k not in item]
    extra = sorted(set(item) - set(fields))
    errors = [f"{where}: missing fields {missing}"] if missing else []
    errors += [f"{where}: unknown fields {extra}"] if extra and not missing else []
    return where, errors, not missing


def validate_notes(notes) -> list[str]:
    errors: list[str] = []
    if not isinstance(notes, list) or not notes:
        return ["notes: must be a non-empty list"]
    seen: set[str] = set()
    subj_of_hadm: dict[int, int] = {}
    for i, n in enumerate(notes):
        where, problems, usable = shape_errors(n, f"note[{i}]", "note_id", NOTE_FIELDS)
        errors += problems
        if not usable:
            continue
        errors += note_errors(n, where, seen, subj_of_hadm)
        if not isinstance(n["note_type"], str) or not n["note_type"].strip():
            errors.append(f"{where}: note_type must be a non-empty string")
        if not isinstance(n["why"], str) or not n["why"].strip():
            errors.append(f"{where}: why must be a non-empty string")
        chart = None
        try:
            chart = parse_datetime(n["charttime"])
        except ValueError:
            errors.append(f"{where}: charttime not ISO date-time or null: {n['charttime']!r}")
        text = n["text"] if isinstance(n["text"], str) else ""

        labels = n["labels"]
        if not isinstance(labels, dict):
            errors.append(f"{where}: labels must be a mapping")
            continue
        extra = sorted(set(labels) - set(QUESTIONS))
        absent = [q for q in QUESTIONS if q not in labels]
        if extra:
            errors.append(f"{where}: unknown label keys {extra}")
        if absent:
            errors.append(f"{where}: missing labels {absent}")
            continue
        for q in BOOL_QUESTIONS:
            if not isinstance(labels[q], bool):
                errors.append(f"{where}: {q} must be true/false, got {labels[q]!r}")
        for q in DATE_QUESTIONS:
            v = labels[q]
            if v is None:
                continue
            if not isinstance(v, dict) or set(v) != {"date", "phrase", "precision"}:
                errors.append(f"{where}: {q} must be null or {{date, phrase, precision}}, got {v!r}")
                continue
            try:
                d = parse_date(v["date"])
            except ValueError as e:
                errors.append(f"{where}: {q}.date: {e}")
                continue
            if v["precision"] not in PRECISIONS:
                errors.append(f"{where}: {q}.precision must be one of {PRECISIONS}, got {v['precision']!r}")
                continue
            if v["precision"] == "month" and d.day != 1:
                errors.append(f"{where}: {q} has precision month, so its date must be the 1st, got {d}")
            phrase = v["phrase"]
            if not isinstance(phrase, str) or not phrase.strip():
                errors.append(f"{where}: {q}.phrase must be a non-empty string")
            elif norm_ws(phrase) not in norm_ws(text):
                errors.append(f"{where}: {q}.phrase {phrase!r} does not occur in the note text")
            if chart is not None and d > chart.date():
                errors.append(f"{where}: {q} {d} is after the note's charttime {chart.date()}")
            # the date must agree with the note's own window flag
            flag = DATE_WINDOW[q]
            if chart is None or not isinstance(labels.get(flag), bool):
                continue
            lo, hi = WINDOW_OF[q](chart.date())
            if v["precision"] == "day":
                inside = lo <= d <= hi
                if inside != labels[flag]:
                    errors.append(
                        f"{where}: {q} {d} is {'inside' if inside else 'outside'} the window "
                        f"[{lo}, {hi}] but {flag} is {labels[flag]}"
                    )
            else:
                first = d
                last = d.replace(day=calendar.monthrange(d.year, d.month)[1])
                if lo <= first and last <= hi:
                    inside = True
                elif last < lo or first > hi:
                    inside = False
                else:
                    errors.append(f"{where}: {q} month {d:%Y-%m} straddles the window [{lo}, {hi}]: ambiguous label")
                    continue
                if inside != labels[flag]:
                    errors.append(
                        f"{where}: {q} month {d:%Y-%m} is {'inside' if inside else 'outside'} the window "
                        f"[{lo}, {hi}] but {flag} is {labels[flag]}"
                    )
        if labels.get("recent_stroke") is True and labels.get("prior_stroke_tia") is False:
            errors.append(f"{where}: recent_stroke is true, so prior_stroke_tia (any stroke/TIA) must be true")
        if labels.get("stroke_date") is not None and labels.get("prior_stroke_tia") is False:
            errors.append(f"{where}: stroke_date is set, so prior_stroke_tia must be true")
    return errors


def validate_patients(patients, notes) -> list[str]:
    errors: list[str] = []
    if not isinstance(patients, list) or not patients:
        return ["patients: must be a non-empty list"]
    by_subject: dict[int, list[dict]] = {}
    for n in notes:
        by_subject.setdefault(n["subject_id"], []).append(n)
    seen: set[int] = set()
    for i, p in enumerate(patients):
        where, problems, usable = shape_errors(p, f"patient[{i}]", "subject_id", PATIENT_FIELDS)
        errors += problems
        if not usable:
            continue
        sid = p["subject_id"]
        if not isinstance(sid, int) or isinstance(sid, bool):
            errors.append(f"{where}: subject_id must be an integer")
            continue
        if sid in seen:
            errors.append(f"{where}: duplicate subject_id")
        seen.add(sid)
        if not isinstance(p["why"], str) or not p["why"].strip():
            errors.append(f"{where}: why must be a non-empty string")
        crit = p["criteria"]
        if not isinstance(crit, dict) or set(crit) != set(CRITERIA):
            errors.append(f"{where}: criteria must have exactly {CRITERIA}, got {crit!r}")
            continue
        for c in CRITERIA:
            if crit[c] not in CRITERION_VALUES:
                errors.append(f"{where}: {c} must be one of {CRITERION_VALUES}, got {crit[c]!r}")
        try:
            index = parse_date(p["index_date"])
        except ValueError as e:
            errors.append(f"{where}: index_date: {e}")
            continue
        pnotes = by_subject.get(sid, [])
        if not pnotes:
            errors.append(f"{where}: no notes for this patient")
            continue
        charts = [parse_datetime(n["charttime"]) for n in pnotes]
        dated = [c for c in charts if c is not None]
        if not dated:
            errors.append(f"{where}: every note has a null charttime; no index date can be derived")
            continue
        latest = max(dated).date()
        if index != latest:
            errors.append(f"{where}: index_date {index} is not the latest note date {latest}")
        sexes = {n["sex"] for n in pnotes}
        if len(sexes) != 1:
            errors.append(f"{where}: notes disagree on sex {sorted(sexes)}")
        # the criteria must follow from the day-precision event dates and tendency labels
        s_lo, s_hi = stroke_window(index)
        b_lo, b_hi = bleed_window(index)
        stroke_days = {
            parse_date(n["labels"]["stroke_date"]["date"])
            for n in pnotes
            if n["labels"].get("stroke_date") and n["labels"]["stroke_date"]["precision"] == "day"
        }
        bleed_days = {
            parse_date(n["labels"]["bleeding_date"]["date"])
            for n in pnotes
            if n["labels"].get("bleeding_date") and n["labels"]["bleeding_date"]["precision"] == "day"
        }
        tendency = any(n["labels"].get("bleeding_tendency") is True for n in pnotes)
        want_stroke = "met" if any(s_lo <= d <= s_hi for d in stroke_days) else "not_met"
        want_bleed = "met" if tendency or any(b_lo <= d <= b_hi for d in bleed_days) else "not_met"
        if crit["exc_recent_stroke"] != want_stroke:
            errors.append(
                f"{where}: exc_recent_stroke is {crit['exc_recent_stroke']} but the dated strokes "
                f"{sorted(map(str, stroke_days))} against window [{s_lo}, {s_hi}] give {want_stroke}"
            )
        if crit["exc_bleeding_risk"] != want_bleed:
            errors.append(
                f"{where}: exc_bleeding_risk is {crit['exc_bleeding_risk']} but tendency={tendency} and dated "
                f"bleeds {sorted(map(str, bleed_days))} against window [{b_lo}, {b_hi}] give {want_bleed}"
            )
    for sid in sorted(set(by_subject) - seen):
        errors.append(f"subject {sid}: has notes but is not listed under patients")
    return errors


def build(notes: list[dict], patients: list[dict]) -> tuple[pa.Table, pa.Table, pa.Table]:
    notes_tbl = pa.table(
        {
            "note_id": pa.array([n["note_id"] for n in notes], pa.string()),
            "subject_id": pa.array([n["subject_id"] for n in notes], pa.int64()),
            "hadm_id": pa.array([n["hadm_id"] for n in notes], pa.int64()),
            "note_type": pa.array([n["note_type"] for n in notes], pa.string()),
            "charttime": pa.array([parse_datetime(n["charttime"]) for n in notes], pa.timestamp("us")),
            "text": pa.array([n["text"] for n in notes], pa.string()),
            "sex": pa.array([n["sex"] for n in notes], pa.string()),
            "age": pa.array([n["age"] for n in notes], pa.int64()),
        }
    )
    cols = ["note_id", "question_id", "value_bool", "value_num", "unit", "value_date", "value_text", "precision"]
    rows: dict[str, list] = {c: [] for c in cols}
    for n in notes:
        for q in QUESTIONS:
            lab = n["labels"][q]
            rows["note_id"].append(n["note_id"])
            rows["question_id"].append(q)
            rows["value_num"].append(None)
            rows["unit"].append(None)
            if q in DATE_QUESTIONS:
                rows["value_bool"].append(None)
                rows["value_date"].append(None if lab is None else parse_date(lab["date"]))
                rows["value_text"].append(None if lab is None else lab["phrase"])
                rows["precision"].append(None if lab is None else lab["precision"])
            else:
                rows["value_bool"].append(bool(lab))
                rows["value_date"].append(None)
                rows["value_text"].append(None)
                rows["precision"].append(None)
    gold_tbl = pa.table(
        {
            "note_id": pa.array(rows["note_id"], pa.string()),
            "question_id": pa.array(rows["question_id"], pa.string()),
            "value_bool": pa.array(rows["value_bool"], pa.bool_()),
            "value_num": pa.array(rows["value_num"], pa.float64()),
            "unit": pa.array(rows["unit"], pa.string()),
            "value_date": pa.array(rows["value_date"], pa.date32()),
            "value_text": pa.array(rows["value_text"], pa.string()),
            "precision": pa.array(rows["precision"], pa.string()),
        }
    )
    crit_tbl = pa.table(
        {
            "subject_id": pa.array([str(p["subject_id"]) for p in patients], pa.string()),
            "exc_recent_stroke": pa.array([p["criteria"]["exc_recent_stroke"] for p in patients], pa.string()),
            "exc_bleeding_risk": pa.array([p["criteria"]["exc_bleeding_risk"] for p in patients], pa.string()),
            "index_date": pa.array([parse_date(p["index_date"]) for p in patients], pa.date32()),
        }
    )
    return notes_tbl, gold_tbl, crit_tbl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / "data" / "heldout_t"))
    args = ap.parse_args()
    d = Path(args.dir)
    src = d / "notes.yaml"
    if not src.is_file():
        fail([f"{src} not found"])
    with open(src, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or set(doc) != {"patients", "notes"}:
        fail(["notes.yaml must be a mapping with exactly two keys: patients, notes"])
    notes, patients = doc["notes"], doc["patients"]
    errors = validate_notes(notes)
    if errors:
        fail(errors)
    errors = validate_patients(patients, notes)
    if errors:
        fail(errors)
    notes_tbl, gold_tbl, crit_tbl = build(notes, patients)
    expected = len(notes) * len(QUESTIONS)
    if gold_tbl.num_rows != expected:
        fail([f"gold has {gold_tbl.num_rows} rows, expected {expected}"])
    pq.write_table(notes_tbl, d / "notes.parquet")
    pq.write_table(gold_tbl, d / "gold.parquet")
    pq.write_table(crit_tbl, d / "criteria.parquet")

    print(
        f"notes: {notes_tbl.num_rows}  patients: {crit_tbl.num_rows}  gold rows: {gold_tbl.num_rows}  "
        f"null charttime: {sum(n['charttime'] is None for n in notes)}"
    )
    for q in BOOL_QUESTIONS:
        print(f"  {q:26s} positives {sum(n['labels'][q] for n in notes):3d}")
    for q in DATE_QUESTIONS:
        labs = [n["labels"][q] for n in notes if n["labels"][q] is not None]
        n_day = sum(lab["precision"] == "day" for lab in labs)
        print(f"  {q:26s} dated     {len(labs):3d}  (day {n_day}, month {len(labs) - n_day})")
    for c in CRITERIA:
        print(f"  {c:26s} met       {sum(p['criteria'][c] == 'met' for p in patients):3d} / {len(patients)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Build the held-out labelled set from data/heldout/notes.yaml.

Writes data/heldout/notes.parquet (one row per note) and
data/heldout/gold.parquet (one row per note x question, long format).
Validates every note before writing; exits non-zero on any problem.

Usage: .venv/bin/python scripts/build_heldout.py [--dir data/heldout]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

BOOL_QUESTIONS = [
    "atrial_fibrillation",
    "depression",
    "schizophrenia",
    "bipolar_disorder",
    "bleeding_tendency",
    "recent_stroke",
    "peptic_ulcer",
    "recent_serious_bleeding",
    "af_ablation",
    "valvular_stenosis_surgery",
    "heart_failure",
    "diabetes",
    "hypertension",
    "prior_stroke_tia",
    "cannot_make_decisions",
]

# question_id -> (canonical unit, plausible minimum, plausible maximum)
NUMERIC_QUESTIONS = {
    "platelets_min": ("10^3/uL", 1.0, 1500.0),
    "bilirubin_max": ("mg/dL", 0.1, 40.0),
    "ast_max": ("U/L", 3.0, 10000.0),
    "creatinine_max": ("mg/dL", 0.1, 20.0),
    "hemoglobin_min": ("g/dL", 2.0, 25.0),
    "chads2_max": ("points", 0.0, 6.0),
    "lvef_min": ("%", 5.0, 55.0),
    "glucose_max": ("mg/dL", 10.0, 2000.0),
}

QUESTIONS = BOOL_QUESTIONS + list(NUMERIC_QUESTIONS)
REQUIRED = ["note_id", "subject_id", "hadm_id", "charttime", "sex", "age", "text", "labels"]


def fail(errors: list[str]) -> None:
    for e in errors:
        print("ERROR:", e, file=sys.stderr)
    print(f"{len(errors)} error(s); nothing written", file=sys.stderr)
    sys.exit(1)


def note_errors(n: dict, where: str, seen: set[str], subj_of_hadm: dict[int, int]) -> list[str]:
    """What is wrong with a note's own fields (ids, ages, sex, text), shared by every held-out set's builder; `seen`
    and `subj_of_hadm` carry what earlier notes used."""
    errors = []
    nid = n["note_id"]
    if not isinstance(nid, str) or not nid:
        errors.append(f"{where}: note_id must be a non-empty string")
    if nid in seen:
        errors.append(f"{where}: duplicate note_id")
    seen.add(nid)
    for k in ("subject_id", "hadm_id", "age"):
        if not isinstance(n[k], int) or isinstance(n[k], bool):
            errors.append(f"{where}: {k} must be an integer, got {n[k]!r}")
    if isinstance(n["age"], int) and not isinstance(n["age"], bool) and not 18 <= n["age"] <= 110:
        errors.append(f"{where}: implausible age {n['age']}")
    if n["sex"] not in ("F", "M"):
        errors.append(f"{where}: sex must be F or M, got {n['sex']!r}")
    if not isinstance(n["text"], str) or not n["text"].strip():
        errors.append(f"{where}: empty text")
    if isinstance(n["hadm_id"], int) and isinstance(n["subject_id"], int):
        prev = subj_of_hadm.setdefault(n["hadm_id"], n["subject_id"])
        if prev != n["subject_id"]:
            errors.append(f"{where}: hadm_id {n['hadm_id']} shared by two subjects")
    return errors


def validate(notes: list[dict]) -> list[str]:
    errors: list[str] = []
    if not isinstance(notes, list) or not notes:
        return ["notes.yaml must be a non-empty list"]
    seen: set[str] = set()
    subj_of_hadm: dict[int, int] = {}
    for i, n in enumerate(notes):
        where = f"note[{i}] {n.get('note_id', '?')}"
        missing = [k for k in REQUIRED if k not in n]
        if missing:
            errors.append(f"{where}: missing fields {missing}")
            continue
        errors += note_errors(n, where, seen, subj_of_hadm)
        try:
            dt.datetime.fromisoformat(str(n["charttime"]))
        except ValueError:
            errors.append(f"{where}: charttime not ISO date-time: {n['charttime']!r}")

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
        for q in BOOL_QUESTIONS:
            if q in labels and not isinstance(labels[q], bool):
                errors.append(f"{where}: {q} must be true/false, got {labels[q]!r}")
        for q, (unit, lo, hi) in NUMERIC_QUESTIONS.items():
            if q not in labels or labels[q] is None:
                continue
            v = labels[q]
            if not isinstance(v, dict) or set(v) != {"value", "unit"}:
                errors.append(f"{where}: {q} must be null or {{value, unit}}, got {v!r}")
                continue
            val = v["value"]
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                errors.append(f"{where}: {q} value must be a finite number, got {val!r}")
                continue
            if v["unit"] != unit:
                errors.append(f"{where}: {q} unit must be {unit!r}, got {v['unit']!r}")
            if not lo <= val <= hi:
                errors.append(f"{where}: {q} value {val} outside plausible range [{lo}, {hi}]")
            if q == "chads2_max" and float(val) != int(val):
                errors.append(f"{where}: chads2_max must be a whole number")
    return errors


def build(notes: list[dict]) -> tuple[pa.Table, pa.Table]:
    notes_tbl = pa.table(
        {
            "note_id": pa.array([n["note_id"] for n in notes], pa.string()),
            "subject_id": pa.array([n["subject_id"] for n in notes], pa.int64()),
            "hadm_id": pa.array([n["hadm_id"] for n in notes], pa.int64()),
            "note_type": pa.array(["DS"] * len(notes), pa.string()),
            "charttime": pa.array(
                [dt.datetime.fromisoformat(str(n["charttime"])) for n in notes],
                pa.timestamp("us"),
            ),
            "text": pa.array([n["text"] for n in notes], pa.string()),
            "sex": pa.array([n["sex"] for n in notes], pa.string()),
            "age": pa.array([n["age"] for n in notes], pa.int64()),
        }
    )
    rows: dict[str, list] = {"note_id": [], "question_id": [], "value_bool": [], "value_num": [], "unit": []}
    for n in notes:
        for q in QUESTIONS:
            lab = n["labels"][q]
            rows["note_id"].append(n["note_id"])
            rows["question_id"].append(q)
            if q in NUMERIC_QUESTIONS:
                rows["value_bool"].append(None)
                rows["value_num"].append(None if lab is None else float(lab["value"]))
                rows["unit"].append(NUMERIC_QUESTIONS[q][0])
            else:
                rows["value_bool"].append(bool(lab))
                rows["value_num"].append(None)
                rows["unit"].append(None)
    gold_tbl = pa.table(
        {
            "note_id": pa.array(rows["note_id"], pa.string()),
            "question_id": pa.array(rows["question_id"], pa.string()),
            "value_bool": pa.array(rows["value_bool"], pa.bool_()),
            "value_num": pa.array(rows["value_num"], pa.float64()),
            "unit": pa.array(rows["unit"], pa.string()),
        }
    )
    return notes_tbl, gold_tbl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / "data" / "heldout"))
    args = ap.parse_args()
    d = Path(args.dir)
    with open(d / "notes.yaml", encoding="utf-8") as f:
        notes = yaml.safe_load(f)
    errors = validate(notes)
    if errors:
        fail(errors)
    notes_tbl, gold_tbl = build(notes)
    expected = len(notes) * len(QUESTIONS)
    if gold_tbl.num_rows != expected:
        fail([f"gold has {gold_tbl.num_rows} rows, expected {expected}"])
    pq.write_table(notes_tbl, d / "notes.parquet")
    pq.write_table(gold_tbl, d / "gold.parquet")

    subjects = len({n["subject_id"] for n in notes})
    print(f"notes: {notes_tbl.num_rows}  patients: {subjects}  gold rows: {gold_tbl.num_rows}")
    for q in BOOL_QUESTIONS:
        print(f"  {q:28s} positives {sum(n['labels'][q] for n in notes):3d}")
    for q in NUMERIC_QUESTIONS:
        print(f"  {q:28s} non-null  {sum(n['labels'][q] is not None for n in notes):3d}")


if __name__ == "__main__":
    main()

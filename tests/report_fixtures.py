"""A real output folder without a model: the bundled gold labels as answers, written by engine's own writers.

Used by the eval, HTML report and browser tests. Answers come from data/sample_gold.parquet (so a perfect
predictor is at hand), a few rows are turned into errors, and answers/, patients/ and report.json are written
with OutputStore, engine.cohort.rules.screen and engine.reporting.report.build_report as `engine run` writes them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.job import JobSpec
from engine.store.answers import read_answers
from engine.store.layout import OutputStore, answer_schema, to_answer_table
from engine.run import RunStats
from engine.reporting.report import build_report
from engine.cohort.rules import screen

ROOT = Path(__file__).resolve().parents[1]
GOLD = ROOT / "data" / "sample_gold.parquet"
NOTES = ROOT / "data" / "sample_notes.parquet"
EXPECTED = ROOT / "data" / "sample_expected.parquet"
ERROR_REASON = "value 120 mg/dL is outside the plausible range 0-60 mg/dL for bilirubin_max"


def gold_answers(job: JobSpec, notes: int | None = None) -> pa.Table:
    """The gold labels as answers/ rows (answers schema): answered where gold has a value (a "no" only in even
    notes), else not_in_note; evidence grounding cycles through exact, fuzzy and not_found."""
    note_table = pq.read_table(NOTES)
    if notes is not None:
        note_table = note_table.slice(0, notes)
    gold = pq.read_table(GOLD)
    gold = gold.filter(pc.is_in(gold["note_id"], value_set=note_table["note_id"]))
    rows = gold.join(note_table.select(["note_id", "subject_id", "charttime", "sex", "age"]), "note_id", join_type="inner")
    rows = rows.sort_by([("note_id", "ascending"), ("question_id", "ascending")])
    n = rows.num_rows
    # A "no" is answered "no" in even notes and "not in note" in odd ones (the same for absent: "no" questions).
    even_note = pa.array([i % 2 == 0 for i in pc.index_in(rows["note_id"], value_set=note_table["note_id"]).to_pylist()])
    said_no = pc.and_(pc.invert(pc.fill_null(rows["value_bool"], True)), even_note)
    answered = pc.or_(pc.or_(pc.fill_null(rows["value_bool"], False), said_no), pc.is_valid(rows["value_num"]))
    grounding = pa.array([("exact", "exact", "fuzzy", "exact", "not_found")[i % 5] for i in range(n)])
    quote = pc.if_else(answered, pc.binary_join_element_wise("gold ", rows["question_id"], ""), pa.scalar(None, pa.string()))
    columns = {
        "patient_id": pc.cast(rows["subject_id"], pa.string()), "note_id": rows["note_id"], "question_id": rows["question_id"],
        "status": pc.if_else(answered, "answered", "not_in_note"),
        "value_bool": pc.if_else(answered, rows["value_bool"], pa.scalar(None, pa.bool_())),
        "value_num": rows["value_num"], "unit": rows["unit"], "evidence": quote,
        "evidence_start": pa.array([0] * n, pa.int32()), "evidence_end": pa.array([10] * n, pa.int32()),
        "grounding": pc.if_else(answered, grounding, pa.scalar(None, pa.string())),
        "verified": pc.if_else(answered, True, pa.scalar(None, pa.bool_())), "verification": pa.nulls(n, pa.string()),
        "error": pa.nulls(n, pa.string()),
        "route": pa.array(["model"] * n), "candidates": pa.array([1] * n, pa.int32()), "cue_flags": pa.nulls(n, pa.string()),
        "model": pa.array(["gold"] * n), "truncated": pa.array([False] * n), "prompt_tokens": pa.array([1000] * n, pa.int32()),
        "cached_tokens": pa.array([900] * n, pa.int32()), "completion_tokens": pa.array([12] * n, pa.int32()),
        "charttime": rows["charttime"], "row_number": pa.array(range(n), pa.int64()), "shard_id": pa.array(["s0"] * n),
        "batch_seconds": pa.array([0.01] * n), "sex": rows["sex"], "age": rows["age"],
    }
    return to_answer_table(pa.table(columns), answer_schema(job, note_table.schema), job.fingerprint())


def with_errors(answers: pa.Table, count: int) -> pa.Table:
    """The first `count` answered numeric rows turned into error rows (as the parser marks them)."""
    rows = answers.to_pylist()
    numeric = [i for i, r in enumerate(rows) if r["status"] == "answered" and r["value_num"] is not None][:count]
    for i in numeric:
        rows[i].update(status="error", value_num=None, unit=None, evidence=None, grounding=None, error=ERROR_REASON)
    return pa.Table.from_pylist(rows, schema=answers.schema)


def with_unverified(answers: pa.Table, kept: int, replaced: int) -> pa.Table:
    """Model answers that failed their check against the note. The first `kept` answered creatinine_max rows stay as
    the model said (model mode), raised to 9.9 mg/dL so that each is its patient's highest value; the first
    `replaced` answered rows of other numeric questions carry the cue answer that stood in for them (hybrid)."""
    rows = answers.to_pylist()
    answered = [i for i, r in enumerate(rows) if r["status"] == "answered" and r["value_num"] is not None]
    creatinine = [i for i in answered if rows[i]["question_id"] == "creatinine_max"][:kept]
    others = [i for i in answered if rows[i]["question_id"] != "creatinine_max"][:replaced]
    reason = "value not in evidence quote (model: 9.9 mg/dL, quote: 'creatinine')"
    for i in creatinine:
        rows[i].update(value_num=9.9, unit="mg/dL", verified=False, verification=reason)
    for i in others:
        rows[i].update(verified=False, model="cues", verification=f"{reason}; the cue answer stands")
    return pa.Table.from_pylist(rows, schema=answers.schema)


def write_output_folder(folder: Path, job: JobSpec, answers: pa.Table) -> tuple[OutputStore, dict, pa.Table]:
    """answers/, patients/patients.parquet and report.json, written as `engine run` writes them."""
    store = OutputStore(str(folder), {})
    store.commit_shard("s0", answers)
    answers = read_answers(store.uri)
    patients, funnel = screen(answers, job)
    store.write_table("patients/patients.parquet", patients)
    now = time.time()
    stats = RunStats(started=now - 12, first_result=now - 10, finished=now, shards_total=1, shards_committed=1,
                     notes_processed=len(pc.unique(answers["note_id"])), pairs_processed=answers.num_rows,
                     engine_seconds=9.5, patients_processed=set(answers["patient_id"].to_pylist()))
    report = build_report(job, answers, patients, funnel, stats, store)
    store.write_json("report.json", report)
    return store, report, patients

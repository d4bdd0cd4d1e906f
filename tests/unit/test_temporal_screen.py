"""Time in the screen, end to end without a model: hand-written dated notes through the cues (extraction mode lexical,
in process), the roll-up with the shipped job's windows and index dates, and its rules. Every expected decision is
written out by hand from the notes' dates below (30 days for a stroke, 6 calendar months or 183 days for a bleed,
counted back from the patient's index date), not computed by the engine's SQL."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.cohort.rules import screen
from engine.cohort.windows import window_summary
from engine.job import IndexDateSpec, load_job
from engine.tools.inprocess import lexical_answers

ROOT = Path(__file__).resolve().parents[2]
T = dt.datetime
AF = "Atrial fibrillation on apixaban. Hypertension."
QUIET = "Seen in clinic. No new complaints. " + AF

NOTES = [  # (patient, note, charttime, text)
    # stroke 30 days before the latest note: the window's edge, inside
    ("p01", "p01-a", T(2026, 1, 10, 9), f"Acute ischemic stroke, L MCA territory (this admission). {AF}"),
    ("p01", "p01-b", T(2026, 2, 9, 17), QUIET),
    # 31 days before: outside; the note gives no date, so nothing else says recent
    ("p02", "p02-a", T(2026, 1, 9, 9), f"Acute ischemic stroke, L MCA territory (this admission). {AF}"),
    ("p02", "p02-b", T(2026, 2, 9, 8), QUIET),
    # a stroke the cues read as history, dated 3 weeks before the note: the date decides (21 days)
    ("p03", "p03-a", T(2026, 3, 10, 12), f"She has a history of stroke 3 weeks ago with residual weakness. {AF}"),
    # history of stroke, dated years ago: not recent
    ("p04", "p04-a", T(2026, 3, 10, 12), f"History of stroke in 2019, no residual deficits. {AF}"),
    # bleed exactly 6 months before the latest note: inside
    ("p05", "p05-a", T(2025, 9, 10, 10), f"Lower GI bleed from diverticulosis requiring 2 units pRBC. {AF}"),
    ("p05", "p05-b", T(2026, 3, 10, 16), QUIET),
    # a day earlier: outside
    ("p06", "p06-a", T(2025, 9, 9, 10), f"Lower GI bleed from diverticulosis requiring 2 units pRBC. {AF}"),
    ("p06", "p06-b", T(2026, 3, 10, 16), QUIET),
    # a bleed 2 weeks before a note of 5 January: 22 December, across the year end
    ("p07", "p07-a", T(2026, 1, 5, 11), f"History of GI bleed 2 weeks ago, Hgb stable since. {AF}"),
    # a bleed 7 months before (10 August 2025 from 10 March 2026, 212 days): outside 183 days
    ("p08", "p08-a", T(2026, 3, 10, 11), f"History of GI bleed 7 months ago, no recurrence. {AF}"),
    # a stroke note without a charttime beside a dated one: counted and flagged
    ("p09", "p09-a", None, f"Acute embolic stroke (R PCA territory), this admission. {AF}"),
    ("p09", "p09-b", T(2026, 3, 1, 9), QUIET),
    # index-table patients: p10's index date is 1 June 2026, 83 days after its stroke note; p11 is not in the table
    ("p10", "p10-a", T(2026, 3, 10, 9), f"Acute ischemic stroke, L MCA territory (this admission). {AF}"),
    ("p11", "p11-a", T(2026, 3, 10, 9), f"Acute ischemic stroke, L MCA territory (this admission). {AF}"),
]

# The decisions, by hand (met / not_met) for the two time-bound exclusions.
EXPECTED = {
    "p01": ("met", "not_met"), "p02": ("not_met", "not_met"), "p03": ("met", "not_met"), "p04": ("not_met", "not_met"),
    "p05": ("not_met", "met"), "p06": ("not_met", "not_met"), "p07": ("not_met", "met"), "p08": ("not_met", "not_met"),
    "p09": ("met", "not_met"), "p10": ("met", "not_met"), "p11": ("met", "not_met"),
}


def write_notes(folder: Path) -> Path:
    path = folder / "notes.parquet"
    pq.write_table(pa.table({
        "note_id": [n[1] for n in NOTES], "subject_id": [n[0] for n in NOTES], "text": [n[3] for n in NOTES],
        "charttime": pa.array([n[2] for n in NOTES], pa.timestamp("us")),
        "sex": ["F"] * len(NOTES), "age": [70] * len(NOTES),
    }), path)
    return path


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("temporal")
    job = load_job(ROOT / "jobs" / "apixaban.yaml")
    job = job.model_copy(update={"input": job.input.model_copy(update={"uri": str(write_notes(folder))})})
    return job, lexical_answers(job), folder


def by_patient(patients: pa.Table) -> dict[str, dict]:
    return {r["patient_id"]: r for r in patients.to_pylist()}


def test_the_cues_read_the_dates_near_the_mentions(answers):
    _, rows, _ = answers
    dated = {(r["note_id"], r["question_id"]): (r["value_date"], r["value_text"], r["evidence"])
             for r in rows.to_pylist() if r["value_date"] is not None}
    assert dated[("p03-a", "stroke_date")][:2] == (dt.date(2026, 2, 17), "3 weeks ago")
    assert dated[("p04-a", "stroke_date")][:2] == (dt.date(2019, 1, 1), "in 2019")
    assert dated[("p07-a", "bleeding_date")][:2] == (dt.date(2025, 12, 22), "2 weeks ago")
    assert dated[("p08-a", "bleeding_date")][:2] == (dt.date(2025, 8, 10), "7 months ago")
    assert "3 weeks ago" in dated[("p03-a", "stroke_date")][2]  # the phrase is kept in the evidence quote
    assert ("p01-a", "stroke_date") not in dated  # an undated stroke gives no date: not in note


def test_criteria_follow_the_windows_and_the_dates(answers):
    job, rows, _ = answers
    patients, _ = screen(rows, job)
    got = by_patient(patients)
    without_index_table = {p: e for p, e in EXPECTED.items()}
    for patient, (stroke, bleed) in without_index_table.items():
        assert (got[patient]["exc_recent_stroke"], got[patient]["exc_bleeding_risk"]) == (stroke, bleed), patient
    assert got["p02"]["recent_stroke__notes_outside_window"] == 1 and got["p01"]["recent_stroke__notes_outside_window"] == 0
    assert got["p06"]["recent_serious_bleeding__notes_outside_window"] == 1
    assert got["p09"]["recent_stroke__undated_notes"] == 1 and got["p09"]["recent_stroke"] is True
    assert got["p01"]["index_date"] == dt.date(2026, 2, 9) and got["p01"]["index_date_source"] == "latest_note"
    assert got["p07"]["bleeding_date"] == dt.date(2025, 12, 22)


def test_an_index_table_with_a_missing_patient(answers):
    job, rows, folder = answers
    table = folder / "index.parquet"
    pq.write_table(pa.table({"subject_id": ["p10", "p99"], "screening": [dt.date(2026, 6, 1), dt.date(2026, 1, 1)]}), table)
    spec = IndexDateSpec(uri=str(table), patient_id="subject_id", date="screening")
    got = by_patient(screen(rows, job.model_copy(update={"index": spec}))[0])
    # p10: 10 March is 83 days before 1 June: outside the 30-day window, and no stroke date
    assert got["p10"]["exc_recent_stroke"] == "not_met" and got["p10"]["index_date_source"] == "table"
    assert got["p10"]["recent_stroke__notes_outside_window"] == 1
    # p11 is not in the table: its latest note stands in
    assert got["p11"]["exc_recent_stroke"] == "met" and got["p11"]["index_date_source"] == "latest_note"
    unknown = by_patient(screen(rows, job.model_copy(update={"index": spec.model_copy(update={"missing": "unknown"})}))[0])
    # ... unless the job says a missing index date is unknown: then the window cannot be placed
    assert unknown["p11"]["index_date"] is None and unknown["p11"]["recent_stroke"] is None
    assert unknown["p11"]["exc_recent_stroke"] == "unknown" and unknown["p11"]["status"] == "needs_review"
    assert unknown["p10"]["exc_recent_stroke"] == "not_met"


def test_report_windows_counts_the_excluded_and_undated_notes(answers):
    job, rows, _ = answers
    patients, _ = screen(rows, job)
    summary = window_summary(patients, job)
    stroke = summary["questions"]["recent_stroke"]
    # outside 30 days: p02-a, p05-a, p06-a (6 months before their latest notes); undated: p09-a
    assert (stroke["lookback"], stroke["lookahead"], stroke["notes_excluded"], stroke["undated_notes_counted"]) == ("30d", "0d", 3, 1)
    bleed = summary["questions"]["recent_serious_bleeding"]
    assert (bleed["notes_excluded"], bleed["patients_with_notes_excluded"]) == (1, 1)  # p06-a only
    assert summary["index_date"] == {"latest_note": 11}


def test_a_bad_index_table_stops_with_an_error_naming_it(tmp_path):
    from engine.cohort.windows import read_index_table
    from engine.errors import InputError

    job = load_job(ROOT / "jobs" / "apixaban.yaml")
    path = tmp_path / "index.parquet"
    pq.write_table(pa.table({"subject_id": ["p1"], "when": [dt.date(2026, 1, 1)]}), path)
    with pytest.raises(InputError, match=r"index table .*index.parquet: no column 'index_date' \(has: subject_id, when\); set index.patient_id and index.date"):
        read_index_table(job.model_copy(update={"index": IndexDateSpec(uri=str(path), patient_id="subject_id")}))
    pq.write_table(pa.table({"patient_id": ["p1", "p1", "p2", None], "index_date": ["2026-01-01", "2026-02-01", "not a date", "2026-01-01"]}), path)
    with pytest.raises(InputError, match="1 patient\\(s\\) with more than one index date \\(e.g. 'p1'\\); keep one row per patient"):
        read_index_table(job.model_copy(update={"index": IndexDateSpec(uri=str(path))}))
    pq.write_table(pa.table({"patient_id": [1, 2, 3], "index_date": ["2026-01-01", "not a date", "2026-03-05T10:00"]}), path)
    table = read_index_table(job.model_copy(update={"index": IndexDateSpec(uri=str(path))}))
    assert table.sort_by("patient_id").to_pylist() == [{"patient_id": "1", "index_date": dt.date(2026, 1, 1)},
                                                       {"patient_id": "3", "index_date": dt.date(2026, 3, 5)}]
    with pytest.raises(InputError, match="cannot read it"):
        read_index_table(job.model_copy(update={"index": IndexDateSpec(uri=str(tmp_path / "missing.parquet"))}))


STROKE = f"Acute ischemic stroke, L MCA territory (this admission). {AF}"
MORE_NOTES = [  # (patient, note, charttime, screening date column, text)
    # index from the notes' own column: 1 June, 83 days after the stroke note: outside 30 days
    ("q12", "q12-a", T(2026, 3, 10, 9), dt.date(2026, 6, 1), STROKE),
    ("q12", "q12-b", T(2026, 3, 12, 9), None, QUIET),
    # no value in the column: the latest note (12 March) stands in, 2 days after the stroke: inside
    ("q13", "q13-a", T(2026, 3, 10, 9), None, STROKE),
    ("q13", "q13-b", T(2026, 3, 12, 9), None, QUIET),
    # the stroke note 7 days after the screening date (5 March): inside a 7-day lookahead, outside without one
    ("q14", "q14-a", T(2026, 3, 12, 9), dt.date(2026, 3, 5), STROKE),
    # 8 days after (4 March): outside either way
    ("q15", "q15-a", T(2026, 3, 12, 9), dt.date(2026, 3, 4), STROKE),
]


@pytest.fixture(scope="module")
def column_answers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("temporal-column")
    path = folder / "notes.parquet"
    pq.write_table(pa.table({
        "note_id": [n[1] for n in MORE_NOTES], "subject_id": [n[0] for n in MORE_NOTES],
        "text": [n[4] for n in MORE_NOTES], "charttime": pa.array([n[2] for n in MORE_NOTES], pa.timestamp("us")),
        "screening": pa.array([n[3] for n in MORE_NOTES], pa.date32()),
        "sex": ["F"] * len(MORE_NOTES), "age": [70] * len(MORE_NOTES),
    }), path)
    job = load_job(ROOT / "jobs" / "apixaban.yaml")
    job = job.model_copy(update={
        "input": job.input.model_copy(update={"uri": str(path), "structured": ["sex", "age", "screening"]}),
        "index": IndexDateSpec(column="screening"),
    })
    return job, lexical_answers(job)


def test_an_index_date_from_a_structured_column(column_answers):
    job, rows = column_answers
    got = by_patient(screen(rows, job)[0])
    assert (got["q12"]["index_date"], got["q12"]["index_date_source"]) == (dt.date(2026, 6, 1), "column")
    assert got["q12"]["exc_recent_stroke"] == "not_met" and got["q12"]["recent_stroke__notes_outside_window"] == 2
    assert (got["q13"]["index_date"], got["q13"]["index_date_source"]) == (dt.date(2026, 3, 12), "latest_note")
    assert got["q13"]["exc_recent_stroke"] == "met"
    # a note after the index date is outside a window without lookahead
    assert got["q14"]["exc_recent_stroke"] == "not_met" and got["q15"]["exc_recent_stroke"] == "not_met"
    unknown = by_patient(screen(rows, job.model_copy(update={"index": IndexDateSpec(column="screening", missing="unknown")}))[0])
    assert unknown["q13"]["index_date"] is None and unknown["q13"]["exc_recent_stroke"] == "unknown"


def test_lookahead_counts_the_notes_just_after_the_index_date(column_answers):
    job, rows = column_answers
    questions = [q.model_copy(update={"lookahead": "7d"}) if q.id == "recent_stroke" else q for q in job.questions]
    got = by_patient(screen(rows, job.model_copy(update={"questions": questions}))[0])
    assert got["q14"]["exc_recent_stroke"] == "met" and got["q14"]["recent_stroke__notes_outside_window"] == 0
    assert got["q15"]["exc_recent_stroke"] == "not_met" and got["q15"]["recent_stroke__notes_outside_window"] == 1
    assert got["q12"]["exc_recent_stroke"] == "not_met"  # 83 days before: lookahead changes nothing there

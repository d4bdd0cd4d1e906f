"""Rules on gold answers: the synthetic sample's gold labels, screened with jobs/apixaban.yaml, must give the
criterion states, status and reasons that engine.tools.synthetic computed independently (sample_expected.parquet).

No model and no Ray: this checks roll-up + units + rules against a second implementation of the trial logic.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from engine.job import load_job
from engine.cohort.rules import check_rules, screen

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"
FILES = {name: DATA / f"sample_{name}.parquet" for name in ("gold", "notes", "expected")}

pytestmark = pytest.mark.skipif(not all(p.exists() for p in FILES.values()), reason="synthetic sample not generated")


def gold_answers() -> pa.Table:
    """Gold labels in the answers format: answered where a value exists, else not_in_note (yes/no False too)."""
    gold = pq.read_table(FILES["gold"])
    notes = pq.read_table(FILES["notes"], columns=["note_id", "subject_id", "charttime", "sex", "age"])
    answered = pc.or_(pc.fill_null(gold["value_bool"], False), pc.is_valid(gold["value_num"]))
    gold = gold.append_column("status", pc.if_else(answered, "answered", "not_in_note"))
    gold = gold.append_column("evidence", pc.if_else(answered, pc.binary_join_element_wise(
        "gold ", gold["question_id"], ""), pa.scalar(None, pa.string())))
    table = gold.join(notes, "note_id", join_type="inner")
    table = table.append_column("patient_id", pc.cast(table["subject_id"], pa.string()))
    assert table.num_rows == gold.num_rows, "every gold row must belong to a note of the sample"
    return table


@pytest.fixture(scope="module")
def job():
    return load_job(ROOT / "jobs" / "apixaban.yaml")


@pytest.fixture(scope="module")
def screened(job):
    return screen(gold_answers(), job)


@pytest.fixture(scope="module")
def expected() -> dict[str, dict]:
    return {row["subject_id"]: row for row in pq.read_table(FILES["expected"]).to_pylist()}


def test_the_job_rules_check_against_the_sample_types(job):
    notes = pq.read_schema(FILES["notes"])
    assert check_rules(job, {name: notes.field(name).type for name in job.input.structured}) == []


def test_one_row_per_expected_patient(screened, expected):
    patients, _ = screened
    assert sorted(patients["patient_id"].to_pylist()) == sorted(expected)


def test_criteria_status_and_reasons_match_the_independent_expectation(screened, expected, job):
    patients, _ = screened
    columns = [c.id for c in job.criteria] + ["status", "reasons"]
    mismatches = []
    for row in patients.select(["patient_id", *columns]).to_pylist():
        want = expected[row["patient_id"]]
        got = {**row, "reasons": ",".join(row["reasons"])}
        diff = {c: (got[c], want[c]) for c in columns if got[c] != want[c]}
        if diff:
            mismatches.append((row["patient_id"], diff))
    assert not mismatches, "\n".join(f"{pid}: {diff} (got, expected)" for pid, diff in mismatches)


def test_funnel_ends_with_the_patients_not_excluded(screened):
    patients, funnel = screened
    statuses = patients["status"].to_pylist()
    assert funnel[0]["entering"] == len(statuses)
    assert funnel[-1]["remaining"] == statuses.count("eligible") + statuses.count("needs_review")

"""`engine run` from the command line, as a user runs it (its own process, its own private Ray): the console holds
the engine's lines and none of Ray's start-up notices, a limit that cuts the input says so, and `engine rules`
afterwards leaves patients/ one Parquet dataset with the funnel in report.json. Lexical mode: no model, seconds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import APIXABAN_JOB, ROOT, SAMPLE_NOTES

pytestmark = pytest.mark.e2e

RAY_NOTICES = (
    "Token authentication is enabled",  # Python, ray._private.authentication
    "constructor arguments in the object store",  # C++, the driver's core worker, for each Ray Data actor
    "Progress bars disabled",  # Python, ray.data._internal.progress
    "RAY_BACKEND_LOG_LEVEL",  # C++, announcing the level the engine sets to quiet the line above
)
RAY_LOG_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", re.MULTILINE)  # Ray's Python and C++ log lines


def test_a_lexical_run_prints_only_the_engines_lines_and_says_what_its_limit_leaves_out(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_BACKEND_LOG_LEVEL", "RAY_ADDRESS")} | {"COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "engine", "run", str(APIXABAN_JOB), "--mode", "lexical", "--limit", "5",
                           "--output", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    total = pq.ParquetFile(SAMPLE_NOTES).metadata.num_rows
    lines = done.stdout.splitlines()
    assert lines[0] == f"Limit: answering 5 of {total} notes (--limit 5)", done.stdout
    assert [n for n in RAY_NOTICES if n in done.stdout + done.stderr] == [], done.stderr
    assert not RAY_LOG_LINE.search(done.stdout + done.stderr), done.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["notes"], report["limit"], report["notes_in_input"]) == (5, 5, total)
    patients = pq.read_table(out / "patients")  # report.json's windows sum the patient table's window columns
    windows = report["windows"]
    assert sorted(windows["questions"]) == ["recent_serious_bleeding", "recent_stroke"]
    for question, lookback in (("recent_stroke", "30d"), ("recent_serious_bleeding", "6mo")):
        told = windows["questions"][question]
        assert (told["lookback"], told["lookahead"]) == (lookback, "0d")
        assert told["notes_excluded"] == sum(patients[f"{question}__notes_outside_window"].to_pylist())
        assert told["undated_notes_counted"] == sum(patients[f"{question}__undated_notes"].to_pylist())
    assert sum(windows["index_date"].values()) == report["patients"]

    from engine.cli import app

    rules = CliRunner().invoke(app, ["rules", str(APIXABAN_JOB), "--answers", str(out)])
    assert rules.exit_code == 0, rules.output
    assert sorted(p.name for p in (out / "patients").iterdir()) == ["patients.parquet"]
    assert ds.dataset(out / "patients").count_rows() == pq.read_table(out / "patients").num_rows == report["patients"]
    after = json.loads((out / "report.json").read_text())
    assert after["cohort"]["funnel"] == report["cohort"]["funnel"] and after["cohort"]["rules_applied"]  # same rules
    assert (after["limit"], after["notes_in_input"]) == (5, total)

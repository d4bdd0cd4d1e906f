"""The held-out sets' Parquet files are what their builders make from notes.yaml (the labels' source of truth), and a
builder refuses a set whose labels contradict each other, writing nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SETS = [("heldout", "build_heldout.py", ("notes", "gold")),
        ("heldout_b", "build_heldout.py", ("notes", "gold")),
        ("dev_c", "build_heldout.py", ("notes", "gold")),
        ("heldout_d", "build_heldout.py", ("notes", "gold")),
        ("heldout_t", "build_heldout_time.py", ("notes", "gold", "criteria"))]


def build(script: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--dir", str(folder)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name, script, tables", SETS)
def test_the_committed_parquet_is_what_notes_yaml_builds(tmp_path, name, script, tables):
    shutil.copy(ROOT / "data" / name / "notes.yaml", tmp_path / "notes.yaml")
    done = build(script, tmp_path)
    assert done.returncode == 0, done.stderr
    for table in tables:
        assert pq.read_table(tmp_path / f"{table}.parquet").equals(pq.read_table(ROOT / "data" / name / f"{table}.parquet")), table


def test_the_time_set_builder_refuses_a_criterion_its_dates_contradict(tmp_path):
    source = yaml.safe_load((ROOT / "data" / "heldout_t" / "notes.yaml").read_text(encoding="utf-8"))
    patient = source["patients"][0]
    flipped = {"met": "not_met", "not_met": "met"}
    patient["criteria"]["exc_recent_stroke"] = flipped[patient["criteria"]["exc_recent_stroke"]]
    (tmp_path / "notes.yaml").write_text(yaml.safe_dump(source, sort_keys=False, allow_unicode=True), encoding="utf-8")
    done = build("build_heldout_time.py", tmp_path)
    assert done.returncode != 0 and str(patient["subject_id"]) in done.stderr and "exc_recent_stroke" in done.stderr, done.stderr
    assert not list(tmp_path.glob("*.parquet"))

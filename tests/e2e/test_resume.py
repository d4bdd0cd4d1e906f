"""Crash and resume: SIGKILL the whole run (driver, Ray, workers) at random moments, start it again, and check
that the final answers hold every (note, question) exactly once. Uses the null backend (no model) so that many
kills fit in a few minutes; the commit and resume code is the same for every backend."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import APIXABAN_JOB, ROOT

pytestmark = pytest.mark.e2e

NOTES = 4000
KILLS = 4


def write_notes(path: Path, n: int) -> None:
    base = datetime(2150, 1, 1)
    pq.write_table(pa.table({
        "note_id": [f"n{i:05d}" for i in range(n)],
        "subject_id": [i // 2 for i in range(n)],
        "charttime": [base + timedelta(days=i) for i in range(n)],
        "text": [f"Discharge summary {i}. PMH: HTN. Cr {1 + i % 3}.1 mg/dL." if i % 97 else "" for i in range(n)],
        "sex": ["F" if i % 2 else "M" for i in range(n)],
        "age": [60 + i % 30 for i in range(n)],
    }), path, row_group_size=500)


def null_job(tmp: Path, output: str = "out", notes_per_batch: int = 25) -> Path:
    spec = yaml.safe_load(APIXABAN_JOB.read_text())
    spec["input"].update(uri=str(tmp / "notes.parquet"), limit=None)
    spec["output"]["uri"] = str(tmp / output)
    spec["model"] = {"backend": "null", "name": "null"}
    spec["extraction"] = {"mode": "model"}  # every pair through the model stage, as a model-backed run
    spec["batching"] = {"notes_per_shard": 25, "notes_per_batch": notes_per_batch}
    path = tmp / f"job-{output}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start_run(job: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", "run", str(job)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_run(process: subprocess.Popen) -> None:
    """SIGKILL the run's whole session: the driver and the private Ray it started (raylet, GCS, workers),
    including workers that moved to their own process group. Nothing outside the session is touched."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
    for line in listing:
        fields = line.split()
        if len(fields) == 2 and int(fields[1]) == process.pid:
            try:
                os.kill(int(fields[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def committed_answers(out: Path) -> pa.Table | None:
    files = sorted((out / "answers").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def committed_shards(out: Path) -> int:
    folder = out / "answers"
    return len([p for p in folder.glob("*.parquet")]) if folder.exists() else 0


@pytest.mark.parametrize("notes_per_batch", [25, 10], ids=["batch-is-shard", "batches-staged"])
def test_killed_runs_resume_to_exactly_once(tmp_path, notes_per_batch):
    """Each trial kills the run at a random moment while shards are being committed (watched on disk). A batch of a
    whole shard is committed by its model actor; batches of 10 notes straddle the 25-note shards, whose parts are
    staged and merged by the ledger's commit tasks."""
    write_notes(tmp_path / "notes.parquet", NOTES)
    job = null_job(tmp_path, notes_per_batch=notes_per_batch)
    questions = len(yaml.safe_load(job.read_text())["questions"])  # per note
    out = tmp_path / "out"
    total_shards = NOTES // 25
    rng = random.Random(1234)
    progress = []
    for _ in range(KILLS):
        done = committed_shards(out)
        target = done + rng.randint(1, max(1, (total_shards - done) // 3))
        process = start_run(job)
        deadline = time.monotonic() + 240
        while process.poll() is None and committed_shards(out) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))  # land anywhere: between commits, inside a write, in the next batch
        if process.poll() is not None:
            ended = process.stdout.read()[-3000:]
            break
        kill_run(process)
        partial = committed_answers(out)
        progress.append(0 if partial is None else partial.num_rows)
        if partial is not None:  # what was committed before the kill is whole and unique
            assert partial.num_rows % questions == 0
            keys = pc.binary_join_element_wise(partial["note_id"], partial["question_id"], "|")
            assert len(pc.unique(keys)) == partial.num_rows
    print(f"committed rows after each kill: {progress}")
    assert len(progress) == KILLS and 0 < progress[0] < NOTES * questions, f"the kills landed while the run was committing: {locals().get('ended')}"
    final = subprocess.run([sys.executable, "-m", "engine", "run", str(job)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    answers = committed_answers(out)
    assert answers.num_rows == NOTES * questions
    keys = pc.binary_join_element_wise(answers["note_id"], answers["question_id"], "|")
    assert len(pc.unique(keys)) == NOTES * questions, "every (note, question) exactly once"
    assert not list((out / "answers").glob(".tmp-*")), "partial writes are removed on resume"
    assert progress == sorted(progress), f"committed work only grows across kills: {progress}"
    again = subprocess.run([sys.executable, "-m", "engine", "run", str(job)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Nothing to do" in again.stdout
    assert committed_answers(out).num_rows == NOTES * questions

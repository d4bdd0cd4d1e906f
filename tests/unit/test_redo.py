"""engine.store.redo and the merge commits it needs: the rows whose model server was unavailable are found, only their
pairs go through again, and they replace their old rows in the committed shard, in place, whichever way it is
committed (by the actor, or staged and merged by the ledger's task), a retried merge changing nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.backends import SERVER_UNAVAILABLE
from engine.stages.expand import expand_questions
from engine.store.commit import stage_parts
from engine.store.layout import ANSWERS, OutputStore, replace_rows
from engine.store.redo import keep_redo_pairs, rows_to_redo

QUESTIONS = ["atrial_fibrillation", "creatinine_max", "stroke_date"]
SCHEMA = pa.schema([("shard_id", pa.string()), ("row_number", pa.int64()), ("note_id", pa.string()), ("patient_id", pa.string()),
                    ("question_id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("evidence", pa.string()),
                    ("prompt_tokens", pa.int32())])
DOWN = f"{SERVER_UNAVAILABLE}: http://127.0.0.1:8000/v1 connection failed after 6 retries (Connection error.)"


def shard_rows(shard_id: str, first_row: int, notes: int, down: set[tuple[int, str]] = frozenset(), tag: str = "first") -> pa.Table:
    """A committed shard's rows, note-major in job order; the pairs in `down` are server-unavailable error rows."""
    rows = []
    for row in range(first_row, first_row + notes):
        for question in QUESTIONS:
            failed = (row, question) in down
            rows.append({"shard_id": shard_id, "row_number": row, "note_id": f"n{row}", "patient_id": f"p{row}", "question_id": question,
                         "status": "error" if failed else "answered", "error": DOWN if failed else None,
                         "evidence": None if failed else f"{tag} {row} {question}", "prompt_tokens": None if failed else 100})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def only(table: pa.Table, pairs: set[tuple[int, str]]) -> pa.Table:
    keys = zip(table["row_number"].to_pylist(), table["question_id"].to_pylist())
    return table.filter(pa.array([key in pairs for key in keys]))


def test_rows_to_redo_finds_only_the_server_unavailable_rows():
    committed = pa.concat_tables([shard_rows("s0", 0, 2, {(1, "creatinine_max")}), shard_rows("s1", 2, 2),
                                  shard_rows("s2", 4, 2, {(4, "stroke_date"), (5, "atrial_fibrillation")})])
    other_error = committed.to_pylist()
    other_error[0].update(status="error", error="output does not match the answer schema (answer: ...)")
    table = pa.Table.from_pylist(other_error, schema=committed.schema)
    assert rows_to_redo(table) == {"s0": [(1, "creatinine_max")], "s2": [(4, "stroke_date"), (5, "atrial_fibrillation")]}
    assert rows_to_redo(shard_rows("s1", 2, 2)) == {}


def test_only_the_redone_pairs_of_a_redone_shard_go_through():
    notes = pa.table({"shard_id": ["s0", "s0", "s1"], "row_number": pa.array([0, 1, 2], pa.int64()), "text": ["a", "b", "c"]})
    rows = expand_questions(notes, QUESTIONS)
    kept = keep_redo_pairs(rows, {"s0": {(1, "creatinine_max"), (0, "stroke_date")}})
    assert list(zip(kept["row_number"].to_pylist(), kept["question_id"].to_pylist())) == \
        [(0, "stroke_date"), (1, "creatinine_max"), (2, "atrial_fibrillation"), (2, "creatinine_max"), (2, "stroke_date")]
    assert keep_redo_pairs(rows, {}) is rows
    assert keep_redo_pairs(rows, {"s0": set()}).num_rows == 3  # s1's rows only


def test_replace_rows_puts_each_new_row_where_the_old_one_was():
    down = {(0, "stroke_date"), (1, "atrial_fibrillation")}
    committed = shard_rows("s0", 0, 2, down)
    redone = only(shard_rows("s0", 0, 2, tag="again"), down)
    merged = replace_rows(committed, redone.take([1, 0]))  # in any order
    assert merged.num_rows == committed.num_rows
    assert merged["question_id"].to_pylist() == committed["question_id"].to_pylist()
    evidence = merged["evidence"].to_pylist()
    assert evidence == ["first 0 atrial_fibrillation", "first 0 creatinine_max", "again 0 stroke_date",
                        "again 1 atrial_fibrillation", "first 1 creatinine_max", "first 1 stroke_date"]
    assert merged["error"].null_count == merged.num_rows
    with pytest.raises(RuntimeError, match="pipeline bug"):
        replace_rows(committed, shard_rows("s9", 7, 1))


@pytest.fixture
def store(tmp_path) -> OutputStore:
    store = OutputStore(str(tmp_path / "out"), {})
    store.fs.makedirs(store.answers_dir, exist_ok=True)
    return store


def committed(tmp_path: Path, shard_id: str) -> pa.Table:
    return pq.read_table(tmp_path / "out" / ANSWERS / f"{shard_id}.parquet")


def test_a_staged_redo_merges_into_the_committed_shard_and_a_retry_changes_nothing(store, tmp_path):
    down = {(0, "creatinine_max"), (1, "stroke_date")}
    store.commit_shard("s0", shard_rows("s0", 0, 2, down))
    again = only(shard_rows("s0", 0, 2, tag="again"), down)
    parts = [store.stage_part("s0", again.slice(0, 1)), store.stage_part("s0", again.slice(1, 1))]
    store.commit_staged("s0", parts, merge=True)
    table = committed(tmp_path, "s0")
    assert table["evidence"].to_pylist()[1] == "again 0 creatinine_max" and table["evidence"].to_pylist()[5] == "again 1 stroke_date"
    assert table["error"].null_count == table.num_rows and table["evidence"].to_pylist()[0] == "first 0 atrial_fibrillation"
    assert not any((tmp_path / "out" / "_staging").rglob("*.arrow"))
    store.commit_staged("s0", parts, merge=True)  # a commit task run again after its parts went: the merge is done
    assert committed(tmp_path, "s0").equals(table)


def test_a_batch_that_is_all_of_a_shards_redo_merges_at_once(store, tmp_path):
    down = {(2, "atrial_fibrillation"), (3, "atrial_fibrillation")}
    store.commit_shard("s1", shard_rows("s1", 2, 2, down))
    redone = only(shard_rows("s1", 2, 2, tag="again"), down)
    for _ in range(2):  # a retried batch puts the same rows in again
        parts = stage_parts(store, redone, pa.chunked_array([[0.0] * redone.num_rows]), time.perf_counter(),
                            expected={"s1": 2}, redo_shards=frozenset({"s1"}))
        assert parts["path"].to_pylist() == [""]
        table = committed(tmp_path, "s1")
        assert table.num_rows == 6 and table["error"].null_count == 6
        assert table["evidence"].to_pylist() == ["again 2 atrial_fibrillation", "first 2 creatinine_max", "first 2 stroke_date",
                                                 "again 3 atrial_fibrillation", "first 3 creatinine_max", "first 3 stroke_date"]

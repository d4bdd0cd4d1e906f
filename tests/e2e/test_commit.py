"""The ledger (engine.store.commit) on the session's local Ray: a shard is committed as soon as its last part is
reported, while other shards are still incomplete, and a part reported twice (a retried batch) counts once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.store.commit import ShardLedger
from engine.store.layout import ANSWERS, OutputStore

pytestmark = pytest.mark.e2e


def rows(shard_id: str, first: int, n: int) -> pa.Table:
    return pa.table({"shard_id": [shard_id] * n * 2, "note_id": [f"n{first + i // 2}" for i in range(n * 2)],
                     "patient_id": [f"p{(first + i // 2) // 2}" for i in range(n * 2)],
                     "question_id": ["q1", "q2"] * n, "row_number": [first + i // 2 for i in range(n * 2)],
                     "status": ["not_in_note"] * n * 2})


def report_of(store: OutputStore, part: pa.Table) -> dict:
    shard_id = part["shard_id"][0].as_py()
    return {"shard_id": shard_id, "path": store.stage_part(shard_id, part), "rows": part.num_rows,
            "first_row": min(part["row_number"].to_pylist()), "last_row": max(part["row_number"].to_pylist()),
            "statuses": json.dumps({"not_in_note": part.num_rows})}


def test_a_shard_is_committed_when_its_last_part_arrives(ray_local, tmp_path):
    store = OutputStore(str(tmp_path / "out"), {})
    ledger = ray_local.remote(ShardLedger).options(num_cpus=0).remote({"s1": 8, "s2": 8}, store.uri, "{}")
    first, again = report_of(store, rows("s1", 0, 2)), report_of(store, rows("s1", 0, 2))
    ray_local.get(ledger.report.remote([first, again, report_of(store, rows("s2", 4, 2))]))
    assert ray_local.get(ledger.status.remote())["shards_committed"] == 0
    ray_local.get(ledger.report.remote([report_of(store, rows("s1", 2, 2))]))  # s1 is complete, s2 is not
    deadline = time.monotonic() + 60
    while ray_local.get(ledger.status.remote())["shards_committed"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    committed = pq.read_table(Path(store.answers_dir) / "s1.parquet")
    assert committed["row_number"].to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3], "the duplicate part counted once"
    final = ray_local.get(ledger.finish.remote())
    assert final["incomplete"] == ["s2"] and final["pairs"] == 12 and final["statuses"] == {"not_in_note": 12}
    assert not (Path(store.answers_dir) / "s2.parquet").exists()
    store.remove_staging()
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == ["s1.parquet"]
    assert (tmp_path / "out" / ANSWERS).is_dir()


def test_a_shard_its_actor_committed_counts_without_a_commit_task(ray_local, tmp_path):
    """A batch that held a whole shard wrote answers/<shard>.parquet itself (empty path): the ledger counts it
    committed at once, and the same report again (a retried batch) counts once."""
    from engine.store.commit import stage_parts

    store = OutputStore(str(tmp_path / "out"), {})
    part = rows("s1", 0, 3)
    written = stage_parts(store, part, pa.chunked_array([[0.0] * part.num_rows]), time.perf_counter(), {"s1": 6})
    assert written["path"].to_pylist() == [""] and (Path(store.answers_dir) / "s1.parquet").exists()
    assert not (tmp_path / "out" / "_staging").exists(), "nothing staged for a whole shard"
    ledger = ray_local.remote(ShardLedger).options(num_cpus=0).remote({"s1": 6}, store.uri, "{}")
    report = written.drop_columns(["seconds", "patients"]).to_pylist()
    ray_local.get(ledger.report.remote(report + report))
    final = ray_local.get(ledger.finish.remote())
    assert (final["shards_committed"], final["rows_committed"], final["pairs"], final["incomplete"]) == (1, 6, 6, [])
    assert final["first_part"] is not None
    assert pq.read_table(Path(store.answers_dir) / "s1.parquet")["row_number"].to_pylist() == [0, 0, 1, 1, 2, 2]

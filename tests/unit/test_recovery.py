"""The ledger's count of work done again after a lost worker or node (engine.store.commit.ShardLedger, in process:
actor-committed shards need no Ray), the batch key it counts by, report.json's this_run, and the job fields for
clusters (batching.actor_resources, output.shared). The real losses are in tests/e2e/test_multinode.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pytest
from pydantic import ValidationError

from engine.job import BatchingSpec, InputSpec, OutputSpec
from engine.reporting.report import RECOVERY_KEYS, this_run_summary
from engine.store.commit import ShardLedger, batch_key


def batch(shard_rows: list[tuple[str, int]], questions: int = 2) -> pa.Table:
    """Rows note-major: each (shard, row number) repeated once per question."""
    return pa.table({"shard_id": [s for s, _ in shard_rows for _ in range(questions)],
                     "row_number": [r for _, r in shard_rows for _ in range(questions)]})


def whole_shard(shard_id: str, rows: int) -> dict:
    return {"shard_id": shard_id, "path": "", "rows": rows, "first_row": 0, "last_row": rows // 2 - 1,
            "statuses": json.dumps({"not_in_note": rows})}


def test_a_batch_is_named_by_its_first_and_last_rows():
    one = batch([("s1", 0), ("s1", 1), ("s2", 2)])
    assert batch_key(one) == ("s1", 0, "s2", 2, 6)
    assert batch_key(batch([("s1", 0), ("s1", 1), ("s2", 2)])) == batch_key(one), "the same rows, the same key"
    assert batch_key(batch([("s1", 1), ("s2", 2)])) != batch_key(one)
    assert batch_key(one.slice(0, 0)) == ("", -1, "", -1, 0)


def test_the_ledger_counts_restarts_retried_batches_and_work_by_node():
    ledger = ShardLedger({"s1": 4, "s2": 4}, "/nowhere", "{}")
    ledger.actor_started("worker-1", False)
    ledger.actor_started("worker-2", False)
    first, second = batch_key(batch([("s1", 0), ("s1", 1)])), batch_key(batch([("s2", 2), ("s2", 3)]))
    ledger.begin(first, 4)
    ledger.begin(second, 4)  # worker-2 is lost with this batch in flight ...
    ledger.report([whole_shard("s1", 4)], "worker-1")
    ledger.actor_started("worker-1", True)  # ... its actor is restarted on worker-1, and the batch runs again there
    ledger.begin(second, 4)
    ledger.report([whole_shard("s2", 4)], "worker-1")
    ledger.report([whole_shard("s2", 4)], "worker-1")  # a re-run of a finished batch whose output was lost: counted once
    status = ledger.status()
    assert (status["pairs"], status["shards_committed"], status["rows_committed"]) == (8, 2, 8)
    recovery = status["recovery"]
    assert recovery["model_actor_restarts"] == 1 and recovery["first_restart"] is not None
    assert (recovery["batches_retried"], recovery["pairs_retried"], recovery["commits_retried"]) == (1, 4, 0)
    assert recovery["model_actors_by_node"] == {"worker-1": 2, "worker-2": 1}
    assert recovery["batches_by_node"] == {"worker-1": 3}
    assert recovery["commits_by_node"] == {"worker-1": 2}
    assert recovery["first_retry"] is not None


def test_a_run_without_losses_counts_nothing_again():
    ledger = ShardLedger({"s1": 4}, "/nowhere", "{}")
    ledger.actor_started("127.0.0.1", False)
    ledger.begin(batch_key(batch([("s1", 0), ("s1", 1)])), 4)
    ledger.report([whole_shard("s1", 4)])  # a caller that names no node (older actors, tests) is not counted by node
    recovery = ledger.status()["recovery"]
    assert recovery["model_actor_restarts"] == recovery["batches_retried"] == recovery["commits_retried"] == 0
    assert recovery["first_retry"] is None and recovery["batches_by_node"] == {}


def test_this_run_extends_the_report_keys_without_renaming_them():
    stats = SimpleNamespace(shards_total=2, shards_resumed=0, shards_committed=2, notes_processed=4, pairs_processed=8,
                            nodes=3, recovery={"model_actor_restarts": 1, "batches_retried": 1, "pairs_retried": 4,
                                               "commits_retried": 0, "model_actors_by_node": {"w1": 2, "w2": 1},
                                               "batches_by_node": {"w1": 3}, "commits_by_node": {"w1": 2},
                                               "first_retry": 1796521736.25, "first_restart": None})
    this_run = this_run_summary(stats)
    assert list(this_run)[:5] == ["shards_total", "shards_resumed", "shards_committed", "notes_processed", "pairs_processed"]
    assert this_run["nodes"] == 3 and this_run["model_actors_by_node"] == {"w1": 2, "w2": 1}
    assert set(RECOVERY_KEYS) <= set(this_run)
    assert this_run["first_retry_at"].endswith(".250Z") and this_run["first_actor_restart_at"] is None
    older = this_run_summary(SimpleNamespace(shards_total=1, shards_resumed=1, shards_committed=0, notes_processed=0, pairs_processed=0))
    assert older["nodes"] == 1 and older["batches_retried"] == 0 and older["batches_by_node"] == {}


def test_cluster_fields_of_the_job():
    assert BatchingSpec(actor_resources={"worker_node": 1}).actor_resources == {"worker_node": 1.0}
    with pytest.raises(ValidationError, match="cpus_per_actor"):
        BatchingSpec(actor_resources={"CPU": 1})
    with pytest.raises(ValidationError, match="must be above 0"):
        BatchingSpec(actor_resources={"worker_node": 0})
    assert OutputSpec(uri="/mnt/shared/out").shared is False
    assert OutputSpec(uri="/mnt/shared/out", shared=True).shared is True
    assert InputSpec(uri="/mnt/shared/notes.parquet").shared is False


def test_cluster_fields_keep_the_fingerprint(apixaban_job):
    """Placing the actors or saying the output is shared changes no answer: an output folder keeps resuming."""
    placed = apixaban_job.model_copy(update={
        "batching": apixaban_job.batching.model_copy(update={"actor_resources": {"worker_node": 1}}),
        "output": apixaban_job.output.model_copy(update={"shared": True}),
        "input": apixaban_job.input.model_copy(update={"shared": True})})
    assert placed.fingerprint() == apixaban_job.fingerprint()

"""Commit: a small Ray actor, the ledger, hears of every staged part from the model actors and commits each shard
(a Ray task merges its parts into answers/<shard>.parquet) as soon as all its rows are staged.

The model actors report to it directly, not through Ray Data's output: Ray Data gathers small outputs into
blocks of `target_max_block_size` before handing them on, so with a slow model the driver would hear of a part
only when a whole task ends, and nothing would be committed (or resumable) until then.
"""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from functools import lru_cache

import pyarrow as pa

from engine.store.layout import OutputStore, ShardCollector

COMMITS_IN_FLIGHT = 2  # shards merged at once (each holds one shard's rows in memory)
COMMIT_RETRIES = 2  # a commit task whose worker dies is run again (it is safe to run twice)


@lru_cache(maxsize=4)
def _store(uri: str, storage_options_json: str) -> OutputStore:
    return OutputStore(uri, json.loads(storage_options_json))


def commit_task(uri: str, storage_options_json: str, shard_id: str, paths: list[str]) -> None:
    _store(uri, storage_options_json).commit_staged(shard_id, paths)
    pa.default_memory_pool().release_unused()  # an idle worker would keep the shard's pages otherwise


class ShardLedger:
    """Run as a Ray actor (num_cpus=0). `report` is called by the model actors after staging; the driver polls
    `status` for progress and calls `finish` once the dataset is drained."""

    def __init__(self, expected_rows: dict[str, int], uri: str, storage_options_json: str):
        import ray

        self.collector = ShardCollector(expected_rows)
        self.task = ray.remote(commit_task).options(num_cpus=1, max_retries=COMMIT_RETRIES, retry_exceptions=False)
        self.args = (uri, storage_options_json)
        self.waiting: deque = deque()  # (shard id, paths) complete, not yet committing
        self.running: dict = {}  # object ref -> rows of its shard
        self.pairs, self.statuses = 0, Counter()
        self.shards_committed, self.rows_committed = 0, 0
        self.error: BaseException | None = None
        self.first_part: float | None = None  # when the first batch's answers were staged: the end of start-up

    def report(self, parts: list[dict]) -> None:
        """Parts just written: dicts with shard_id, path (empty: the actor committed the whole shard itself), rows,
        first_row, last_row, statuses (a JSON object)."""
        if self.first_part is None:
            self.first_part = time.time()
        for part in parts:
            key = (part["shard_id"], part["first_row"], part["last_row"], part["rows"])
            if key in self.collector.seen:
                continue  # the same rows staged again by a retried batch
            paths = self.collector.add(part["shard_id"], part["path"], part["rows"], key)
            self.pairs += part["rows"]
            self.statuses.update(json.loads(part["statuses"]))
            if paths == [""]:  # the whole shard was in one batch, and its actor committed it
                self.shards_committed += 1
                self.rows_committed += part["rows"]
            elif paths is not None:
                self.waiting.append((part["shard_id"], paths))
        self._pump(wait=False)

    def status(self) -> dict:
        self._pump(wait=False)
        return {"pairs": self.pairs, "statuses": dict(self.statuses), "shards_committed": self.shards_committed,
                "rows_committed": self.rows_committed, "error": self.error, "first_part": self.first_part}

    def finish(self) -> dict:
        """Wait for every commit; return the final status with the shards still incomplete (a bug if any)."""
        while (self.waiting or self.running) and self.error is None:
            self._pump(wait=True)
        return self.status() | {"incomplete": self.collector.incomplete}

    def _pump(self, wait: bool) -> None:
        import ray

        if self.running:
            done, _ = ray.wait(list(self.running), num_returns=1 if wait else len(self.running), timeout=None if wait else 0)
            for ref in done:
                rows = self.running.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the task's own error (an OutputError says what to do)
                    self.error = self.error or exc.cause
                    continue
                self.shards_committed += 1
                self.rows_committed += rows
        while self.waiting and len(self.running) < COMMITS_IN_FLIGHT and self.error is None:
            shard_id, paths = self.waiting.popleft()
            self.running[self.task.remote(*self.args, shard_id, paths)] = self.collector.expected[shard_id]

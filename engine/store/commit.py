"""Commit: how answers reach answers/ exactly once. The model actor writes each shard's rows of a batch
(stage_parts: committed at once when they are the whole shard, else staged as a part under _staging/); a small Ray
actor, the ledger, hears of every staged part and, with a ShardCollector, commits each shard (a Ray task merges
its parts into answers/<shard>.parquet) as soon as all its rows are staged.

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
import pyarrow.compute as pc

from engine.store.layout import OutputStore

COMMITS_IN_FLIGHT = 2  # shards merged at once (each holds one shard's rows in memory)
COMMIT_RETRIES = 3  # a commit task whose worker or node is lost is run again by the ledger (it is safe to run twice)


@lru_cache(maxsize=4)
def _store(uri: str, storage_options_json: str) -> OutputStore:
    return OutputStore(uri, json.loads(storage_options_json))


def commit_task(uri: str, storage_options_json: str, shard_id: str, paths: list[str], merge: bool = False) -> str:
    """Merge a complete shard's parts into answers/ (into its committed file when `merge`: rows asked again); return
    the node it ran on (for the report)."""
    from engine.runtime import node_label

    _store(uri, storage_options_json).commit_staged(shard_id, paths, merge)
    pa.default_memory_pool().release_unused()  # an idle worker would keep the shard's pages otherwise
    return node_label()


def batch_key(batch: pa.Table) -> tuple:
    """What names a model batch's rows, whichever actor runs it: first and last (shard, row), and the row count
    (rows are note-major in input order, so a batch is one contiguous run of them)."""
    if batch.num_rows == 0:
        return ("", -1, "", -1, 0)
    ends = [batch.slice(i, 1).select(["shard_id", "row_number"]).to_pylist()[0] for i in (0, batch.num_rows - 1)]
    return (ends[0]["shard_id"], ends[0]["row_number"], ends[1]["shard_id"], ends[1]["row_number"], batch.num_rows)


class ShardLedger:
    """Run as a Ray actor (num_cpus=0), on the driver's node: it holds what only the driver needs, so losing a worker
    node never loses it. The model actors call `actor_started` once up, `begin` before a batch and `report` after
    staging it; the driver polls `status` for progress and calls `finish` once the dataset is drained.

    It also counts the work a lost worker or node made the run do again: actor restarts (Ray restarts a model actor
    whose node is lost, elsewhere), batches begun a second time (Ray retries the batch an actor had in flight, and
    re-runs a finished batch whose output was lost with its node) and commit tasks run again (here, by the ledger).

    `redo_shards`: committed shards whose rows this run asks again (engine.store.redo); their parts are merged into the
    committed file."""

    def __init__(self, expected_rows: dict[str, int], uri: str, storage_options_json: str, redo_shards: tuple = ()):
        import ray

        self.collector = ShardCollector(expected_rows)
        self.redo = set(redo_shards)
        self.task = ray.remote(commit_task).options(num_cpus=1, max_retries=0)  # lost workers: retried in _pump
        self.args = (uri, storage_options_json)
        self.waiting: deque = deque()  # (shard id, paths, attempt) complete, not yet committing
        self.running: dict = {}  # object ref -> (shard id, paths, attempt)
        self.pairs, self.statuses = 0, Counter()
        self.shards_committed, self.rows_committed = 0, 0
        self.error: BaseException | None = None
        self.first_part: float | None = None  # when the first batch's answers were staged: the end of start-up
        self.begun: set = set()  # batch keys begun
        self.batches_retried = self.pairs_retried = self.commits_retried = self.actor_restarts = 0
        self.actors_by_node, self.batches_by_node, self.commits_by_node = Counter(), Counter(), Counter()
        self.first_retry: float | None = None  # when work was first begun again (a lost node noticed)
        self.first_restart: float | None = None  # when a restarted model actor was first up again

    def actor_started(self, node: str, restarted: bool) -> None:
        """A model actor is up on `node`; `restarted`: Ray restarted it after its process or node was lost."""
        self.actors_by_node[node] += 1
        self.actor_restarts += int(restarted)
        if restarted:
            self.first_restart = self.first_restart or time.time()

    def begin(self, key: tuple, rows: int) -> None:
        """A model actor starts a batch (batch_key). A key seen before is a batch run again."""
        if key in self.begun:
            self.batches_retried += 1
            self.pairs_retried += rows
            self.first_retry = self.first_retry or time.time()
        self.begun.add(key)

    def report(self, parts: list[dict], node: str | None = None) -> None:
        """Parts just written by a model actor on `node`: dicts with shard_id, path (empty: the actor committed the
        whole shard itself), rows, first_row, last_row, statuses (a JSON object)."""
        if self.first_part is None:
            self.first_part = time.time()
        if node is not None:
            self.batches_by_node[node] += 1
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
                if node is not None:
                    self.commits_by_node[node] += 1
            elif paths is not None:
                self.waiting.append((part["shard_id"], paths, 0))
        self._pump(wait=False)

    def status(self) -> dict:
        self._pump(wait=False)
        return {"pairs": self.pairs, "statuses": dict(self.statuses), "shards_committed": self.shards_committed,
                "rows_committed": self.rows_committed, "error": self.error, "first_part": self.first_part,
                "recovery": self.recovery()}

    def recovery(self) -> dict:
        """The restarted work, for report.json's this_run."""
        return {"model_actor_restarts": self.actor_restarts, "batches_retried": self.batches_retried,
                "pairs_retried": self.pairs_retried, "commits_retried": self.commits_retried,
                "model_actors_by_node": dict(sorted(self.actors_by_node.items())),
                "batches_by_node": dict(sorted(self.batches_by_node.items())),
                "commits_by_node": dict(sorted(self.commits_by_node.items())), "first_retry": self.first_retry,
                "first_restart": self.first_restart}

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
                shard_id, paths, attempt = self.running.pop(ref)
                try:
                    node = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the task's own error (an OutputError says what to do)
                    self.error = self.error or exc.cause
                    continue
                except ray.exceptions.RayError as exc:  # its worker or node was lost: run it again, elsewhere
                    if attempt >= COMMIT_RETRIES:
                        self.error = self.error or exc
                    else:
                        self.commits_retried += 1
                        self.first_retry = self.first_retry or time.time()
                        self.waiting.appendleft((shard_id, paths, attempt + 1))
                    continue
                self.shards_committed += 1
                self.rows_committed += self.collector.expected[shard_id]
                self.commits_by_node[node] += 1
        while self.waiting and len(self.running) < COMMITS_IN_FLIGHT and self.error is None:
            shard_id, paths, attempt = self.waiting.popleft()
            self.running[self.task.remote(*self.args, shard_id, paths, shard_id in self.redo)] = (shard_id, paths, attempt)


PART_SCHEMA = pa.schema([("shard_id", pa.string()), ("path", pa.string()), ("rows", pa.int64()), ("first_row", pa.int64()),
                         ("last_row", pa.int64()), ("seconds", pa.float64()), ("patients", pa.list_(pa.string())),
                         ("statuses", pa.string())])


def stage_parts(store: OutputStore, answers: pa.Table, cue_seconds: pa.ChunkedArray, started: float,
                expected: dict[str, int] | None = None, redo_shards: frozenset = frozenset()) -> pa.Table:
    """Write each shard's rows of a batch: committed at once when they are the whole shard (`expected` rows), else
    staged as a part; one PART_SCHEMA row per shard (`path` empty for a committed one). A part's busy seconds are
    its rows' share of the actor's time on the batch (start to written) plus its rows' cue-search time. The rows of
    a shard in `redo_shards` (asked again, engine.store.redo) replace their rows in its committed file."""
    shard_ids = answers["shard_id"]
    parts = []
    shards = pc.unique(shard_ids).to_pylist()
    for shard_id in shards:
        if len(shards) == 1:  # the usual batch: one shard's rows, no copy
            part, cues = answers, cue_seconds
        else:
            mask = pc.equal(shard_ids, shard_id)
            part, cues = answers.filter(mask), cue_seconds.filter(mask)
        if expected is not None and part.num_rows == expected.get(shard_id):
            if shard_id in redo_shards:
                store.merge_into_shard(shard_id, part)  # atomic; a retried batch puts the same rows in again
            else:
                store.commit_shard(shard_id, part)  # atomic; a retried batch writes the same rows again
            path = ""
        else:
            path = store.stage_part(shard_id, part)
        parts.append((shard_id, path, part, float(pc.sum(cues).as_py() or 0.0)))
    share = (time.perf_counter() - started) / max(answers.num_rows, 1)
    return pa.Table.from_pylist([
        {"shard_id": shard_id, "path": path, "rows": part.num_rows, "seconds": cues + share * part.num_rows,
         **dict(zip(("first_row", "last_row"), (v.as_py() for v in pc.min_max(part["row_number"]).values()))),
         "patients": pc.unique(part["patient_id"]).to_pylist(),
         "statuses": json.dumps({r["values"]: r["counts"] for r in pc.value_counts(part["status"]).to_pylist()})}
        for shard_id, path, part, cues in parts], schema=PART_SCHEMA)


class ShardCollector:
    """Counts a shard's staged parts as they are reported (in any order, a part reported twice by a retried task
    counted once); hands back each shard's part paths once all its rows are staged."""

    def __init__(self, expected_rows: dict[str, int]):
        self.expected = dict(expected_rows)
        self.parts: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}
        self.seen: set = set()

    def add(self, shard_id: str, path: str, rows: int, key=None) -> list[str] | None:
        """Record one part; return the shard's paths when it is complete. `key` names the part's rows (a retried
        batch stages the same rows again under another path): a key already seen is ignored."""
        if shard_id not in self.expected:
            raise RuntimeError(f"a part of shard {shard_id}, which this run does not process: a pipeline bug")
        if key is not None:
            if key in self.seen:
                return None
            self.seen.add(key)
        self.parts.setdefault(shard_id, []).append(path)
        self.counts[shard_id] = self.counts.get(shard_id, 0) + rows
        if self.counts[shard_id] > self.expected[shard_id]:
            raise RuntimeError(f"shard {shard_id} produced more rows than expected: a pipeline bug")
        if self.counts[shard_id] == self.expected[shard_id]:
            return self.parts.pop(shard_id)
        return None

    @property
    def incomplete(self) -> list[str]:
        """Shards with some but not all rows staged, and shards with none."""
        return sorted(self.parts) + sorted(set(self.expected) - set(self.counts))

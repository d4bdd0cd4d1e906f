"""Asking again the rows whose model server was unavailable (backend openai), and only those.

A request that failed after the client's retries is an error row whose reason starts with SERVER_UNAVAILABLE; its
shard is committed like any other, so a stopped server never stops the run. A re-run of the same job finds those
rows in answers/ (rows_to_redo), sends only their (note, question) pairs through the pipeline (keep_redo_pairs),
and writes each redone shard again with the new rows in place of the old ones (engine.store.layout.replace_rows),
atomically, in the shard's row order. A re-run stopped half way leaves the shard as it was: its rows are asked again the next time.
"""

from __future__ import annotations

import pyarrow as pa

from engine.backends.base import SERVER_UNAVAILABLE
from engine.store.answers import connect

_REDO_SQL = """
SELECT shard_id, row_number, question_id FROM answers
WHERE status = 'error' AND starts_with(error, $prefix)
ORDER BY shard_id, row_number, question_id"""


def rows_to_redo(answers) -> dict[str, list[tuple[int, str]]]:
    """{shard id: [(row_number, question_id), ...]} of the committed rows whose model server was unavailable.
    `answers` is the committed answers (a pyarrow dataset or table); one scan of three columns where `error` is set."""
    redo: dict[str, list[tuple[int, str]]] = {}
    for shard_id, row_number, question_id in connect(answers).execute(_REDO_SQL, {"prefix": SERVER_UNAVAILABLE}).fetchall():
        redo.setdefault(shard_id, []).append((int(row_number), question_id))
    return redo


def keep_redo_pairs(rows: pa.Table, redo: dict[str, set[tuple[int, str]]]) -> pa.Table:
    """Expanded (note, question) rows: of a redone shard only the pairs it asks again; other shards' rows all stay."""
    if not redo or rows.num_rows == 0:
        return rows
    shards, numbers, questions = (rows[name].to_pylist() for name in ("shard_id", "row_number", "question_id"))
    keep = [shard not in redo or (number, question) in redo[shard] for shard, number, question in zip(shards, numbers, questions)]
    return rows.filter(pa.array(keep, pa.bool_()))

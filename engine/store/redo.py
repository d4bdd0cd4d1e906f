"""Asking again the rows whose model server was unavailable (backend openai), and only those.

A request that failed after the client's retries is an error row whose reason starts with SERVER_UNAVAILABLE; its
shard is committed like any other, so a stopped server never stops the run. A re-run of the same job finds those
rows in answers/ (rows_to_redo), sends only their (note, question) pairs through the pipeline (keep_redo_pairs),
and writes each redone shard again with the new rows in place of the old ones (replace_rows), atomically, in the
shard's row order. A re-run stopped half way leaves the shard as it was: its rows are asked again the next time.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.backends.base import SERVER_UNAVAILABLE

_KEY_SEPARATOR = "\x1f"

_REDO_SQL = """
SELECT shard_id, row_number, question_id FROM answers
WHERE status = 'error' AND starts_with(error, $prefix)
ORDER BY shard_id, row_number, question_id"""


def rows_to_redo(answers) -> dict[str, list[tuple[int, str]]]:
    """{shard id: [(row_number, question_id), ...]} of the committed rows whose model server was unavailable.
    `answers` is the committed answers (a pyarrow dataset or table); one scan of three columns where `error` is set."""
    from engine.store.answers import connect

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


def _keys(table: pa.Table) -> pa.Array:
    joined = pc.binary_join_element_wise(pc.cast(table["row_number"], pa.string()), table["question_id"], _KEY_SEPARATOR)
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def replace_rows(committed: pa.Table, redone: pa.Table) -> pa.Table:
    """The committed shard with each redone (row_number, question_id) row in place of its old row, order kept."""
    positions = pc.index_in(_keys(redone), value_set=_keys(committed))
    if positions.null_count:
        raise RuntimeError("a redone answer row that its committed shard does not hold: a pipeline bug")
    order = np.arange(committed.num_rows)
    order[positions.to_numpy()] = committed.num_rows + np.arange(redone.num_rows)
    both = pa.concat_tables([committed, redone], promote_options="permissive")
    return both.take(pa.array(order))

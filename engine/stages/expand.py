"""Expand: one row per (note, question), note-major so a note's questions reach the engine together.

The note text is carried once per note (dictionary-encoded), not copied per question.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def expand_questions(notes: pa.Table, question_ids: list[str]) -> pa.Table:
    n_notes, n_questions = notes.num_rows, len(question_ids)
    note_index = np.repeat(np.arange(n_notes, dtype=np.int32), n_questions)
    question_index = np.tile(np.arange(n_questions, dtype=np.int32), n_notes)
    columns = {}
    for name in notes.column_names:
        column = notes[name].combine_chunks()
        if name == "text":
            columns[name] = pa.DictionaryArray.from_arrays(pa.array(note_index), column)
        else:
            columns[name] = column.take(pa.array(note_index))
    columns["question_id"] = pa.DictionaryArray.from_arrays(pa.array(question_index), pa.array(question_ids, pa.string()))
    return pa.table(columns)

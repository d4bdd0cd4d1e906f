"""Expand: one row per (note, question), note-major so a note's questions reach the engine together.

Note-level values are carried once per note, not copied per question: the text and every string column are
dictionary-encoded over the notes (a row holds a 4-byte index), numbers are repeated. The text dictionary is a
copy of just these notes, so a batch never drags a larger block's texts through the object store.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def expand_questions(notes: pa.Table, question_ids: list[str]) -> pa.Table:
    n_notes, n_questions = notes.num_rows, len(question_ids)
    note_index = pa.array(np.repeat(np.arange(n_notes, dtype=np.int32), n_questions))
    question_index = np.tile(np.arange(n_questions, dtype=np.int32), n_notes)
    columns = {}
    for name in notes.column_names:
        column = notes[name].combine_chunks()
        if name == "text":
            columns[name] = pa.DictionaryArray.from_arrays(note_index, pa.concat_arrays([column]))
        elif pa.types.is_string(column.type):
            encoded = column.dictionary_encode()
            columns[name] = pa.DictionaryArray.from_arrays(encoded.indices.take(note_index), encoded.dictionary)
        else:
            columns[name] = column.take(note_index)
    columns["question_id"] = pa.DictionaryArray.from_arrays(pa.array(question_index), pa.array(question_ids, pa.string()))
    return pa.table(columns)

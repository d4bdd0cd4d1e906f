"""engine.stages.expand: notes x questions, note-major, the text carried once per note (dictionary-encoded)."""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from engine.stages.expand import expand_questions

QUESTIONS = ["atrial_fibrillation", "creatinine_max", "lvef_min"]


def notes(n: int = 4, chunks: int = 1) -> pa.Table:
    rows = {
        "shard_id": [f"s{i // 2}" for i in range(n)],
        "row_number": list(range(100, 100 + n)),
        "note_id": [f"n{i}" for i in range(n)],
        "patient_id": [f"p{i % 2}" for i in range(n)],
        "charttime": [datetime(2150, 1, 1 + i) if i != 1 else None for i in range(n)],
        "text": [f"note {i} " + "x" * (1000 + i) for i in range(n)],
        "note_error": [None if i != 2 else "note text is empty or whitespace only" for i in range(n)],
        "age": [70 + i for i in range(n)],
    }
    table = pa.table(rows)
    if chunks > 1:
        size = max(n // chunks, 1)
        table = pa.concat_tables([table.slice(i, size) for i in range(0, n, size)])
    return table


def test_rows_are_notes_times_questions_in_note_major_order():
    source = notes()
    out = expand_questions(source, QUESTIONS)
    assert out.num_rows == source.num_rows * len(QUESTIONS)
    assert out["note_id"].to_pylist() == [f"n{i}" for i in range(4) for _ in QUESTIONS]
    assert out["question_id"].to_pylist() == QUESTIONS * 4


def test_text_is_dictionary_encoded_once_per_note():
    source = notes()
    out = expand_questions(source, QUESTIONS)
    text = out["text"].combine_chunks()
    assert pa.types.is_dictionary(text.type)
    assert text.dictionary.to_pylist() == source["text"].to_pylist()  # one entry per note, not per question
    assert text.indices.to_pylist() == [i for i in range(4) for _ in QUESTIONS]
    assert text.to_pylist() == [t for t in source["text"].to_pylist() for _ in QUESTIONS]
    # the buffers hold each note's text once: far less than the decoded, copied-per-question column
    decoded = text.cast(pa.string())
    assert text.nbytes < decoded.nbytes / 2


def test_question_id_is_dictionary_encoded_strings():
    out = expand_questions(notes(), QUESTIONS)
    question = out["question_id"].combine_chunks()
    assert pa.types.is_dictionary(question.type) and question.type.value_type == pa.string()
    assert question.dictionary.to_pylist() == QUESTIONS


def test_other_columns_are_repeated_per_question_with_their_types():
    source = notes()
    out = expand_questions(source, QUESTIONS)
    assert out.column_names == [*source.column_names, "question_id"]
    for name in source.column_names:
        if name == "text":
            continue
        field = source.schema.field(name)
        if pa.types.is_string(field.type):  # once per distinct value, a 4-byte index per row
            column = out[name].combine_chunks()
            assert column.type == pa.dictionary(pa.int32(), pa.string()), name
            assert len(column.dictionary) == len(set(v for v in source[name].to_pylist() if v is not None)), name
        else:
            assert out.schema.field(name).type == field.type, name
        assert out[name].to_pylist() == [v for v in source[name].to_pylist() for _ in QUESTIONS], name
    # nulls stay null, in the right rows
    assert out["charttime"].to_pylist()[3:6] == [None, None, None]
    assert out["note_error"].to_pylist()[6:9] == ["note text is empty or whitespace only"] * 3
    assert pc.sum(out["age"]).as_py() == sum(range(70, 74)) * len(QUESTIONS)


def test_chunked_input_gives_the_same_rows():
    single, chunked = notes(6), notes(6, chunks=3)
    assert chunked["text"].num_chunks == 3
    a, b = expand_questions(single, QUESTIONS), expand_questions(chunked, QUESTIONS)
    assert a.to_pylist() == b.to_pylist()
    assert b["text"].combine_chunks().dictionary.to_pylist() == single["text"].to_pylist()


def test_one_question_and_no_notes():
    one = expand_questions(notes(3), ["diabetes"])
    assert one["note_id"].to_pylist() == ["n0", "n1", "n2"] and one["question_id"].to_pylist() == ["diabetes"] * 3
    empty = expand_questions(notes(4).slice(0, 0), QUESTIONS)
    assert empty.num_rows == 0 and "question_id" in empty.column_names


def test_a_slice_carries_only_its_own_notes_text():
    """Each model batch is a slice of a row group: its text dictionary must not be the whole group's."""
    group = notes(20)
    out = expand_questions(group.slice(10, 5), QUESTIONS)
    text = out["text"].combine_chunks()
    assert text.dictionary.to_pylist() == group["text"].to_pylist()[10:15]
    assert text.dictionary.offset == 0 and text.dictionary.buffers()[2].size == sum(len(t) for t in group["text"].to_pylist()[10:15])
    assert out["patient_id"].combine_chunks().dictionary.to_pylist() == ["p0", "p1"]

"""engine.stages.read: shards planned from Parquet row groups, stable ids, limit; rows normalised, never dropped."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.errors import InputError
from engine.job import InputSpec
from engine.stages.read import NOTE_COLUMNS, Shard, iter_notes, normalise_notes, plan_input, read_shards, shard_to_dict

# three files of 10, 7 and 5 rows, written in row groups of 4 rows
FILE_ROWS = {"a.parquet": 10, "b.parquet": 7, "c.parquet": 5}
ROW_GROUP = 4


def note_rows(prefix: str, n: int, first_patient: int = 10000000) -> pa.Table:
    return pa.table({
        "note_id": [f"{prefix}-{i}" for i in range(n)],
        "subject_id": pa.array([first_patient + i for i in range(n)], pa.int64()),
        "text": [f"Note {prefix}-{i}: Hx of atrial fibrillation." for i in range(n)],
        "charttime": pa.array([datetime(2150, 1, 1 + i % 28, 8) for i in range(n)], pa.timestamp("ms")),
        "sex": ["F" if i % 2 else "M" for i in range(n)],
        "age": pa.array([60 + i for i in range(n)], pa.int32()),
    })


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    for name, rows in FILE_ROWS.items():
        target = root / ("sub" if name == "c.parquet" else "") / name
        pq.write_table(note_rows(name[0], rows), target, row_group_size=ROW_GROUP)
    (root / "README.txt").write_text("not a parquet file; ignored in a folder")
    return root


def spec_for(uri, **overrides) -> InputSpec:
    return InputSpec(uri=str(uri), structured=["sex", "age"], **overrides)


def all_notes(spec: InputSpec, plan) -> pa.Table:
    groups: dict[tuple, list[Shard]] = {}
    for shard in plan.shards:
        groups.setdefault((shard.path, shard.row_group), []).append(shard)
    return pa.concat_tables([read_shards(spec, shards, plan.schema) for shards in groups.values()])


# --- planning --------------------------------------------------------------------------------------------

def test_shards_cut_row_groups_into_notes_per_shard(folder):
    plan = plan_input(spec_for(folder), notes_per_shard=3, limit=None)
    assert plan.num_notes == sum(FILE_ROWS.values())
    assert [Path(p).name for p, _ in plan.files] == ["a.parquet", "b.parquet", "c.parquet"]
    assert all(size > 0 for _, size in plan.files)
    assert all(1 <= s.num_rows <= 3 for s in plan.shards)
    # a shard never crosses a row group: file a (10 rows, groups 4/4/2) -> 3+1, 3+1, 2
    a = [s for s in plan.shards if s.path.endswith("a.parquet")]
    assert [(s.row_group, s.start, s.stop, s.file_row) for s in a] == [
        (0, 0, 3, 0), (0, 3, 4, 3), (1, 0, 3, 4), (1, 3, 4, 7), (2, 0, 2, 8)]
    assert len({s.shard_id for s in plan.shards}) == len(plan.shards)
    assert set(plan.schema.names) >= {"note_id", "subject_id", "text", "charttime", "sex", "age"}


def test_shard_ids_are_stable_across_calls(folder):
    first = plan_input(spec_for(folder), 3, None)
    second = plan_input(spec_for(folder), 3, None)
    assert [s.shard_id for s in first.shards] == [s.shard_id for s in second.shards]
    assert first.shards == second.shards
    limited = plan_input(spec_for(folder), 3, 5)
    assert [s.shard_id for s in limited.shards][:1] == [first.shards[0].shard_id]
    assert shard_to_dict(first.shards[0])["shard_id"] == first.shards[0].shard_id


@pytest.mark.parametrize("limit", [1, 3, 4, 5, 11, 17, 22, 1000])
def test_limit_is_honoured_exactly(folder, limit):
    plan = plan_input(spec_for(folder), 3, limit)
    assert plan.num_notes == min(limit, sum(FILE_ROWS.values()))
    assert all(s.num_rows > 0 for s in plan.shards)
    notes = all_notes(spec_for(folder), plan)
    assert notes.num_rows == plan.num_notes
    everything = all_notes(spec_for(folder), plan_input(spec_for(folder), 3, None))
    assert notes["note_id"].to_pylist() == everything["note_id"].to_pylist()[:plan.num_notes]  # the first N notes


@pytest.mark.parametrize("limit", [None, 1, 3, 4, 5, 10, 11, 17, 21, 22, 1000])
def test_the_input_is_counted_past_the_limit(folder, limit):
    """A run says how much of the input its limit leaves out: notes_in_input counts every row (with count_all),
    the files past the limit from their footers, without planning them."""
    total = sum(FILE_ROWS.values())
    plan = plan_input(spec_for(folder), 3, limit, count_all=True)
    assert plan.notes_in_input == total
    assert plan.num_notes == min(limit or total, total)
    uncounted = plan_input(spec_for(folder), 3, limit)
    assert uncounted.shards == plan.shards and uncounted.files == plan.files  # counting plans nothing more
    assert uncounted.notes_in_input == (total if plan.num_notes == total else None)


def test_an_unreadable_file_past_the_limit_leaves_the_count_unknown(folder):
    (folder / "z.parquet").write_text("not parquet")
    assert plan_input(spec_for(folder), 3, 5, count_all=True).notes_in_input is None
    with pytest.raises(InputError, match="z.parquet"):
        plan_input(spec_for(folder), 3, None)


def test_a_single_file_uri(folder):
    plan = plan_input(spec_for(folder / "b.parquet"), 100, None)
    assert plan.num_notes == 7 and [s.num_rows for s in plan.shards] == [4, 3]


def test_missing_column_lists_the_columns_present(folder):
    with pytest.raises(InputError) as caught:
        plan_input(spec_for(folder, text="note_text"), 3, None)
    message = str(caught.value)
    assert "note_text" in message and "a.parquet" in message
    assert "columns present: note_id, subject_id, text, charttime, sex, age" in message


def test_missing_structured_column_is_named(folder):
    with pytest.raises(InputError, match="missing column.*weight"):
        plan_input(InputSpec(uri=str(folder), structured=["weight"]), 3, None)


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(InputError) as caught:
        plan_input(spec_for(missing), 3, None)
    assert str(missing) in str(caught.value) and "not found" in str(caught.value)


def test_non_parquet_file_names_the_path(tmp_path):
    fake = tmp_path / "notes.csv"
    fake.write_text("note_id,subject_id,text\n1,2,hello\n")
    with pytest.raises(InputError) as caught:
        plan_input(spec_for(fake), 3, None)
    assert str(fake) in str(caught.value) and "Parquet" in str(caught.value)


def test_corrupt_parquet_in_a_folder_names_the_file(folder):
    (folder / "d.parquet").write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(InputError) as caught:
        plan_input(spec_for(folder), 3, None)
    assert str(folder / "d.parquet") in str(caught.value)


def test_folder_without_parquet_files(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="no .parquet files"):
        plan_input(spec_for(tmp_path), 3, None)


# --- reading and normalising -----------------------------------------------------------------------------

def test_read_shards_reads_every_row_with_engine_columns(folder):
    spec = spec_for(folder)
    plan = plan_input(spec, 3, None)
    notes = all_notes(spec, plan)
    assert notes.column_names == [*NOTE_COLUMNS, "sex", "age"]
    assert notes.num_rows == 22
    assert notes.schema.field("patient_id").type == pa.string()
    assert notes.schema.field("charttime").type == pa.timestamp("us")
    assert notes.schema.field("age").type == pa.int32()
    assert notes["patient_id"].to_pylist()[:2] == ["10000000", "10000001"]  # integer ids become strings
    assert notes["note_error"].null_count == 22
    a = notes.filter(pa.compute.starts_with(notes["note_id"], "a-"))
    assert a["row_number"].to_pylist() == list(range(10))  # row number inside its file
    shard_sizes = {}
    for shard_id in notes["shard_id"].to_pylist():
        shard_sizes[shard_id] = shard_sizes.get(shard_id, 0) + 1
    assert shard_sizes == {s.shard_id: s.num_rows for s in plan.shards}


@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_iter_notes_streams_the_same_rows_in_slices(tmp_path, step):
    """Decoded `step` notes at a time, shards skipped by a resume left out, duplicates still marked."""
    rows = note_rows("a", 23)
    rows = rows.set_column(0, "note_id", pa.array([f"a-{i % 20}" for i in range(23)]))  # rows 20-22 repeat ids
    pq.write_table(rows, tmp_path / "a.parquet", row_group_size=12)
    spec = spec_for(tmp_path / "a.parquet")
    plan = plan_input(spec, 5, None)
    for group in sorted({s.row_group for s in plan.shards}):
        shards = [s for s in plan.shards if s.row_group == group]
        shards = shards[:1] + shards[2:]  # the second shard of each group was committed before
        expected = read_shards(spec, shards, plan.schema)
        pieces = list(iter_notes(spec, shards, plan.schema, step))
        assert all(p.num_rows <= step for p in pieces)
        assert pa.concat_tables(pieces).equals(expected)
    last = list(iter_notes(spec, [plan.shards[-1]], plan.schema, step))
    assert pa.concat_tables(last)["note_error"].to_pylist()[-1].startswith("duplicate note id 'a-2'")


def problem_table() -> pa.Table:
    return pa.table({
        "note_id": pa.array(["n0", "n1", "n2", "n3", None, "n5", "n6"], pa.string()),
        "subject_id": pa.array([1, 2, 3, 4, 5, None, 7], pa.int64()),
        "text": pa.array([b"Hx of AF", b"", b"  \r\n\t ", None, b"text", b"ok", b"Cr 1.2 \xb5mol \xff\xfe end"], pa.binary()),
        "charttime": pa.array(["2150-01-01 08:00:00", "2150-01-02T09:30:00", None, "2150-01-04 10:00:00",
                               "2150-01-05 00:00:00", "2150-01-06 12:00:00", "2150-01-07 23:59:59"], pa.string()),
    })


def test_problems_are_marked_and_no_row_is_dropped(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(problem_table(), path)
    spec = InputSpec(uri=str(path))
    plan = plan_input(spec, 100, None)
    notes = read_shards(spec, plan.shards, plan.schema)
    assert notes.num_rows == 7
    errors = notes["note_error"].to_pylist()
    assert errors[0] is None
    assert errors[1] == "note text is empty or whitespace only"
    assert errors[2] == "note text is empty or whitespace only"
    assert errors[3] == "text column 'text' is null"
    assert errors[4] == "note id column 'note_id' is empty"
    assert errors[5] == "patient id column 'subject_id' is empty"
    assert errors[6] == "text column 'text' is not valid UTF-8 (invalid bytes replaced)"
    texts = notes["text"].to_pylist()
    assert texts[0] == "Hx of AF" and texts[3] == ""  # null text becomes "" (marked above)
    assert texts[6].startswith("Cr 1.2 ") and texts[6].endswith(" end") and "\ufffd" in texts[6]
    assert notes["note_id"].to_pylist()[4] == "" and notes["patient_id"].to_pylist()[5] == ""
    assert notes["patient_id"].to_pylist()[:2] == ["1", "2"]
    assert notes.schema.field("text").type == pa.string()


def test_string_charttime_is_cast_to_timestamp():
    table = problem_table()
    notes = normalise_notes(table, InputSpec(uri="x"), Shard("s0", "x", 0, 0, 7, 0), table.schema)
    assert notes.schema.field("charttime").type == pa.timestamp("us")
    assert notes["charttime"].to_pylist()[:3] == [datetime(2150, 1, 1, 8), datetime(2150, 1, 2, 9, 30), None]


def test_float_ids_read_with_nulls_are_written_without_decimals():
    table = pa.table({"note_id": pa.array([1.0, 2.0], pa.float64()), "subject_id": pa.array([10000032.0, None]),
                      "text": ["a", "b"]})
    notes = normalise_notes(table, InputSpec(uri="x", charttime=None), Shard("s0", "x", 0, 0, 2, 5), table.schema)
    assert notes["note_id"].to_pylist() == ["1", "2"]
    assert notes["patient_id"].to_pylist() == ["10000032", ""]
    assert notes["row_number"].to_pylist() == [5, 6]
    assert notes["charttime"].null_count == 2 and notes.schema.field("charttime").type == pa.timestamp("us")


def test_nbsp_only_text_counts_as_whitespace():
    table = pa.table({"note_id": ["a"], "subject_id": ["p"], "text": ["\u00a0\u2003\r\n"]})
    notes = normalise_notes(table, InputSpec(uri="x", charttime=None), Shard("s0", "x", 0, 0, 1, 0), table.schema)
    assert notes["note_error"].to_pylist() == ["note text is empty or whitespace only"]


def test_one_bad_charttime_does_not_erase_the_others():
    table = pa.table({"note_id": ["a", "b", "c"], "subject_id": ["1", "2", "3"], "text": ["x", "y", "z"],
                      "charttime": ["2150-01-01 08:00:00", "unknown", "2150-01-03 10:00:00"]})
    notes = normalise_notes(table, InputSpec(uri="x"), Shard("s0", "x", 0, 0, 3, 0), table.schema)
    assert notes.num_rows == 3
    assert notes["charttime"].to_pylist() == [datetime(2150, 1, 1, 8), None, datetime(2150, 1, 3, 10)]


def test_charttime_strings_with_a_utc_offset_are_kept():
    table = pa.table({"note_id": ["a", "b"], "subject_id": ["1", "2"], "text": ["x", "y"],
                      "charttime": ["2150-01-01T08:00:00Z", "2150-01-02T10:00:00+01:00"]})
    notes = normalise_notes(table, InputSpec(uri="x"), Shard("s0", "x", 0, 0, 2, 0), table.schema)
    assert notes["charttime"].to_pylist() == [datetime(2150, 1, 1, 8), datetime(2150, 1, 2, 9)]


def test_duplicate_note_ids_are_answered_once_at_their_first_row(tmp_path):
    """Across files and row groups: the first row (file order) keeps the id, later rows name it."""
    (tmp_path / "in").mkdir()
    first = note_rows("n", 4)
    second = note_rows("m", 3).set_column(0, "note_id", pa.array(["m-0", "n-2", "n-2"]))
    pq.write_table(first, tmp_path / "in" / "a.parquet", row_group_size=2)
    pq.write_table(second, tmp_path / "in" / "b.parquet")
    spec = spec_for(str(tmp_path / "in"))
    plan = plan_input(spec, notes_per_shard=2, limit=None)
    notes = all_notes(spec, plan).to_pylist()
    assert len(notes) == 7, "no row is dropped"
    marked = [n for n in notes if n["note_error"] and "duplicate note id" in n["note_error"]]
    assert [(n["note_id"], n["row_number"]) for n in marked] == [("n-2", 1), ("n-2", 2)]
    assert all("row 2 of a.parquet" in n["note_error"] for n in marked)
    kept = [n for n in notes if n["note_id"] == "n-2" and n["shard_id"].startswith("f00000")]
    assert len(kept) == 1 and kept[0]["note_error"] is None

"""engine.store.layout: manifest, atomic shard commits, resume, refusal of another job's folder, shard collection."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.errors import OutputError
from engine.job import JobSpec, load_job
from engine.store.commit import ShardCollector
from engine.store.answers import read_answers
from engine.store.layout import ANSWER_COLUMNS, ANSWERS, MANIFEST, OutputStore, answer_schema, to_answer_table
from engine.stages.read import plan_input

JOB = load_job(Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml")


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"note_id": ["a", "b", "c"], "subject_id": [1, 2, 3], "text": ["x", "y", "z"],
                             "charttime": pa.array([None, None, None], pa.timestamp("us")),
                             "sex": ["F", "M", "F"], "age": [80, 70, 60]}), path)
    return plan_input(JOB.input.model_copy(update={"uri": str(path)}), 2, None)


@pytest.fixture
def store(tmp_path) -> OutputStore:
    return OutputStore(str(tmp_path / "out"), {})


def answers(shard_id: str, notes: list[str], questions=("atrial_fibrillation", "creatinine_max"), first_row: int = 0) -> pa.Table:
    rows = [{"shard_id": shard_id, "note_id": n, "patient_id": f"p-{n}", "question_id": q, "row_number": first_row + i,
             "status": "not_in_note"} for i, n in enumerate(notes) for q in reversed(questions)]
    return pa.Table.from_pylist(rows)


def files_under(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob("*") if p.is_file())


def test_prepare_creates_the_manifest(store, inputs, tmp_path):
    committed = store.prepare(JOB, inputs, limit=None, overwrite=False)
    assert committed == set()
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["job_name"] == JOB.name and manifest["job_fingerprint"] == JOB.fingerprint()
    assert manifest["questions"] == [q.id for q in JOB.questions]
    assert manifest["notes_per_shard"] == JOB.batching.notes_per_shard
    assert manifest["input_files"] == [[path, size] for path, size in inputs.files]
    assert (tmp_path / "out" / ANSWERS).is_dir()


def test_commit_is_atomic_sorted_and_listed(store, inputs, tmp_path):
    store.prepare(JOB, inputs, None, False)
    table = answers("s1", ["b", "a"], first_row=0)
    store.commit_shard("s1", table)
    assert files_under(tmp_path / "out") == [MANIFEST, "s1.parquet"]  # no .tmp- file left behind
    assert store.committed_shards() == {"s1"}
    written = pq.read_table(tmp_path / "out" / ANSWERS / "s1.parquet")
    assert written.num_rows == 4
    assert written["row_number"].to_pylist() == [0, 0, 1, 1]
    assert written["note_id"].to_pylist() == ["b", "b", "a", "a"]
    assert written["question_id"].to_pylist() == ["creatinine_max", "atrial_fibrillation"] * 2  # as they came: a stable sort


def test_prepare_again_resumes_with_the_committed_shards(store, inputs, tmp_path):
    store.prepare(JOB, inputs, None, False)
    store.commit_shard("s1", answers("s1", ["a"]))
    store.commit_shard("s2", answers("s2", ["b"]))
    (tmp_path / "out" / ANSWERS / ".tmp-deadbeef").write_bytes(b"half a shard")  # a crashed write
    again = OutputStore(str(tmp_path / "out"), {})
    assert again.prepare(JOB, inputs, None, False) == {"s1", "s2"}
    assert ".tmp-deadbeef" not in files_under(tmp_path / "out")


def _changed_question_job() -> JobSpec:
    data = JOB.model_dump()
    data["questions"][0]["question"] += " Include paroxysmal AF."
    return JobSpec.model_validate(data)


def test_prepare_with_a_different_job_is_refused(store, inputs):
    store.prepare(JOB, inputs, None, False)
    store.commit_shard("s1", answers("s1", ["a"]))
    with pytest.raises(OutputError) as caught:
        store.prepare(_changed_question_job(), inputs, None, False)
    assert "--overwrite" in str(caught.value) and "different job" in str(caught.value)
    assert store.committed_shards() == {"s1"}  # nothing was removed


def test_prepare_with_another_limit_is_refused(store, inputs):
    store.prepare(JOB, inputs, None, False)
    with pytest.raises(OutputError, match="--limit.*--overwrite"):
        store.prepare(JOB, inputs, 2, False)


def test_changing_only_criteria_resumes(store, inputs):
    store.prepare(JOB, inputs, None, False)
    store.commit_shard("s1", answers("s1", ["a"]))
    data = JOB.model_dump()
    data["criteria"][0]["rule"] = "atrial_fibrillation AND age >= 18"
    assert store.prepare(JobSpec.model_validate(data), inputs, None, False) == {"s1"}


def test_overwrite_clears_the_folder(store, inputs, tmp_path):
    store.prepare(JOB, inputs, None, False)
    store.commit_shard("s1", answers("s1", ["a"]))
    store.write_json("report.json", {"old": True})
    other = _changed_question_job()
    assert store.prepare(other, inputs, None, overwrite=True) == set()
    assert files_under(tmp_path / "out") == [MANIFEST]
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["job_fingerprint"] == other.fingerprint()


def test_folder_with_answers_but_no_manifest_is_refused(tmp_path, inputs):
    foreign = tmp_path / "foreign"
    (foreign / ANSWERS).mkdir(parents=True)
    pq.write_table(answers("x", ["a"]), foreign / ANSWERS / "x.parquet")
    with pytest.raises(OutputError) as caught:
        OutputStore(str(foreign), {}).prepare(JOB, inputs, None, False)
    assert MANIFEST in str(caught.value) and "--overwrite" in str(caught.value)
    assert (foreign / ANSWERS / "x.parquet").exists()


def test_write_text_and_json_leave_no_scratch_files(store, tmp_path):
    store.write_json("report.json", {"a": 1})
    store.write_text("report.html", "<p>µ ≥</p>")
    assert files_under(tmp_path / "out") == ["report.html", "report.json"]
    assert (tmp_path / "out" / "report.html").read_text(encoding="utf-8") == "<p>µ ≥</p>"


# --- shard collection --------------------------------------------------------------------------------------

def test_collector_returns_a_shard_only_when_all_its_rows_arrived():
    collector = ShardCollector({"s1": 4, "s2": 2, "s3": 2})
    assert collector.add("s1", "p1", 2) is None
    assert collector.add("s2", "p2", 1) is None
    assert collector.incomplete == ["s1", "s2", "s3"]  # s3: nothing staged yet
    assert collector.add("s2", "p3", 1) == ["p2", "p3"]
    assert collector.add("s3", "p4", 2) == ["p4"]
    assert collector.add("s1", "p5", 2) == ["p1", "p5"]
    assert collector.incomplete == []


def test_collector_refuses_more_rows_than_expected_and_unknown_shards():
    collector = ShardCollector({"s1": 1})
    with pytest.raises(RuntimeError, match="more rows than expected"):
        collector.add("s1", "p1", 2)
    with pytest.raises(RuntimeError, match="does not process"):
        collector.add("s9", "p2", 1)


def test_staged_parts_merge_into_one_sorted_shard_and_leave_nothing(store, inputs, tmp_path):
    store.prepare(JOB, inputs, None, False)
    rows = answers("s1", ["a", "b", "c"])
    later, earlier = rows.slice(2), rows.slice(0, 2)  # parts arrive in any order
    paths = [store.stage_part("s1", later), store.stage_part("s1", earlier)]
    assert all(Path(p).exists() for p in paths) and not (tmp_path / "out" / ANSWERS / "s1.parquet").exists()
    store.commit_staged("s1", paths)
    table = pq.read_table(tmp_path / "out" / ANSWERS / "s1.parquet")
    assert table.num_rows == 6 and table["row_number"].to_pylist() == [0, 0, 1, 1, 2, 2]
    assert table["note_id"].to_pylist() == ["a", "a", "b", "b", "c", "c"]
    assert files_under(tmp_path / "out") == [MANIFEST, "s1.parquet"]
    store.commit_staged("s1", paths)  # a retried commit of a committed shard changes nothing
    assert pq.read_table(tmp_path / "out" / ANSWERS / "s1.parquet").equals(table)


def test_a_part_the_commit_cannot_find_is_a_clear_error(store, inputs, tmp_path):
    store.prepare(JOB, inputs, None, False)
    path = store.stage_part("s1", answers("s1", ["a"]))
    Path(path).unlink()
    with pytest.raises(OutputError, match="shared by all of them"):
        store.commit_staged("s1", [path])
    assert not (tmp_path / "out" / ANSWERS / "s1.parquet").exists()


def test_parts_of_a_stopped_run_are_removed_when_it_resumes(store, inputs, tmp_path):
    store.prepare(JOB, inputs, None, False)
    store.commit_shard("s1", answers("s1", ["a"]))
    store.stage_part("s2", answers("s2", ["b"]))  # s2 never completed
    assert store.prepare(JOB, inputs, None, False) == {"s1"}
    assert files_under(tmp_path / "out") == [MANIFEST, "s1.parquet"]


# --- answers schema and reading back -----------------------------------------------------------------------

def test_read_answers_concatenates_committed_shards(store, inputs, tmp_path):
    store.prepare(JOB, inputs, None, False)
    store.commit_shard("s2", answers("s2", ["c"], first_row=2))
    store.commit_shard("s1", answers("s1", ["a", "b"]))
    for uri in (str(tmp_path / "out"), str(tmp_path / "out" / ANSWERS)):
        table = read_answers(uri)
        assert table.num_rows == 6
        assert sorted(set(table["shard_id"].to_pylist())) == ["s1", "s2"]
    assert read_answers(store.uri).num_rows == 6


def test_read_answers_without_answers_says_where_it_looked(tmp_path):
    with pytest.raises(OutputError, match="no answers under"):
        read_answers(str(tmp_path / "nothing"))
    (tmp_path / "empty" / ANSWERS).mkdir(parents=True)
    with pytest.raises(OutputError, match="no .parquet files"):
        read_answers(str(tmp_path / "empty"))


def test_to_answer_table_fixes_the_schema(inputs):
    schema = answer_schema(JOB, inputs.schema)
    assert schema.names == [*ANSWER_COLUMNS, "sex", "age"]
    assert schema.field("age").type == inputs.schema.field("age").type
    row = {name: None for name in ANSWER_COLUMNS if name != "job_fingerprint"}
    row.update(note_id="a", patient_id="1", status="answered", value_num=1.5, sex="F", age=80, extra="dropped")
    batch = pa.Table.from_pylist([row]).set_column(
        list(row).index("question_id"), "question_id", pa.array(["creatinine_max"]).dictionary_encode())
    table = to_answer_table(batch, schema, "abc123")
    assert table.schema == schema
    assert table["job_fingerprint"].to_pylist() == ["abc123"]
    assert table["question_id"].to_pylist() == ["creatinine_max"]
    assert table["value_num"].to_pylist() == [1.5]


def test_collector_counts_a_part_reported_twice_once():
    collector = ShardCollector({"s1": 4})
    assert collector.add("s1", "p1", 2, key=("s1", 0, 0, 2)) is None
    assert collector.add("s1", "p1-again", 2, key=("s1", 0, 0, 2)) is None  # a retried batch staged the same rows
    assert collector.add("s1", "p2", 2, key=("s1", 1, 1, 2)) == ["p1", "p2"]


def test_a_shard_is_written_in_row_order_with_statistics_where_readers_filter(store, inputs, tmp_path):
    """Parts arrive in any order (sorted on commit, a note's rows keeping their question order); rows already in
    order are written as they are. Min/max statistics are kept only for the columns readers filter on."""
    import pyarrow.parquet as pq

    from engine.store.layout import ANSWER_STATISTICS

    store.prepare(JOB, inputs, None, False)
    shuffled = pa.concat_tables([answers("s1", ["c"], first_row=2), answers("s1", ["a", "b"])])
    store.commit_shard("s1", shuffled)
    store.commit_shard("s2", answers("s2", ["d", "e"], first_row=3))
    for shard, notes in (("s1", ["a", "b", "c"]), ("s2", ["d", "e"])):
        written = pq.read_table(tmp_path / "out" / ANSWERS / f"{shard}.parquet")
        assert written["note_id"].to_pylist() == [n for n in notes for _ in range(2)]
        assert written["question_id"].to_pylist() == ["creatinine_max", "atrial_fibrillation"] * len(notes)
    meta = pq.ParquetFile(tmp_path / "out" / ANSWERS / "s1.parquet").metadata.row_group(0)
    with_stats = {meta.column(i).path_in_schema for i in range(meta.num_columns) if meta.column(i).is_stats_set}
    assert with_stats == set(ANSWER_STATISTICS) & set(shuffled.column_names)

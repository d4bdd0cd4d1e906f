"""S3 in and out against a real S3-compatible server (moto_server on 127.0.0.1, IAM authentication enforced).

The engine runs as users run it, `python -m engine run JOB`, with the keys in AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY and the endpoint in the job's input/output `storage_options`. The run starts its own
private Ray (bound to 127.0.0.1), whose workers read the notes from S3 with the keys they inherit from the
run's environment; the keys are never put into a Ray runtime env (Ray's runtime-env agent logs it). The
session's `ray_local` is not used: its workers were started before this module's keys existed. The Ray
temp dir of the run is a folder of this module, so its logs are checked for the secret key and note text.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import APIXABAN_JOB, ROOT, SAMPLE_NOTES
from s3_server import S3Server, moto_s3

pytestmark = pytest.mark.e2e

BUCKET = "engine-notes"
NOTES = 6  # two input files (4 + 2 notes) under notes/
SNIPPET_CHARS = 40


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server (tests/s3_server.py: IAM authentication enforced, so wrong keys are refused as by AWS) with the
    bucket and the notes in two files."""
    notes = pq.read_table(SAMPLE_NOTES).slice(0, NOTES)

    def setup(client) -> None:
        client.create_bucket(Bucket=BUCKET)
        for name, part in (("part-0.parquet", notes.slice(0, 4)), ("part-1.parquet", notes.slice(4))):
            buffer = io.BytesIO()
            pq.write_table(part, buffer)
            client.put_object(Bucket=BUCKET, Key=f"notes/{name}", Body=buffer.getvalue())

    with moto_s3(tmp_path_factory.mktemp("moto"), setup) as server:
        yield S3Notes(server.endpoint, server.key_id, server.secret, notes)


@dataclass(frozen=True)
class S3Notes(S3Server):
    notes: pa.Table = None


def clean_env() -> dict[str, str]:
    """This process's environment without AWS or Ray settings that could point the run elsewhere."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}


def s3fs_for(s3: S3Server):
    return s3.filesystem()


def write_job(folder: Path, s3: S3Server, *, name: str = "job", input_uri: str = f"s3://{BUCKET}/notes/",
              output_uri: str = f"s3://{BUCKET}/out/") -> Path:
    spec = yaml.safe_load(APIXABAN_JOB.read_text())
    options = {"endpoint_url": s3.endpoint}
    spec["input"].update(uri=input_uri, limit=None, storage_options=options)
    spec["output"] = {"uri": output_uri, "storage_options": options}
    spec["model"] = {"backend": "null", "name": "null"}
    spec["batching"] = {"notes_per_shard": 2, "notes_per_batch": 2}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(job: Path, s3: S3Server, *, secret: str | None = None, ray_tmp: Path | None = None, timeout: float = 240) -> Run:
    """`python -m engine run JOB` with the keys in the usual AWS variables and nothing else AWS-related."""
    env = clean_env()
    env.update(AWS_ACCESS_KEY_ID=s3.key_id, AWS_SECRET_ACCESS_KEY=secret or s3.secret, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    done = subprocess.run([sys.executable, "-m", "engine", "run", str(job)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    """The job run twice into s3://engine-notes/out/: the real run, then the re-run that must do nothing."""
    folder = tmp_path_factory.mktemp("s3-job")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs3-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        job = write_job(folder, s3)
        first = run_cli(job, s3, ray_tmp=ray_tmp)
        assert first.returncode == 0, first.output[-3000:]
        fs = s3fs_for(s3)
        listing_after_first = {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/out/answers")}
        second = run_cli(job, s3, ray_tmp=ray_tmp)
        ray_logs = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size < 64 << 20]
        log_text = b"".join(p.read_bytes() for p in ray_logs if "sockets" not in p.parts)
        yield {"first": first, "second": second, "listing_after_first": listing_after_first, "ray_log_bytes": log_text,
               "ray_log_files": len(ray_logs)}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def read_answers(s3: S3Server) -> pa.Table:
    fs = s3fs_for(s3)
    files = sorted(p for p in fs.find(f"{BUCKET}/out/answers") if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(p))) for p in files])


def test_run_reads_and_writes_s3_every_pair_exactly_once(s3, runs, apixaban_job):
    answers = read_answers(s3)
    questions = [q.id for q in apixaban_job.questions]
    assert answers.num_rows == NOTES * len(questions)
    pairs = answers.group_by(["note_id", "question_id"]).aggregate([([], "count_all")])
    assert pc.max(pairs["count_all"]).as_py() == 1 and pairs.num_rows == NOTES * len(questions)
    assert set(answers["note_id"].to_pylist()) == set(s3.notes["note_id"].to_pylist())
    assert set(answers["question_id"].to_pylist()) == set(questions)
    assert set(answers["status"].to_pylist()) <= {"answered", "not_in_note"}  # no error rows
    fs = s3fs_for(s3)
    report = json.loads(fs.cat_file(f"{BUCKET}/out/report.json"))
    assert report["notes"] == NOTES
    manifest = json.loads(fs.cat_file(f"{BUCKET}/out/_engine.json"))
    assert sorted(path for path, _ in manifest["input_files"]) == [f"{BUCKET}/notes/part-0.parquet", f"{BUCKET}/notes/part-1.parquet"]
    assert fs.exists(f"{BUCKET}/out/patients/patients.parquet") and fs.exists(f"{BUCKET}/out/report.html")
    assert not [p for p in fs.find(f"{BUCKET}/out") if p.rsplit("/", 1)[-1].startswith(".tmp-")]


def test_rerun_of_a_finished_job_does_nothing(s3, runs):
    second = runs["second"]
    assert second.returncode == 0, second.output[-3000:]
    assert "Nothing to do" in second.stdout
    fs = s3fs_for(s3)
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/out/answers")} == runs["listing_after_first"]


def test_secret_key_is_never_written_or_logged(s3, runs):
    secret = s3.secret
    for name in ("first", "second"):
        assert secret not in runs[name].output
    assert runs["ray_log_files"] > 0 and secret.encode() not in runs["ray_log_bytes"]
    fs = s3fs_for(s3)
    for path in fs.find(f"{BUCKET}/out"):
        data = fs.cat_file(path)
        assert secret.encode() not in data, path
        if path.endswith(".parquet"):
            assert secret not in json.dumps(pq.read_table(io.BytesIO(data)).to_pylist(), default=str), path


def note_snippets(notes: pa.Table) -> list[str]:
    """A stretch from the middle of every note: what a log line carrying note text would contain."""
    texts = [t for t in notes["text"].to_pylist() if t and len(t.strip()) > SNIPPET_CHARS]
    return [t[len(t) // 2: len(t) // 2 + SNIPPET_CHARS] for t in texts]


def test_no_note_text_in_the_run_output_or_ray_logs(s3, runs):
    snippets = note_snippets(s3.notes)
    assert len(snippets) == NOTES
    output = runs["first"].output + runs["second"].output
    logs = runs["ray_log_bytes"].decode("utf-8", errors="replace")
    assert not [s for s in snippets if s in output]
    assert not [s for s in snippets if s in logs]


ERRORS = {
    "input bucket missing": (dict(input_uri="s3://no-such-bucket/notes/"), "Error: input s3://no-such-bucket/notes/: bucket 'no-such-bucket' does not exist"),
    "output bucket missing": (dict(output_uri="s3://no-such-output-bucket/out/"), "Error: output s3://no-such-output-bucket/out/: bucket 'no-such-output-bucket' does not exist"),
    "input prefix missing": (dict(input_uri=f"s3://{BUCKET}/missing/"), f"Error: input s3://{BUCKET}/missing/: nothing at '{BUCKET}/missing' in bucket '{BUCKET}'"),
    "bad credentials": (dict(), "Error: input s3://engine-notes/notes/: access denied"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_storage_problems_are_one_line_errors(s3, runs, tmp_path, case):
    overrides, expected = ERRORS[case]
    job = write_job(tmp_path, s3, name=case.replace(" ", "-"), **overrides)
    wrong_secret = "W" * 40
    done = run_cli(job, s3, secret=wrong_secret if case == "bad credentials" else None, timeout=120)
    assert done.returncode == 1, done.output[-3000:]
    assert done.stderr.startswith(expected), done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.output
    assert s3.secret not in done.output and wrong_secret not in done.output
    if case == "bad credentials":
        assert "AWS_ACCESS_KEY_ID" in done.stderr  # says what to check
    fs = s3fs_for(s3)
    assert not fs.exists("no-such-output-bucket")  # refused, not created
    assert {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/out/answers")} == runs["listing_after_first"]


def test_storage_problems_raise_engine_errors(s3, monkeypatch, tmp_path):
    """The library raises the EngineError subclasses the CLI prints (InputError, OutputError)."""
    import s3fs

    from engine.errors import InputError, OutputError
    from engine.job import load_job
    from engine.store.layout import OutputStore
    from engine.stages.read import plan_input

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    job = load_job(write_job(tmp_path, s3, output_uri="s3://no-such-output-bucket/out/"))
    inputs = plan_input(job.input, 2, None)
    assert inputs.num_notes == NOTES
    with pytest.raises(OutputError, match="bucket 'no-such-output-bucket' does not exist"):
        OutputStore(job.output.uri, job.output.storage_options).prepare(job, inputs, None, overwrite=False)
    missing = job.input.model_copy(update={"uri": "s3://no-such-bucket/notes/"})
    with pytest.raises(InputError, match="bucket 'no-such-bucket' does not exist"):
        plan_input(missing, 2, None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "W" * 40)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(InputError, match="access denied") as caught:
            plan_input(job.input, 2, None)
        assert s3.secret not in str(caught.value) and "W" * 40 not in str(caught.value)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(InputError, match="no AWS credentials found; set AWS_ACCESS_KEY_ID"):
            plan_input(job.input, 2, None)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()

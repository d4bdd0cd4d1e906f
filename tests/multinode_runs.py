"""Runs of the engine on a Ray cluster of several nodes on this machine that lose a worker node at a chosen moment,
shared by tests/e2e/test_multinode.py and benchmarks/multinode.py.

A Stage is the moto S3 server (tests/s3_server.py) with the notes, a write gate in front of it and a LocalCluster
(tests/ray_nodes.py). kill_at_gate submits the job with `ray job submit`, lets the gate hold one write of a worker
node's process (a part being staged, a shard being committed), SIGKILLs that whole node, lets the run finish, checks
that every (note, question) is in answers/ exactly once, and returns what happened (where, how long, report.json's
this_run); then it adds a fresh worker node, so the next run starts with as many.
"""

from __future__ import annotations

import io
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from ray_nodes import ROOT, LocalCluster, Node
from s3_server import S3Server, WriteGate

APIXABAN_JOB = ROOT / "jobs" / "apixaban.yaml"
BUCKET = "engine-multinode"
NOTES_PER_SHARD, NOTES_PER_BATCH = 25, 10
WORKER = {"num_cpus": 4, "resources": {"worker_node": 2}}  # room for the other node's actor after a loss
RUN_SECONDS = 150


def notes_table(n: int) -> pa.Table:
    base = datetime(2150, 1, 1)
    return pa.table({
        "note_id": [f"n{i:05d}" for i in range(n)],
        "subject_id": [i // 2 for i in range(n)],
        "charttime": [base + timedelta(days=i) for i in range(n)],
        "text": [f"Discharge summary {i}. PMH: HTN. Cr {1 + i % 3}.1 mg/dL." for i in range(n)],
        "sex": ["F" if i % 2 else "M" for i in range(n)],
        "age": [60 + i % 30 for i in range(n)],
    })


def upload_notes(client, bucket: str, n: int, row_group_size: int = 100) -> None:
    buffer = io.BytesIO()
    pq.write_table(notes_table(n), buffer, row_group_size=row_group_size)
    client.put_object(Bucket=bucket, Key=f"notes/notes-{n}.parquet", Body=buffer.getvalue())


def job_spec(*, notes: int, output: str, endpoint: str, actors: int = 2, notes_per_shard: int = NOTES_PER_SHARD,
             notes_per_batch: int = NOTES_PER_BATCH, actor_resources: dict | None = None) -> dict:
    """The shipped job's questions and rules, the null backend, S3 in and out through `endpoint`."""
    spec = yaml.safe_load(APIXABAN_JOB.read_text())
    options = {"endpoint_url": endpoint}
    input_uri = f"s3://{BUCKET}/notes/notes-{notes}.parquet"
    spec["input"].update(uri=input_uri, limit=None, storage_options=options)
    local = output.startswith("/")
    spec["output"] = {"uri": output} if local else {"uri": f"s3://{BUCKET}/{output}/", "storage_options": options}
    spec["model"] = {"backend": "null", "name": "null"}
    spec["extraction"] = {"mode": "model"}  # every pair through the model actors, as a model-backed run
    spec["batching"] = {"notes_per_shard": notes_per_shard, "notes_per_batch": notes_per_batch, "actors": actors,
                        **({"actor_resources": actor_resources} if actor_resources else {})}
    return spec


@dataclass
class Stage:
    s3: S3Server
    gate: WriteGate
    cluster: LocalCluster
    home: Path
    tmp: Path


def submit_job(stage: Stage, spec: dict, name: str):
    """Start `ray job submit` (it follows the job's log until it ends); return the process and its submission id."""
    submission_id = f"{name}-{secrets.token_hex(3)}"
    folder = stage.tmp / f"wd-{submission_id}"
    folder.mkdir()
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    process = stage.cluster.submit(folder, ["python", "-m", "engine", "run", "job.yaml"], submission_id=submission_id,
                                   home=stage.home, no_wait=True)
    return process, submission_id


def finish(stage: Stage, process, submission_id: str, timeout: float = RUN_SECONDS) -> tuple[dict, str]:
    """Wait for `ray job submit` to end (the job stopped if it outlasts `timeout`); the job's status and the output."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except Exception:
        process.kill()
        process.communicate()
        logs = stage.cluster.job_logs(submission_id)[-4000:]
        stage.cluster.stop_job(submission_id)
        raise AssertionError(f"the job did not end in {timeout} s:\n{logs}") from None
    return stage.cluster.job(submission_id), output


def committed(s3: S3Server, prefix: str) -> pa.Table:
    fs = s3.filesystem()
    files = sorted(p for p in fs.find(f"{BUCKET}/{prefix}/answers") if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(p))) for p in files])


def check_exactly_once(s3: S3Server, prefix: str, notes: int) -> dict:
    """Every (note, question) once in answers/, nothing left in _staging/; returns report.json."""
    answers = committed(s3, prefix)
    questions = len(yaml.safe_load(APIXABAN_JOB.read_text())["questions"])
    keys = pc.binary_join_element_wise(answers["note_id"], answers["question_id"], "|")
    assert answers.num_rows == notes * questions, (answers.num_rows, notes * questions)
    assert len(pc.unique(keys)) == notes * questions, "every (note, question) exactly once"
    fs = s3.filesystem()
    assert not fs.exists(f"{BUCKET}/{prefix}/_staging") or not fs.find(f"{BUCKET}/{prefix}/_staging")
    return json.loads(fs.cat_file(f"{BUCKET}/{prefix}/report.json"))


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None


def on_a_worker(cluster: LocalCluster):
    """Accept a write only from a process of a live worker node (the one the test will kill)."""
    def accept(pid: int | None) -> bool:
        node = cluster.node_of(pid) if pid else None
        return node is not None and node is not cluster.head
    return accept


def kill_at_gate(stage: Stage, spec: dict, name: str, pattern: str, *, notes: int, skip: int, forward_first: bool = False) -> dict:
    """Run the job, hold the write matching `pattern` (after `skip` of them) from a worker node, SIGKILL that node,
    let the run finish; check exactly once; return what happened."""
    prefix = spec["output"]["uri"].removeprefix(f"s3://{BUCKET}/").rstrip("/")
    stage.gate.arm(f"/{BUCKET}/{prefix}/{pattern}", skip=skip, forward_first=forward_first, accept=on_a_worker(stage.cluster))
    started = time.monotonic()
    victim: Node | None = None
    process, submission_id = submit_job(stage, spec, name)
    try:
        deadline = time.monotonic() + RUN_SECONDS
        held = None
        while held is None and process.poll() is None and time.monotonic() < deadline:
            held = stage.gate.wait_held(0.5)
        assert held is not None, f"no write matched:\n{stage.cluster.job_logs(submission_id)[-4000:]}"
        held_after = time.monotonic() - started
        victim = stage.cluster.node_of(held.pid)
        killed_mono = time.monotonic()
        killed = stage.cluster.kill(victim)
        killed_at = victim.killed_at
        stage.gate.release()
        job, output = finish(stage, process, submission_id)
        ended = time.monotonic()
        assert job["status"] == "SUCCEEDED", (job["status"], stage.cluster.job_logs(submission_id)[-4000:])
        report = check_exactly_once(stage.s3, prefix, notes)
        this_run = report["this_run"]
        retried_at, restarted_at = (_epoch(this_run[k]) for k in ("first_retry_at", "first_actor_restart_at"))  # the head's clock
        result = {"killed": victim.name, "processes": killed, "held": held.key.split(f"/{prefix}/", 1)[1],
                  "stored_before_kill": held.forwarded, "seconds_to_kill": round(held_after, 1),
                  "seconds_to_retry": round(retried_at - killed_at, 1) if retried_at else None,
                  "seconds_to_actor_restart": round(restarted_at - killed_at, 1) if restarted_at else None,
                  "seconds_kill_to_end": round(ended - killed_mono, 1), "wall": round(ended - started, 1),
                  "report_wall_seconds": report.get("wall_seconds"), "exactly_once": True, "this_run": this_run}
        print(json.dumps(result), flush=True)
        survivors = {w.name for w in stage.cluster.alive_workers()}
        assert set(this_run["model_actors_by_node"]) <= {w.name for w in stage.cluster.workers}, "actors only on workers"
        assert this_run["nodes"] == 3
        assert set(this_run["batches_by_node"]) & survivors
        return result
    finally:
        stage.gate.release()
        if process.poll() is None:
            process.kill()
        stage.cluster.stop_job(submission_id)
        if victim is not None:  # as many workers for the next run
            stage.cluster.add_worker(f"worker-{len(stage.cluster.workers) + 1}", **WORKER)

"""A real multi-node run that loses a node: a Ray head and two worker nodes on this machine (tests/ray_nodes.py:
separate raylets on 127.0.0.1, token authentication), the notes and the output on S3 (moto, tests/s3_server.py),
the run submitted with `ray job submit`, the null backend (every pair through the model actors, fast).

The head has no CPUs: the driver and the ledger live there, the model actors (batching.actor_resources
{worker_node: 1}), read tasks and commit tasks on the workers. A write gate in front of S3 holds one write of a
worker node's process at the moment the test wants (a part being staged, a shard being committed), the test
SIGKILLs that whole node, and the run must finish on the other with every (note, question) exactly once in answers/
and report.json counting the work done again. Each test then adds a fresh worker, so the next starts with two.
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
import pytest
import yaml

from conftest import APIXABAN_JOB
from ray_nodes import LocalCluster, Node
from s3_server import S3Server, WriteGate, moto_s3

pytestmark = pytest.mark.e2e

BUCKET = "engine-multinode"
NOTES = 400  # 16 shards of 25 notes, 40 model batches of 10: parts are staged, and merged by commit tasks
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


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    with moto_s3(tmp, lambda client: (client.create_bucket(Bucket=BUCKET), upload_notes(client, BUCKET, NOTES))) as s3, \
            WriteGate(s3.endpoint) as gate, LocalCluster(env=s3.env()) as cluster:
        started = time.monotonic()
        cluster.start_head(num_cpus=0)
        cluster.add_worker("worker-1", **WORKER, wait=False)
        cluster.add_worker("worker-2", **WORKER, wait=False)
        cluster.wait_for_nodes(3)
        print(f"cluster of 3 nodes up in {time.monotonic() - started:.1f} s")
        home = tmp / "home"
        home.mkdir()
        yield Stage(s3, gate, cluster, home, tmp)


def submit_job(stage: Stage, spec: dict, name: str):
    """Start `ray job submit` (it follows the job's log until it ends); return the process and its submission id."""
    folder = stage.tmp / f"wd-{name}"
    folder.mkdir()
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    submission_id = f"{name}-{secrets.token_hex(3)}"
    process = stage.cluster.submit(folder, ["python", "-m", "engine", "run", "job.yaml"], submission_id=submission_id,
                                   home=stage.home, no_wait=True)
    return process, submission_id


def finish(stage: Stage, process, submission_id: str) -> tuple[dict, str]:
    try:
        output, _ = process.communicate(timeout=RUN_SECONDS)
    except Exception:
        process.kill()
        output = process.communicate()[0]
        raise AssertionError(f"the job did not end in {RUN_SECONDS} s:\n{stage.cluster.job_logs(submission_id)[-4000:]}")
    job = stage.cluster.job(submission_id)
    return job, output


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


def on_a_worker(cluster: LocalCluster):
    """Accept a write only from a process of a live worker node (the one the test will kill)."""
    def accept(pid: int | None) -> bool:
        node = cluster.node_of(pid) if pid else None
        return node is not None and node is not cluster.head
    return accept


def kill_at_gate(stage: Stage, spec: dict, name: str, pattern: str, *, skip: int, forward_first: bool = False) -> dict:
    """Run the job, hold the write matching `pattern` (after `skip` of them) from a worker node, SIGKILL that node,
    let the run finish; check exactly once; return what happened."""
    prefix = spec["output"]["uri"].removeprefix(f"s3://{BUCKET}/").rstrip("/")
    stage.gate.arm(f"/{BUCKET}/{prefix}/{pattern}", skip=skip, forward_first=forward_first, accept=on_a_worker(stage.cluster))
    started = time.monotonic()
    process, submission_id = submit_job(stage, spec, name)
    deadline = time.monotonic() + RUN_SECONDS
    held = None
    while held is None and process.poll() is None and time.monotonic() < deadline:
        held = stage.gate.wait_held(0.5)
    assert held is not None, f"no write matched:\n{stage.cluster.job_logs(submission_id)[-4000:]}"
    held_after = time.monotonic() - started
    victim: Node = stage.cluster.node_of(held.pid)
    killed_mono = time.monotonic()
    killed = stage.cluster.kill(victim)
    killed_at = victim.killed_at
    stage.gate.release()
    job, output = finish(stage, process, submission_id)
    ended = time.monotonic()
    assert job["status"] == "SUCCEEDED", (job, stage.cluster.job_logs(submission_id)[-4000:])
    report = check_exactly_once(stage.s3, prefix, NOTES)
    retried = report["this_run"]["first_retry_at"]  # the ledger's clock: the head's, this machine's
    retried_at = datetime.fromisoformat(retried.replace("Z", "+00:00")).timestamp() if retried else None
    result = {"killed": victim.name, "processes": killed, "held": held.key.split(f"/{prefix}/", 1)[1],
              "stored_before_kill": held.forwarded, "seconds_to_kill": round(held_after, 1),
              "seconds_to_retry": round(retried_at - killed_at, 1) if retried_at else None,
              "seconds_kill_to_end": round(ended - killed_mono, 1), "wall": round(ended - started, 1),
              "this_run": report["this_run"]}
    print(json.dumps(result))
    survivors = [w.name for w in stage.cluster.alive_workers()]
    assert set(report["this_run"]["model_actors_by_node"]) <= {w.name for w in stage.cluster.workers}, "actors only on workers"
    assert report["this_run"]["nodes"] == 3
    assert set(report["this_run"]["batches_by_node"]) & set(survivors)
    stage.cluster.add_worker(f"worker-{len(stage.cluster.workers) + 1}", **WORKER)  # two workers for the next test
    return result


def test_a_worker_node_lost_while_staging(stage):
    """The node is lost while one of its model actors is writing a part: Ray restarts the actor on the other worker
    and retries the batch; the part the dead actor never finished is not counted."""
    spec = job_spec(notes=NOTES, output="staging", endpoint=stage.gate.endpoint, actor_resources={"worker_node": 1})
    result = kill_at_gate(stage, spec, "staging", r"_staging/.*\.arrow$", skip=12)
    this_run = result["this_run"]
    assert this_run["model_actor_restarts"] >= 1 and this_run["model_actors_by_node"][result["killed"]] >= 1
    assert this_run["batches_retried"] >= 1 and this_run["pairs_retried"] >= NOTES_PER_BATCH * 25
    assert result["held"].startswith("_staging/") and this_run["shards_committed"] == NOTES // NOTES_PER_SHARD
    assert result["seconds_to_retry"] is not None


@pytest.mark.parametrize("forward_first", [False, True], ids=["write-lost", "write-stored-answer-lost"])
def test_a_worker_node_lost_while_committing(stage, forward_first):
    """The node is lost while its commit task writes answers/<shard>.parquet: either the write never reached S3, or
    S3 stored it and the task died before hearing so. The ledger (on the head) runs the commit again on the other
    worker, from the same staged parts; the shard is in answers/ once."""
    name = "commit-stored" if forward_first else "commit-lost"
    spec = job_spec(notes=NOTES, output=name, endpoint=stage.gate.endpoint, actor_resources={"worker_node": 1})
    result = kill_at_gate(stage, spec, name, r"answers/[^/]*\.parquet$", skip=1, forward_first=forward_first)
    assert result["this_run"]["commits_retried"] >= 1
    assert result["this_run"]["shards_committed"] == NOTES // NOTES_PER_SHARD


def test_a_local_output_on_several_nodes_is_refused_unless_shared(stage):
    """A local output folder on a cluster: refused before anything is written, naming the field and the fix. With
    output.shared: true it runs (the nodes of this test share this machine's disk, as NFS would)."""
    output = stage.tmp / "local-out"
    spec = job_spec(notes=NOTES, output=str(output), endpoint=stage.gate.endpoint, notes_per_shard=200, notes_per_batch=200)
    process, submission_id = submit_job(stage, spec, "local")
    job, output_text = finish(stage, process, submission_id)
    logs = stage.cluster.job_logs(submission_id)
    assert job["status"] == "FAILED", job
    assert "Error: output" in logs and "output.uri" in logs and "output.shared: true" in logs and "s3://" in logs, logs[-2000:]
    assert not output.exists(), "refused before anything was written"
    spec["output"]["shared"] = True
    process, submission_id = submit_job(stage, spec, "shared")
    job, _ = finish(stage, process, submission_id)
    assert job["status"] == "SUCCEEDED", (job, stage.cluster.job_logs(submission_id)[-3000:])
    answers = pa.concat_tables([pq.read_table(p) for p in sorted((output / "answers").glob("*.parquet"))])
    assert answers.num_rows == NOTES * len(yaml.safe_load(APIXABAN_JOB.read_text())["questions"])
    assert json.loads((output / "report.json").read_text())["this_run"]["nodes"] == 3

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

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from multinode_runs import (APIXABAN_JOB, BUCKET, NOTES_PER_BATCH, NOTES_PER_SHARD, WORKER, Stage, finish, job_spec,
                            kill_at_gate, notes_table, submit_job, upload_notes)
from ray_nodes import LocalCluster
from s3_server import WriteGate, moto_s3

pytestmark = pytest.mark.e2e

NOTES = 400  # 16 shards of 25 notes, 40 model batches of 10: parts are staged, and merged by commit tasks


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


def test_a_worker_node_lost_while_staging(stage):
    """The node is lost while one of its model actors is writing a part: Ray restarts the actor on the other worker
    and retries the batch; the part the dead actor never finished is not counted."""
    spec = job_spec(notes=NOTES, output="staging", endpoint=stage.gate.endpoint, actor_resources={"worker_node": 1})
    result = kill_at_gate(stage, spec, "staging", r"_staging/.*\.arrow$", notes=NOTES, skip=12)
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
    result = kill_at_gate(stage, spec, name, r"answers/[^/]*\.parquet$", notes=NOTES, skip=1, forward_first=forward_first)
    assert result["this_run"]["commits_retried"] >= 1
    assert result["this_run"]["shards_committed"] == NOTES // NOTES_PER_SHARD


def test_a_local_input_on_several_nodes_is_refused_unless_shared(stage):
    """Notes in a local file on a cluster: read tasks on the other nodes could not open it. Refused before the run
    starts, naming the field and the fix; with input.shared: true it runs (this test's nodes share one disk)."""
    notes = stage.tmp / "local-notes.parquet"
    pq.write_table(notes_table(NOTES), notes)
    spec = job_spec(notes=NOTES, output="local-input", endpoint=stage.gate.endpoint, notes_per_shard=200, notes_per_batch=200)
    spec["input"].update(uri=str(notes), storage_options={})
    process, submission_id = submit_job(stage, spec, "local-input")
    job, _ = finish(stage, process, submission_id)
    logs = stage.cluster.job_logs(submission_id)
    assert job["status"] == "FAILED", job
    assert "input.uri" in logs and "input.shared: true" in logs and "s3://" in logs, logs[-2000:]
    spec["input"]["shared"] = True
    process, submission_id = submit_job(stage, spec, "input-shared")
    job, _ = finish(stage, process, submission_id)
    assert job["status"] == "SUCCEEDED", (job, stage.cluster.job_logs(submission_id)[-3000:])


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

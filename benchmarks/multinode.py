"""Several nodes on one machine (run on demand): lose a worker node mid-run, and compare a head with two worker nodes
against one node on the same notes. Everything is real: each node is its own `ray start` on 127.0.0.1 with token
authentication (tests/ray_nodes.py), notes and output are on S3 (moto_server, IAM enforced; tests/s3_server.py),
each run is a `ray job submit` of `python -m engine run`, the null backend answers (every pair through the model
actors; extraction mode model).

Kill trials (head without CPUs, 2 worker nodes with 4 CPUs and {worker_node: 2} each, 2 model actors with
{worker_node: 1}): a write gate in front of S3 holds one write of a worker node's process, and that whole node is
SIGKILLed at that moment, either while a model actor stages a part (`staging`) or while a commit task writes
answers/<shard>.parquet (`committing`: the write lost, or stored with its answer lost, in turn). Each trial prints
where it was killed, seconds from the kill to the first work begun again and to the end of the job, actor restarts,
batches and commits retried, and the exactly-once check; a fresh worker node replaces the lost one.

Throughput: the same job (2 actors, shards of 500 notes, batches of 250) on synthetic notes
(engine.tools.synthetic.make_extract), on the head + 2 workers and on one node with the same 8 logical CPUs, the
two clusters up together and their runs in turn (`--repeats` rounds), so that both see the same load.

    .venv/bin/python benchmarks/multinode.py --trials 4 --notes 4000 20000
    .venv/bin/python benchmarks/multinode.py --trials 0 --notes 4000 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from multinode_runs import (BUCKET, NOTES_PER_BATCH, NOTES_PER_SHARD, WORKER, Stage, check_exactly_once,  # noqa: E402
                            finish, job_spec, kill_at_gate, submit_job, upload_notes)
from ray_nodes import LocalCluster  # noqa: E402
from s3_server import WriteGate, moto_s3  # noqa: E402

KILL_NOTES = 1000  # 40 shards of 25 notes, 100 model batches of 10 notes
ONE_NODE = {"num_cpus": 8, "resources": {"worker_node": 2}}  # the two workers' CPUs on one node
THROUGHPUT_BATCHING = {"notes_per_shard": 500, "notes_per_batch": 250}


def upload_extract(s3, n: int) -> None:
    from engine.tools.synthetic import make_extract

    table = pa.concat_tables(list(make_extract(n)))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=2000)
    s3.filesystem().pipe_file(f"{BUCKET}/notes/notes-{n}.parquet", buffer.getvalue())


def upload_sample(s3, n: int) -> None:
    buffer = io.BytesIO()
    pq.write_table(pq.read_table(ROOT / "data" / "sample_notes.parquet").slice(0, n), buffer)
    s3.filesystem().pipe_file(f"{BUCKET}/notes/sample-{n}.parquet", buffer.getvalue())


def kill_trials(stage: Stage, trials: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    batches = KILL_NOTES // NOTES_PER_BATCH
    shards = KILL_NOTES // NOTES_PER_SHARD
    for trial in range(trials):
        for scenario in ("staging", "committing"):
            forward_first = scenario == "committing" and trial % 2 == 1
            # anywhere from the first tenth to past the middle of the run's writes of that kind
            skip = rng.randint(batches // 10, batches * 6 // 10) if scenario == "staging" else rng.randint(1, shards // 2)
            name = f"{scenario}-{trial}"
            spec = job_spec(notes=KILL_NOTES, output=f"kill/{name}", endpoint=stage.gate.endpoint,
                            actor_resources={"worker_node": 1})
            pattern = r"_staging/.*\.arrow$" if scenario == "staging" else r"answers/[^/]*\.parquet$"
            try:
                result = kill_at_gate(stage, spec, name, pattern, notes=KILL_NOTES, skip=skip, forward_first=forward_first)
            except AssertionError as exc:  # a trial that fails is a result too
                result = {"error": str(exc)[-600:], "exactly_once": False}
            rows.append({"scenario": scenario + (" (write stored)" if forward_first else ""), "skip": skip, **result})
    return rows


def model_spec(notes: int) -> dict:
    """The embedded CPU model (vLLM), model mode (every pair asked), one engine: it takes every core it is given."""
    spec = job_spec(notes=notes, output="", endpoint="", actors=1, actor_resources={"worker_node": 1},
                    notes_per_shard=notes, notes_per_batch=notes)
    spec["model"] = {"backend": "vllm", "name": "embedded:smollm2-135m-instruct", "max_model_len": 4096}
    spec["input"]["uri"] = f"s3://{BUCKET}/notes/sample-{notes}.parquet"
    return spec


def throughput_run(stage: Stage, notes: int, label: str, spec: dict | None = None) -> dict:
    output = f"tp/{label}-{notes}-{time.time_ns()}"
    if spec is None:
        spec = job_spec(notes=notes, output=output, endpoint=stage.s3.endpoint, actor_resources={"worker_node": 1},
                        **THROUGHPUT_BATCHING)
    else:  # the model leg: the same S3, its own notes
        options = {"endpoint_url": stage.s3.endpoint}
        spec = {**spec, "input": {**spec["input"], "storage_options": options},
                "output": {"uri": f"s3://{BUCKET}/{output}/", "storage_options": options}}
    started = time.monotonic()
    process, submission_id = submit_job(stage, spec, f"tp-{label}-{notes}")
    job, _ = finish(stage, process, submission_id, timeout=900)
    wall = time.monotonic() - started
    if job["status"] != "SUCCEEDED":
        return {"error": stage.cluster.job_logs(submission_id)[-1500:]}
    prefix = spec["output"]["uri"].removeprefix(f"s3://{BUCKET}/").rstrip("/")
    report = check_exactly_once(stage.s3, prefix, notes)
    return {"job_wall": round(wall, 1), "run_wall": report["wall_seconds"], "startup": report["startup_seconds"],
            "processing": report["processing_seconds"], "model_outputs": report["model_outputs"],
            "pairs": report["this_run"]["pairs_processed"], "wall_pairs_per_second": report["wall_pairs_per_second"],
            "batches_by_node": report["this_run"]["batches_by_node"], "nodes": report["this_run"]["nodes"]}


def cluster_stage(s3, gate, home: Path, tmp: Path, workers: int) -> Stage:
    cluster = LocalCluster(env=s3.env())
    started = time.monotonic()
    if workers:
        cluster.start_head(num_cpus=0)
        for i in range(workers):
            cluster.add_worker(f"worker-{i + 1}", **WORKER, wait=False)
    else:
        cluster.start_head(num_cpus=ONE_NODE["num_cpus"], resources=ONE_NODE["resources"])
    cluster.wait_for_nodes(1 + workers)
    print(f"cluster of {1 + workers} node(s) up in {time.monotonic() - started:.1f} s", flush=True)
    return Stage(s3, gate, cluster, home, tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help="trials of each kill scenario (0: none)")
    parser.add_argument("--notes", type=int, nargs="*", default=[4000, 20000], help="notes for the throughput runs")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the throughput runs, the two clusters in turn")
    parser.add_argument("--model-notes", type=int, default=0, help="bundled notes for a run of the embedded CPU model "
                        "on each cluster (one engine; 0: none)")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--json", type=Path, help="write every figure here too")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="engine-multinode-"))
    home = tmp / "home"
    home.mkdir()
    figures: dict = {"kills": [], "throughput": []}

    def setup(client) -> None:
        client.create_bucket(Bucket=BUCKET)
        upload_notes(client, BUCKET, KILL_NOTES)

    with moto_s3(tmp, setup) as s3, WriteGate(s3.endpoint) as gate:
        for n in args.notes:
            upload_extract(s3, n)
        if args.model_notes:
            upload_sample(s3, args.model_notes)
        multi = cluster_stage(s3, gate, home, tmp, workers=2)
        one = None
        try:
            figures["kills"] = kill_trials(multi, args.trials, args.seed)
            one = cluster_stage(s3, gate, home, tmp, workers=0)  # both up from here: runs in turn see the same load
            for round_ in range(args.repeats):
                for n in args.notes:
                    for label, stage in (("head + 2 workers", multi), ("one node", one)):
                        row = {"notes": n, "run": label, "round": round_ + 1, **throughput_run(stage, n, "multi" if stage is multi else "one")}
                        figures["throughput"].append(row)
                        print(json.dumps(row), flush=True)
            if args.model_notes:
                spec = model_spec(args.model_notes)
                for label, stage in (("head + 2 workers", multi), ("one node", one)):
                    row = {"notes": args.model_notes, "run": f"{label}, embedded model", "round": 1,
                           **throughput_run(stage, args.model_notes, "model", spec)}
                    figures["throughput"].append(row)
                    print(json.dumps(row), flush=True)
        finally:
            multi.cluster.close()
            if one is not None:
                one.cluster.close()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print_tables(figures)


def print_tables(figures: dict) -> None:
    print(f"\n{'scenario':28} {'held write':52} {'killed':9} {'kill s':>6} {'retry s':>7} {'actor s':>7} {'to end s':>8} "
          f"{'restarts':>8} {'batches':>7} {'pairs':>5} {'commits':>7} {'once':>5}")
    for row in figures["kills"]:
        if "error" in row:
            print(f"{row['scenario']:28} FAILED: {row['error'][:200]}")
            continue
        t = row["this_run"]
        print(f"{row['scenario']:28} {row['held'][:52]:52} {row['killed']:9} {row['seconds_to_kill']:>6} "
              f"{_or_dash(row['seconds_to_retry']):>7} {_or_dash(row['seconds_to_actor_restart']):>7} {row['seconds_kill_to_end']:>8} "
              f"{t['model_actor_restarts']:>8} {t['batches_retried']:>7} {t['pairs_retried']:>5} {t['commits_retried']:>7} "
              f"{'yes' if row['exactly_once'] else 'NO':>5}")
    print(f"\n{'notes':>7} {'run':18} {'round':>5} {'job wall s':>10} {'run wall s':>10} {'start-up s':>10} {'pairs/s':>9} batches by node")
    for row in figures["throughput"]:
        if "error" in row:
            print(f"{row['notes']:>7} {row['run']:18} FAILED: {row['error'][:300]}")
            continue
        print(f"{row['notes']:>7,} {row['run']:18} {row.get('round', 1):>5} {row['job_wall']:>10} {row['run_wall']:>10} "
              f"{row['startup']:>10} {row['wall_pairs_per_second']:>9,.0f} {json.dumps(row['batches_by_node'])}")
    print(f"\n{'notes':>7} {'median run wall s: head + 2 workers':>36} {'one node':>9} {'ratio':>6}")
    for n in sorted({row["notes"] for row in figures["throughput"] if row["run"] == "one node"}):
        walls = {run: statistics.median([r["run_wall"] for r in figures["throughput"] if r["notes"] == n and r["run"] == run
                                         and "error" not in r] or [float("nan")]) for run in ("head + 2 workers", "one node")}
        print(f"{n:>7,} {walls['head + 2 workers']:>36.1f} {walls['one node']:>9.1f} "
              f"{walls['head + 2 workers'] / walls['one node']:>5.2f}x")


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    main()

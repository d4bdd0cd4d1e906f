"""Bounded memory at scale (run on demand): 100k and 1M generated notes through the whole engine pipeline with
the null backend, and bare Ray Data doing only read -> a row per note and question of the shipped job -> null answer -> write on the same
extract. Prints wall time, rows/s, peak system memory and the engine/bare ratio; then the real engine (the shipped
hybrid job with the embedded CPU model) on 1,000 of the same notes.

    .venv/bin/python benchmarks/scale.py --notes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def job_questions() -> int:
    """The shipped job's question count: bare Ray Data writes as many rows per note as the engine answers."""
    from engine.job import load_job

    return len(load_job(ROOT / "jobs" / "apixaban.yaml").questions)


class PeakMemory:
    """Peak of system memory in use (MemTotal - MemAvailable), sampled every 0.2 s, minus the starting level."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def used() -> int:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kib = lambda key: int(info[key].split()[0])  # noqa: E731
        return (kib("MemTotal") - kib("MemAvailable")) * 1024

    def __enter__(self):
        self.start = self.used()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def write_extract(folder: Path, notes: int) -> None:
    from engine.tools.synthetic import make_extract

    folder.mkdir(parents=True)
    for i, table in enumerate(make_extract(notes)):
        pq.write_table(table, folder / f"part-{i:04d}.parquet", row_group_size=50_000)


def bare_ray_data(extract: Path, out: Path) -> int:
    import numpy as np
    import ray.data

    questions = job_questions()

    def expand(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        idx = pa.array(np.repeat(np.arange(n, dtype=np.int32), questions))
        return pa.table({
            "note_id": batch["note_id"].combine_chunks().take(idx),
            "text": pa.DictionaryArray.from_arrays(idx, batch["text"].combine_chunks()),
            "question_id": pa.array(np.tile(np.arange(questions, dtype=np.int32), n)),
        })

    def null_answer(batch: pa.Table) -> pa.Table:
        return pa.table({"note_id": batch["note_id"], "question_id": batch["question_id"],
                         "status": pa.array(["not_in_note"] * batch.num_rows)})

    ds = ray.data.read_parquet(str(extract)).select_columns(["note_id", "text"])
    ds = ds.map_batches(expand, batch_format="pyarrow", batch_size=None).map_batches(null_answer, batch_format="pyarrow", batch_size=None)
    ds.write_parquet(str(out))
    return sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("*.parquet"))


def real_engine_run(extract: Path, out: Path) -> int:
    """The shipped job as it is (hybrid, the embedded CPU model) on the same generated notes."""
    from engine.job import load_job
    from engine.run import run_job

    job = load_job(ROOT / "jobs" / "apixaban.yaml")
    job = job.model_copy(update={
        "input": job.input.model_copy(update={"uri": str(extract), "limit": None}),
        "output": job.output.model_copy(update={"uri": str(out)}),
    })
    report, _ = run_job(job, overwrite=True)
    print(f"real engine: {report['rows']:,} rows, model calls saved {report.get('model_calls_saved')}, "
          f"routes {report.get('rows_by_route')}")
    return report["rows"]


def engine_run(extract: Path, out: Path) -> int:
    from engine.job import load_job
    from engine.run import run_job

    job = load_job(ROOT / "jobs" / "apixaban.yaml")
    job = job.model_copy(update={
        "input": job.input.model_copy(update={"uri": str(extract), "limit": None}),
        "output": job.output.model_copy(update={"uri": str(out)}),
        "model": job.model.model_copy(update={"backend": "null", "name": "null"}),
        # every pair goes to the (null) model: this measures the data plane, not the cue search of hybrid mode
        "extraction": job.extraction.model_copy(update={"mode": "model"}),
        # a batch is a shard: each model actor commits its batch to answers/ itself (no staged parts to merge)
        "batching": job.batching.model_copy(update={"notes_per_shard": 2_000, "notes_per_batch": 2_000, "actors": 2, "cpus_per_actor": 0.5}),
    })
    report, _ = run_job(job, overwrite=True)
    return report["rows"]


LEGS = {"bare Ray Data": bare_ray_data, "engine (null model)": engine_run, "real engine (hybrid)": real_engine_run}


def run_leg(name: str, extract: Path, out: Path) -> dict:
    """One leg in this process: a private Ray of its own, then wall time and peak system memory of the run."""
    from engine.runtime import ensure_ray

    ensure_ray()
    with PeakMemory() as memory:
        started = time.perf_counter()
        written = LEGS[name](extract, out)
        wall = time.perf_counter() - started
    return {"rows": written, "wall": wall, "peak": memory.peak / 2**30, "delta": (memory.peak - memory.start) / 2**30}


def fresh_leg(name: str, extract: Path, out: Path) -> dict:
    """run_leg in a fresh Python: no leg inherits another's Ray workers, object store or allocator (peak and wall
    of a leg run after another in one process were its predecessor's too: 5.4 GiB instead of 3.1 at 1M)."""
    command = [sys.executable, __file__, "--leg", name, "--extract", str(extract), "--out", str(out)]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    # the leg's figures are its last JSON line (Ray may print a line of its own after it, e.g. a worker's exit)
    result = next(json.loads(line) for line in reversed(done.stdout.strip().splitlines()) if line.startswith("{"))
    shutil.rmtree(out, ignore_errors=True)
    return result


def fresh_extract(folder: Path, notes: int) -> None:
    """write_extract in a fresh Python, so that this process holds no Arrow memory while the legs run."""
    subprocess.run([sys.executable, __file__, "--write-notes", str(notes), "--extract", str(folder)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--real-notes", type=int, default=1_000, help="notes for the real engine (0: skip it)")
    parser.add_argument("--leg", choices=list(LEGS), help=argparse.SUPPRESS)  # one leg, run by fresh_leg
    parser.add_argument("--extract", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write-notes", type=int, help=argparse.SUPPRESS)  # an extract, by fresh_extract
    args = parser.parse_args()
    if args.write_notes:
        write_extract(args.extract, args.write_notes)
        return
    if args.leg:
        print(json.dumps(run_leg(args.leg, args.extract, args.out)))
        return
    scratch = Path(tempfile.mkdtemp(prefix="engine-scale-"))
    rows = []
    try:
        for notes in args.notes:
            extract = scratch / f"extract-{notes}"
            fresh_extract(extract, notes)
            for name in ("bare Ray Data", "engine (null model)"):
                rows.append((notes, name, fresh_leg(name, extract, scratch / f"out-{name.split()[0]}-{notes}")))
            shutil.rmtree(extract, ignore_errors=True)
        if args.real_notes:
            extract = scratch / f"extract-{args.real_notes}"
            fresh_extract(extract, args.real_notes)
            rows.append((args.real_notes, "real engine (hybrid)", fresh_leg("real engine (hybrid)", extract, scratch / "out-real")))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{'notes':>9} {'run':22} {'rows':>11} {'wall s':>8} {'rows/s':>11} {'peak GiB':>9} {'+GiB':>6} {'engine/bare':>12}")
    bare = {}
    for notes, name, leg in rows:
        if name.startswith("bare"):
            bare[notes] = leg["wall"]
        ratio = f"{leg['wall'] / bare[notes]:.2f}x" if not name.startswith("bare") and notes in bare else "-"
        print(f"{notes:>9,} {name:22} {leg['rows']:>11,} {leg['wall']:>8.1f} {leg['rows'] / leg['wall']:>11,.0f} "
              f"{leg['peak']:>9.2f} {leg['delta']:>6.2f} {ratio:>12}")


if __name__ == "__main__":
    main()

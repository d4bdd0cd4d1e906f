"""Hybrid extraction figures on labelled notes (run on demand; no model needed, a few seconds per 100 notes).

For each labelled set: candidate recall against gold positives, model calls saved under each `ask_model`
setting, and the lexical baseline's `engine eval` summary. Model-only vs hybrid throughput and accuracy with
the model are in benchmarks/throughput.py (--labels).

    .venv/bin/python benchmarks/hybrid.py                       # bundled sample + held-out set
    .venv/bin/python benchmarks/hybrid.py --set my_notes.parquet:my_gold.parquet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SETS = [f"{ROOT}/data/sample_notes.parquet:{ROOT}/data/sample_gold.parquet",
                f"{ROOT}/data/heldout/notes.parquet:{ROOT}/data/heldout/gold.parquet"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(ROOT / "jobs" / "apixaban.yaml"))
    parser.add_argument("--set", action="append", help="NOTES.parquet:GOLD.parquet (repeatable)")
    args = parser.parse_args()

    from engine.reporting.evaluate import evaluate
    from engine.tools.inprocess import lexical_answers
    from engine.job import load_job
    from engine.tools.recall import candidate_recall

    job = load_job(args.job)
    for item in args.set or DEFAULT_SETS:
        notes, gold_path = item.rsplit(":", 1)
        if not Path(notes).exists():
            print(f"skip {notes}: not found")
            continue
        scoped = job.model_copy(update={"input": job.input.model_copy(update={"uri": notes, "limit": None})})
        gold = pq.read_table(gold_path)
        started = time.perf_counter()
        recall = candidate_recall(scoped, gold)
        answers = lexical_answers(scoped)
        seconds = time.perf_counter() - started
        overall = {r["metric"]: (r["value"], r["ci_low"], r["ci_high"]) for r in evaluate(scoped, answers, gold).table.to_pylist()
                   if r["metric"].startswith("mean_")}
        print(f"\n== {notes} ({recall['pairs']} pairs, {recall['positives']} gold positives; {seconds:.1f} s)")
        print(f"candidate recall: {recall['recall']}  missed: {recall['missed']}")
        print(f"model calls saved: {json.dumps(recall['model_calls_saved'])}")
        for metric, (value, low, high) in overall.items():
            print(f"lexical {metric}: {value:.3f} [{low:.3f}-{high:.3f}]")
        low_recall = {q: v for q, v in recall["per_question"].items() if v["recall"] is not None and v["recall"] < 1}
        print(f"questions with recall < 1: {json.dumps(low_recall)}")


if __name__ == "__main__":
    main()

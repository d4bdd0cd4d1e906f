"""Does the model earn its place? The cues alone against the shipped job's model paths, on labelled notes (run on
demand, not in CI: the model legs start vLLM and take minutes on a CPU).

Legs, each scored with `engine eval` against the same labels:
  lexical  - the cues alone (extraction mode lexical), in process, seconds
  hybrid   - the job as shipped (cues first, the model asked where they are unsure, every model answer verified
             against the note and replaced by the cue answer where it fails)
  model    - (--model-mode) the model asked every pair, its failed answers kept and counted

Prints each leg's mean balanced accuracy (yes/no questions) and mean numeric accuracy with 95% CIs, per question
how many notes a leg gets wrong that the cues get right and the reverse (the issue's "no more than one note
worse"), and what verification did (answers checked, failed by reason, cue answers kept).

    .venv/bin/python benchmarks/verified.py                         # data/heldout, lexical + hybrid
    .venv/bin/python benchmarks/verified.py --model-mode            # plus every pair to the model
    .venv/bin/python benchmarks/verified.py --model-mode --model-sees windows   # the model reads the cues' windows
    .venv/bin/python benchmarks/verified.py --notes my.parquet --labels my_gold.parquet
    .venv/bin/python benchmarks/verified.py --model-mode --adapter models/apixaban-smollm2-lora   # a trained adapter
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def per_note_correct(job, answers, labels) -> dict[str, dict[str, bool]]:
    """{question id: {note id: answered correctly}} under engine eval's definitions."""
    from engine.reporting.evaluate import match_labels, numeric_counts, yes_no_counts

    matched, _ = match_labels(answers, labels, job)
    result: dict[str, dict[str, bool]] = {}
    for question in job.questions:
        rows = matched.filter(pc.equal(matched["question_id"], question.id))
        if rows.num_rows == 0:
            continue
        col = rows.column
        status = col("pred_status").to_pylist()
        if question.type == "yes_no":
            counts = yes_no_counts(col("value_bool").to_pylist(), status, col("pred_value_bool").to_pylist(), question.absent)
            correct = counts["tp"] + counts["tn"]
        else:
            units = col("unit").to_pylist() if "unit" in rows.column_names else [None] * rows.num_rows
            counts = numeric_counts(question, list(zip(col("value_num").to_pylist(), units)),
                                    list(zip(status, col("pred_value_num").to_pylist(), col("pred_unit").to_pylist())))
            correct = counts["correct"]
        result[question.id] = dict(zip(col("note_id").to_pylist(), (bool(c) for c in np.asarray(correct))))
    return result


def summary(job, answers, labels) -> dict:
    from engine.reporting.evaluate import evaluate

    rows = evaluate(job, answers, labels).table.to_pylist()
    return {r["metric"]: (r["value"], r["ci_low"], r["ci_high"]) for r in rows if r["metric"] in ("mean_balanced_accuracy", "mean_accuracy")}


def run_leg(job, mode: str, notes: str, output: Path, **extraction) -> tuple:
    from engine.store.answers import read_answers
    from engine.run import run_job

    job = job.model_copy(update={
        "input": job.input.model_copy(update={"uri": notes, "limit": None}),
        "output": job.output.model_copy(update={"uri": str(output)}),
        "extraction": job.extraction.model_copy(update={"mode": mode, **extraction}),
    })
    started = time.perf_counter()
    report, _ = run_job(job, overwrite=True)
    return job, read_answers(str(output)), report, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(ROOT / "jobs" / "apixaban.yaml"))
    parser.add_argument("--notes", default=str(ROOT / "data" / "heldout" / "notes.parquet"))
    parser.add_argument("--labels", default=str(ROOT / "data" / "heldout" / "gold.parquet"))
    parser.add_argument("--model-mode", action="store_true", help="also ask the model every pair (slow on a CPU)")
    parser.add_argument("--model-sees", choices=["note", "windows"], help="the model leg's extraction.model_sees (default: the job's)")
    parser.add_argument("--window-chars", type=int, help="the model leg's extraction.window_chars with --model-sees windows")
    parser.add_argument("--adapter", help="serve this LoRA adapter (engine train) instead of the job's model.adapter; 'none' for the base model")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()

    from engine.tools.inprocess import lexical_answers
    from engine.job import load_job

    job = load_job(args.job)
    if args.adapter:
        adapter = None if args.adapter == "none" else str(Path(args.adapter).resolve())
        job = job.model_copy(update={"model": job.model.model_copy(update={"adapter": adapter})})
    print(f"model {job.model.name}, adapter {job.model.adapter or 'none'}")
    labels = pq.read_table(args.labels)
    scoped = job.model_copy(update={"input": job.input.model_copy(update={"uri": args.notes, "limit": None})})
    started = time.perf_counter()
    lexical = lexical_answers(scoped)
    legs = {"lexical": (scoped, lexical, None, time.perf_counter() - started)}
    with tempfile.TemporaryDirectory() as scratch:
        legs["hybrid"] = run_leg(job, "hybrid", args.notes, Path(scratch) / "hybrid")
        if args.model_mode:
            seen = {k: v for k, v in (("model_sees", args.model_sees), ("window_chars", args.window_chars)) if v}
            legs["model"] = run_leg(job, "model", args.notes, Path(scratch) / "model", **seen)

    figures: dict = {}
    base = per_note_correct(scoped, lexical, labels)
    print(f"\n== {args.notes}: {lexical.num_rows} pairs, labels {args.labels}")
    print(f"{'leg':8} {'wall s':>7} {'model calls':>11}  {'mean BA [95% CI]':28} {'numeric acc [95% CI]':28}")
    for name, (leg_job, answers, report, seconds) in legs.items():
        scores = summary(leg_job, answers, labels)
        ba, acc = scores["mean_balanced_accuracy"], scores["mean_accuracy"]
        calls = report["model_outputs"] if report else 0
        print(f"{name:8} {seconds:7.1f} {calls:11d}  {ba[0]:.3f} [{ba[1]:.3f}-{ba[2]:.3f}]{'':9} {acc[0]:.3f} [{acc[1]:.3f}-{acc[2]:.3f}]")
        figures[name] = {"wall_s": round(seconds, 1), "model_calls": calls, "mean_balanced_accuracy": ba, "mean_numeric_accuracy": acc,
                         "verification": (report or {}).get("verification")}
    for name, (leg_job, answers, report, _) in legs.items():
        if name == "lexical":
            continue
        mine = per_note_correct(leg_job, answers, labels)
        worse = {q: sum(1 for n, ok in base[q].items() if ok and not mine[q].get(n, False)) for q in base}
        better = {q: sum(1 for n, ok in mine[q].items() if ok and not base[q].get(n, False)) for q in mine}
        changed = {q: (better[q], worse[q]) for q in base if worse[q] or better[q]}
        worst = max((w - better[q] for q, w in worse.items()), default=0)
        print(f"\n{name} vs lexical, per question (notes right only here, notes right only with the cues): "
              f"{json.dumps(changed) if changed else 'identical on every question'}; worst net: {worst} note(s)")
        print(f"{name} verification: {json.dumps(report['verification'])}")
        figures[name]["per_question_vs_lexical"] = changed
        figures[name]["worst_net_notes_worse"] = worst
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

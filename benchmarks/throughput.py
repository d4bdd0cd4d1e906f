"""Throughput benchmark (run on demand, not in CI): the same model, notes and questions, several ways, one process.

  1. plain processor   - `ray.data.llm.build_processor` as Ray's documentation shows it: one row per
                         (note, question), the whole prompt per row, the same JSON-schema constraint; the notes
                         read with `read_parquet` and expanded with `flat_map` ("Parquet in"), and the same rows
                         built in Python and passed to `from_items` ("rows in": many small blocks, kinder to it)
  2. engine, model     - `run_job` with extraction.mode model: every pair to the model (prefix sharing on, KV
                         block 32 on CPU, short suffixes)
  3. engine, no prefix - the same with model.enable_prefix_caching false
  4. engine, hybrid    - the job's own extraction settings (cues first, the model only where it can answer)
  5. engine, lexical   - cues only, no model
  6. engine, no constraint - model mode without the answer grammar: the constraint's own cost (and how many
                         free-text answers then fail the schema)

Prints (note, question) pairs per second (steady state: busy time, start-up excluded, and wall time including
start-up), model calls, prompt tokens computed, the ratios against the plain processor and against model-only,
and, with --labels, each engine run's `engine eval` summary (mean balanced accuracy of yes/no questions, mean
numeric accuracy) on the same notes.

    .venv/bin/python benchmarks/throughput.py --notes 24 --labels data/sample_gold.parquet
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_engine(job, notes: int, output: Path, prefix: bool, extraction: dict, labels: str | None,
               constrained: bool = True) -> dict:
    from engine.run import run_job

    model = job.model.model_copy(update={"enable_prefix_caching": prefix, "constrained_decoding": constrained})
    extraction = job.extraction.model_copy(update=extraction)
    job = job.model_copy(update={"model": model, "extraction": extraction,
                                 "output": job.output.model_copy(update={"uri": str(output)})})
    started = time.perf_counter()
    report, _ = run_job(job, limit=notes, overwrite=True)
    wall = time.perf_counter() - started
    result = {"pairs": report["rows"], "model_calls": report["model_outputs"], "steady_pairs_per_s": report["pairs_per_second"],
              "wall_s": wall, "startup_s": report["startup_seconds"], "computed_prompt_tokens": report["computed_prompt_tokens"],
              "prompt_tokens": report["prompt_tokens"], "completion_tokens": report["completion_tokens"],
              "schema_valid_rate": report["schema_valid_rate"], "completion_tokens_per_answer": report["completion_tokens_per_answer"]}
    if labels:
        result.update(_eval_summary(job, output, labels))
    return result


def _eval_summary(job, output: Path, labels: str) -> dict:
    from engine.reporting.evaluate import evaluate_run

    evaluation, _, _ = evaluate_run(job, str(output), labels, output=str(output))
    overall = {row["metric"]: row["value"] for row in evaluation.table.to_pylist() if row["metric"].startswith("mean_")}
    return {"mean_balanced_accuracy": overall.get("mean_balanced_accuracy"), "mean_numeric_accuracy": overall.get("mean_accuracy")}


def run_plain_processor(job, notes: int, source: str = "parquet") -> dict:
    """What a user writes from Ray's docs: build_processor over (note, question) rows.

    source "parquet": the notes read with `ray.data.read_parquet` and a `flat_map` to one row per question (a user
    whose notes are in Parquet); "items": the rows built in Python and handed over with `ray.data.from_items`, which
    splits them into many small blocks (kinder to the processor than a user's Parquet file, which is one block).
    """
    import pyarrow.parquet as pq
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from engine.backends.vllm import CPU_BLOCK_SIZE, cpu_dtype
    from engine.models import resolve_model
    from engine.plan import make_plan
    from engine.prompt import render_messages

    plan = make_plan(job)
    schemas = {q.id: q.json_schema for q in plan.questions}
    by_id = plan.by_id
    question_ids = [q.id for q in plan.questions]
    if source == "items":
        table = pq.read_table(job.input.uri).slice(0, notes).to_pylist()
        dataset = ray.data.from_items([{"text": n["text"], "question_id": q} for n in table if (n["text"] or "").strip() for q in question_ids])
    else:
        dataset = (ray.data.read_parquet(job.input.uri, columns=["text"]).limit(notes)
                   .filter(lambda row: bool((row["text"] or "").strip()))
                   .flat_map(lambda row: [{"text": row["text"], "question_id": q} for q in question_ids]))
    config = vLLMEngineProcessorConfig(
        model_source=resolve_model(job.model.name),
        engine_kwargs=dict(max_model_len=job.model.max_model_len, dtype=cpu_dtype(), enforce_eager=True,
                           enable_prefix_caching=True, block_size=CPU_BLOCK_SIZE,
                           structured_outputs_config=dict(backend="xgrammar", disable_any_whitespace=True)),
        concurrency=1, batch_size=16, placement_group_config=dict(bundle_per_worker={"CPU": 1}), log_engine_metrics=False,
        runtime_env=dict(env_vars={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}),
    )
    processor = build_processor(
        config,
        preprocess=lambda row: dict(
            messages=render_messages(row["text"], by_id[row["question_id"]]),
            sampling_params=dict(temperature=0.0, max_tokens=job.model.max_tokens,
                                 # as a string: Ray Data stores rows as Arrow, which merges the dicts of different
                                 # schemas into one struct, nulls included, and xgrammar rejects the result
                                 structured_outputs=dict(json=json.dumps(schemas[row["question_id"]]))),
        ),
        postprocess=lambda row: dict(question_id=row["question_id"], answer=row["generated_text"],
                                     prompt_tokens=row.get("num_input_tokens", 0), completion_tokens=row.get("num_generated_tokens", 0)),
    )
    started = time.perf_counter()
    out = processor(dataset).materialize()
    wall = time.perf_counter() - started
    result = out.to_pandas()
    return {"pairs": len(result), "model_calls": len(result), "steady_pairs_per_s": None, "wall_s": wall, "computed_prompt_tokens": None,
            "prompt_tokens": int(result["prompt_tokens"].sum()), "completion_tokens": int(result["completion_tokens"].sum())}


PLAIN_MAX_CHARS = 12_000


def fitting_notes(job, notes: int, path: Path):
    """The first `notes` non-blank notes short enough for the plain processor: written from Ray's docs it has no
    truncation, and one note over the context (the bundled sample has one of 12,000+ characters) fails its whole
    dataset (VLLMValidationError: 'your prompt contains 4865 input tokens'); the engine truncates such notes and
    marks them. Blank notes are left out so that every run answers the same pairs (the engine would answer a blank
    note's questions without the model)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(ROOT / job.input.uri if not Path(job.input.uri).is_absolute() else job.input.uri)
    length = pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(table["text"], "")))
    short = table.filter(pc.and_(pc.greater(length, 0), pc.less_equal(length, PLAIN_MAX_CHARS))).slice(0, notes)
    pq.write_table(short, path)
    return job.model_copy(update={"input": job.input.model_copy(update={"uri": str(path), "limit": None})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(ROOT / "jobs" / "apixaban.yaml"))
    parser.add_argument("--notes", type=int, default=8)
    parser.add_argument("--labels", default=None, help="gold labels (long format) for an eval summary per engine run")
    parser.add_argument("--skip", action="append", default=[], choices=["plain", "plain-items", "model", "noprefix", "hybrid", "hybrid-candidates", "lexical", "unconstrained"])
    args = parser.parse_args()

    from engine.job import load_job
    from engine.runtime import ensure_ray

    job = load_job(args.job)
    ensure_ray()
    scratch = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    job = fitting_notes(job, args.notes, scratch / "notes.parquet")
    runs = [("engine, model", "model", True, {"mode": "model"}),
            ("engine, model, prefix cache off", "noprefix", False, {"mode": "model"}),
            ("engine, hybrid (job's settings)", "hybrid", True, {"mode": "hybrid"}),
            ("engine, hybrid, every candidate", "hybrid-candidates", True, {"mode": "hybrid", "ask_model": "candidates"}),
            ("engine, lexical (no model)", "lexical", True, {"mode": "lexical"}),
            ("engine, model, no constraint", "unconstrained", True, {"mode": "model"})]
    results = {}
    try:
        for key, source, name in (("plain", "parquet", PLAIN), ("plain-items", "items", PLAIN_ITEMS)):
            if key not in args.skip:
                results[name] = run_plain_processor(job, args.notes, source)
                print("RESULT", json.dumps(results), flush=True)
        for name, key, prefix, extraction in runs:
            if key not in args.skip:
                results[name] = run_engine(job, args.notes, scratch / key, prefix, extraction, args.labels,
                                           constrained=key != "unconstrained")
                print("RESULT", json.dumps(results), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(results, args.notes, job)


PLAIN = "plain processor, Parquet in"
PLAIN_ITEMS = "plain processor, rows in"


def print_table(results: dict, notes: int, job) -> None:
    base = results.get(PLAIN) or results.get(PLAIN_ITEMS)
    model_only = results.get("engine, model")
    print(f"\n{notes} notes x {len(job.questions)} questions, model {job.model.name}, extraction {job.extraction.model_dump()}")
    print(f"{'run':32} {'pairs':>6} {'model calls':>11} {'wall s':>8} {'pairs/s wall':>13} {'pairs/s steady':>15} "
          f"{'computed tok':>12} {'vs plain':>9} {'vs model':>9} {'mean BA':>8} {'num acc':>8}")
    for name, r in results.items():
        wall_rate = r["pairs"] / r["wall_s"]
        vs_plain = f"{wall_rate / (base['pairs'] / base['wall_s']):.2f}x" if base else "-"
        vs_model = f"{r['steady_pairs_per_s'] / model_only['steady_pairs_per_s']:.2f}x" if model_only and r["steady_pairs_per_s"] else "-"
        steady = f"{r['steady_pairs_per_s']:.2f}" if r["steady_pairs_per_s"] else "-"
        computed = f"{r['computed_prompt_tokens']:,}" if r["computed_prompt_tokens"] is not None else "-"
        ba = f"{r['mean_balanced_accuracy']:.3f}" if r.get("mean_balanced_accuracy") is not None else "-"
        acc = f"{r['mean_numeric_accuracy']:.3f}" if r.get("mean_numeric_accuracy") is not None else "-"
        print(f"{name:32} {r['pairs']:>6} {r['model_calls']:>11} {r['wall_s']:>8.1f} {wall_rate:>13.2f} {steady:>15} "
              f"{computed:>12} {vs_plain:>9} {vs_model:>9} {ba:>8} {acc:>8}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

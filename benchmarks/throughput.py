"""Throughput benchmark (run on demand, not in CI): the same model, notes and questions, three ways, one process.

  1. engine            - `run_job` as users run it (prefix sharing on, KV block 32 on CPU, short suffixes)
  2. engine, no prefix - the same with model.enable_prefix_caching false
  3. plain processor   - `ray.data.llm.build_processor` as Ray's documentation shows it: one row per
                         (note, question), the whole prompt per row, the same JSON-schema constraint

Prints (note, question) pairs per second (steady state: the model's busy time, start-up excluded, and wall time
including start-up), prompt tokens computed, and the ratios against the plain processor.

    .venv/bin/python benchmarks/throughput.py --notes 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_engine(job, notes: int, output: Path, prefix: bool) -> dict:
    from engine.pipeline import run_job

    model = job.model.model_copy(update={"enable_prefix_caching": prefix})
    job = job.model_copy(update={"model": model, "output": job.output.model_copy(update={"uri": str(output)})})
    started = time.perf_counter()
    report, _ = run_job(job, limit=notes, overwrite=True)
    wall = time.perf_counter() - started
    return {"pairs": report["model_outputs"], "steady_pairs_per_s": report["pairs_per_second"], "wall_s": wall,
            "computed_prompt_tokens": report["computed_prompt_tokens"], "prompt_tokens": report["prompt_tokens"],
            "completion_tokens": report["completion_tokens"]}


def run_plain_processor(job, notes: int) -> dict:
    """What a user writes from Ray's docs: build_processor over (note, question) rows."""
    import pyarrow.parquet as pq
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from engine.backends.vllm import CPU_BLOCK_SIZE, cpu_dtype
    from engine.models import resolve_model
    from engine.plan import make_plan
    from engine.stages.prompt import render_messages

    plan = make_plan(job)
    table = pq.read_table(ROOT / job.input.uri).slice(0, notes).to_pylist()
    rows = [{"text": n["text"], "question_id": q.id} for n in table if (n["text"] or "").strip() for q in plan.questions]
    schemas = {q.id: q.json_schema for q in plan.questions}
    by_id = plan.by_id
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
                                 structured_outputs=dict(json=schemas[row["question_id"]])),
        ),
        postprocess=lambda row: dict(question_id=row["question_id"], answer=row["generated_text"],
                                     prompt_tokens=row.get("num_input_tokens", 0), completion_tokens=row.get("num_generated_tokens", 0)),
    )
    started = time.perf_counter()
    out = processor(ray.data.from_items(rows)).materialize()
    wall = time.perf_counter() - started
    result = out.to_pandas()
    return {"pairs": len(result), "steady_pairs_per_s": None, "wall_s": wall, "computed_prompt_tokens": None,
            "prompt_tokens": int(result["prompt_tokens"].sum()), "completion_tokens": int(result["completion_tokens"].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(ROOT / "jobs" / "apixaban.yaml"))
    parser.add_argument("--notes", type=int, default=8)
    parser.add_argument("--skip-plain", action="store_true")
    args = parser.parse_args()

    from engine.job import load_job
    from engine.runtime import ensure_ray

    job = load_job(args.job)
    ensure_ray()
    scratch = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    results = {}
    try:
        if not args.skip_plain:
            results["plain ray.data.llm processor"] = run_plain_processor(job, args.notes)
            print("RESULT", json.dumps(results), flush=True)
        results["engine"] = run_engine(job, args.notes, scratch / "engine", prefix=True)
        print("RESULT", json.dumps(results), flush=True)
        results["engine, prefix cache off"] = run_engine(job, args.notes, scratch / "noprefix", prefix=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = results.get("plain ray.data.llm processor")
    print(f"\n{args.notes} notes x {len(job.questions)} questions, model {job.model.name}")
    print(f"{'run':32} {'pairs':>6} {'wall s':>8} {'pairs/s wall':>13} {'pairs/s steady':>15} {'prompt tok':>11} {'computed':>9} {'vs plain (wall)':>16}")
    for name, r in results.items():
        wall_rate = r["pairs"] / r["wall_s"]
        ratio = f"{wall_rate / (base['pairs'] / base['wall_s']):.2f}x" if base else "-"
        steady = f"{r['steady_pairs_per_s']:.2f}" if r["steady_pairs_per_s"] else "-"
        computed = f"{r['computed_prompt_tokens']:,}" if r["computed_prompt_tokens"] is not None else "-"
        print(f"{name:32} {r['pairs']:>6} {r['wall_s']:>8.1f} {wall_rate:>13.2f} {steady:>15} {r['prompt_tokens']:>11,} {computed:>9} {ratio:>16}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

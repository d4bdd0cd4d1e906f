"""The in-process vLLM actor against model.backend openai talking to `vllm serve` of the same model, same machine.

Run on demand, not in CI. Each leg is `run_job` over the same notes and questions in extraction mode model (every
pair to the model): first the engine's own vLLM actor, then the same job with backend openai against vLLM's
OpenAI-compatible server started here on 127.0.0.1 with the engine's settings (xgrammar without free whitespace,
prefix caching, KV blocks of 32, the same dtype, KV cache and max_num_seqs), the server stopped before the next
leg so the two never share the cores. Prints (note, question) pairs per second at steady state (the model actors'
busy time, start-up excluded) and over the wall (start-up included; the server's own start is timed apart), the
tokens, and how many answers the two legs share (same prompt tokens, greedy decoding, same grammar: they should
all agree).

    .venv/bin/python benchmarks/openai_backend.py --model tiny --notes 8 --repeats 2
    .venv/bin/python benchmarks/openai_backend.py --model embedded --notes 4 --max-concurrency 128 --timeout-s 900
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_model.py (the test suite's model) and vllm_server.py (vllm serve)

COMPARED_COLUMNS = ["note_id", "question_id", "status", "value_bool", "value_num", "unit", "value_date", "value_text", "evidence"]


def job_for_model(which: str, workdir: Path):
    """The apixaban job in extraction mode model on the tiny random model (as the e2e tests use it) or the embedded
    SmolLM2-135M; the folder vLLM loads and the dtype the in-process engine would pick on this CPU."""
    from engine.backends.vllm import cpu_dtype
    from engine.job import EMBEDDED_MODEL, load_job
    from engine.models import resolve_model

    job = load_job(ROOT / "jobs" / "apixaban.yaml")
    if which == "tiny":
        from tiny_model import build_tiny_model

        folder = build_tiny_model(workdir / "tiny-model")
        model = job.model.model_copy(update={"name": str(folder), "max_model_len": 2048, "evidence_max_chars": 24, "max_tokens": 64})
    else:
        folder = Path(resolve_model(EMBEDDED_MODEL))
        model = job.model
    job = job.model_copy(update={"model": model, "extraction": job.extraction.model_copy(update={"mode": "model"})})
    return job, folder, cpu_dtype()


def run_leg(job, notes: int, output: Path) -> dict:
    from engine.run import run_job
    from engine.store.answers import read_answers

    job = job.model_copy(update={"output": job.output.model_copy(update={"uri": str(output)})})
    started = time.perf_counter()
    report, stats = run_job(job, limit=notes, overwrite=True)
    wall = time.perf_counter() - started
    answers = read_answers(str(output)).select(COMPARED_COLUMNS).sort_by([("note_id", "ascending"), ("question_id", "ascending")])
    return {"pairs": report["rows"], "wall_s": round(wall, 1), "startup_s": report["startup_seconds"],
            "steady_pairs_per_s": report["pairs_per_second"], "wall_pairs_per_s": round(report["rows"] / wall, 3),
            "prompt_tokens": report["prompt_tokens"], "cached_prompt_tokens": report["cached_prompt_tokens"],
            "completion_tokens": report["completion_tokens"], "schema_valid_rate": report["schema_valid_rate"],
            "errors": report["rows_by_status"]["error"], "server_unavailable_rows": report.get("server_unavailable_rows"),
            "answers": answers.to_pylist()}


def served(job, server, max_concurrency: int, timeout_s: float):
    model = job.model.model_copy(update={"backend": "openai", "base_url": server.base_url, "api_key_env": None,
                                         "max_concurrency": max_concurrency, "timeout_s": timeout_s})
    return job.model_copy(update={"model": model})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--notes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="in-process then server, this many times")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="model.timeout_s: with many requests in flight on "
                        "a slow CPU each one lasts about as long as the whole batch; give it that")
    args = parser.parse_args()

    from engine.runtime import ensure_ray
    from vllm_server import VLLMServer

    work = Path(tempfile.mkdtemp(prefix="openai-bench-"))
    job, folder, dtype = job_for_model(args.model, work)
    ensure_ray()
    results: list[dict] = []
    for repeat in range(args.repeats):
        inproc = run_leg(job, args.notes, work / f"inprocess-{repeat}")
        server = VLLMServer(folder, work / f"serve-{repeat}.log", max_model_len=job.model.max_model_len,
                            served_name=job.model.name, dtype=dtype, max_num_seqs=job.model.max_num_seqs)
        started = time.perf_counter()
        server.start()
        server_start = round(time.perf_counter() - started, 1)
        try:
            remote = run_leg(served(job, server, args.max_concurrency, args.timeout_s), args.notes, work / f"server-{repeat}")
        finally:
            server.stop()
        same = sum(a == b for a, b in zip(inproc.pop("answers"), remote.pop("answers")))
        results.append({"repeat": repeat, "in_process": inproc, "openai_server": remote | {"server_start_s": server_start},
                        "same_answers": same, "pairs": inproc["pairs"]})
        print("RESULT", json.dumps(results[-1]), flush=True)
    print_table(results, args, job, dtype)


def print_table(results: list[dict], args, job, dtype: str) -> None:
    load = os.getloadavg()[0]
    print(f"\n{args.notes} notes x {len(job.questions)} questions, extraction model, model {job.model.name} ({dtype}), "
          f"max_concurrency {args.max_concurrency}, {os.cpu_count()} CPU cores, load average {load:.1f}")
    print(f"{'leg':28} {'pairs':>6} {'pairs/s steady':>15} {'pairs/s wall':>13} {'wall s':>7} {'start-up s':>11} "
          f"{'prompt tok':>11} {'cached':>9} {'completion':>11} {'valid':>6} {'same answers':>13}")
    for r in results:
        for name, leg in (("in-process vLLM actor", r["in_process"]), ("openai -> vllm serve", r["openai_server"])):
            startup = f"{leg['startup_s']}" + (f" +{leg['server_start_s']}" if "server_start_s" in leg else "")
            print(f"{name + ' #' + str(r['repeat'] + 1):28} {leg['pairs']:>6} {leg['steady_pairs_per_s']:>15} "
                  f"{leg['wall_pairs_per_s']:>13} {leg['wall_s']:>7} {startup:>11} {leg['prompt_tokens']:>11} "
                  f"{leg['cached_prompt_tokens']:>9} {leg['completion_tokens']:>11} {leg['schema_valid_rate']!s:>6} "
                  f"{str(r['same_answers']) + '/' + str(r['pairs']):>13}")


if __name__ == "__main__":
    main()

"""Run report: counts from the committed answers, time and cost from this run's measured throughput."""

from __future__ import annotations

import os
import platform
import time

import pyarrow as pa
import pyarrow.compute as pc

from engine import __version__
from engine.job import JobSpec

STATUSES = ("answered", "not_in_note", "error")
TOP_ERRORS = 10
UNPARSED_ERRORS = "does not match the answer schema|reached model.max_tokens|returned no output"


def hardware_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = 0
    try:
        import ray

        if ray.is_initialized():
            gpus = int(ray.cluster_resources().get("GPU", 0))
    except ImportError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpus} GPU"


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column.drop_null()) if len(column) else []
    return {row["values"]: int(row["counts"]) for row in (counts.to_pylist() if len(column) else [])}


def _sum(table: pa.Table, name: str) -> int:
    value = pc.sum(table[name]).as_py() if table.num_rows else 0
    return int(value or 0)


def build_report(job: JobSpec, answers: pa.Table, patients: pa.Table, funnel: list[dict], stats, store) -> dict:
    """report.json: the keys of issue 2 are stable; later additions extend, never rename."""
    by_status = {status: 0 for status in STATUSES} | _counts(answers["status"])
    errors = answers.filter(pc.equal(answers["status"], "error"))
    top_errors = sorted(_counts(errors["error"]).items(), key=lambda kv: -kv[1])[:TOP_ERRORS]
    prompt, cached, completion = (_sum(answers, n) for n in ("prompt_tokens", "cached_tokens", "completion_tokens"))
    generated = int(pc.sum(pc.greater(answers["completion_tokens"].fill_null(0), 0)).as_py() or 0) if answers.num_rows else 0
    notes = answers["note_id"].unique()
    model_outputs = answers.filter(pc.is_valid(answers["completion_tokens"]))
    unparsed = model_outputs.filter(pc.and_(pc.equal(model_outputs["status"], "error"),
                                            pc.match_substring_regex(model_outputs["error"].fill_null(""), UNPARSED_ERRORS)))
    timing = _timing(job, stats, store)
    return {
        "job": job.name,
        "job_fingerprint": job.fingerprint(),
        "engine_version": __version__,
        "backend": job.model.backend,
        "model": job.model.name,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": len(notes),
        "patients": len(answers["patient_id"].unique()),
        "questions": len(job.questions),
        "rows": answers.num_rows,
        "rows_by_status": by_status,
        "top_errors": [{"error": e, "rows": n} for e, n in top_errors],
        "notes_truncated": len(answers.filter(pc.fill_null(answers["truncated"], False))["note_id"].unique()),
        "grounding": {k: v for k, v in _counts(answers["grounding"]).items()},
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "computed_prompt_tokens": prompt - cached,
        "prefix_cache_hit_rate": round(cached / prompt, 4) if prompt else None,
        "completion_tokens": completion,
        "completion_tokens_per_answer": round(completion / generated, 2) if generated else None,
        "model_outputs": model_outputs.num_rows,
        "schema_valid_rate": round(1 - unparsed.num_rows / model_outputs.num_rows, 6) if model_outputs.num_rows else None,
        "cohort": {"status": _counts(patients["status"]) if "status" in patients.column_names else {}, "funnel": funnel},
        **timing,
    }


def _timing(job: JobSpec, stats, store) -> dict:
    """Wall time of this run; cost per 10k patients from the engines' measured busy time (start-up excluded, stated)."""
    if stats.pairs_processed == 0:  # nothing new: keep the figures measured when the answers were produced
        previous = store._read_json("report.json") or {}
        keys = ("wall_seconds", "startup_seconds", "processing_seconds", "seconds_per_pair", "pairs_per_second", "wall_pairs_per_second",
                "hardware", "usd_per_hour", "cost_per_10k_patients_usd", "cost_method")
        return {k: previous.get(k) for k in keys} | {"this_run": _this_run(stats)}
    wall = (stats.finished or time.time()) - stats.started
    startup = (stats.first_result or stats.started) - stats.started
    # Busy time of the model actors, summed inside them, divided by how many ran side by side.
    processing = max(stats.engine_seconds / max(stats.actors, 1), 1e-9)
    patients = max(len(stats.patients_processed), 1)
    cost = processing / 3600 * job.pricing.usd_per_hour / patients * 10_000
    return {
        "wall_seconds": round(wall, 2),
        "startup_seconds": round(startup, 2),
        "processing_seconds": round(processing, 2),
        "seconds_per_pair": round(processing / stats.pairs_processed, 4),
        "pairs_per_second": round(stats.pairs_processed / processing, 3),
        "wall_pairs_per_second": round(stats.pairs_processed / wall, 3),
        "hardware": f"{job.pricing.hardware} [{hardware_description()}]",
        "usd_per_hour": job.pricing.usd_per_hour,
        "cost_per_10k_patients_usd": round(cost, 4),
        "cost_method": (
            f"processing_seconds ({processing:.1f} s: busy time of the {stats.actors} model actor(s), measured inside "
            f"them, start-up excluded) "
            f"/ 3600 x ${job.pricing.usd_per_hour}/h / {patients} patients x 10,000; "
            f"{len(job.questions)} questions per note, {stats.notes_processed} notes this run"
        ),
        "this_run": _this_run(stats),
    }


def _this_run(stats) -> dict:
    return {
        "shards_total": stats.shards_total,
        "shards_resumed": stats.shards_resumed,
        "shards_committed": stats.shards_committed,
        "notes_processed": stats.notes_processed,
        "pairs_processed": stats.pairs_processed,
    }

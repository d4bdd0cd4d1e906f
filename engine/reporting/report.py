"""Run report: counts from the committed answers, time and cost from this run's measured throughput."""

from __future__ import annotations

import os
import platform
import time

import pyarrow as pa
import pyarrow.compute as pc

from engine import __version__
from engine.backends.base import SERVER_UNAVAILABLE
from engine.job import JobSpec

STATUSES = ("answered", "not_in_note", "error")
TOP_ERRORS = 10


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


def build_report(job: JobSpec, answers, patients: pa.Table, funnel: list[dict], stats, store, totals: dict | None = None) -> dict:
    """report.json: the keys of issue 2 are stable; later additions extend, never rename.

    `answers` is a table or the committed files (a pyarrow dataset): the counts are SQL aggregates over it
    (engine.store.answers.answer_totals; pass `totals` when they are already counted, as run_job does for the page).
    """
    from engine.store.answers import answer_totals

    totals = totals or answer_totals(answers, patients if "n_notes" in patients.column_names else None)
    by_status = {status: 0 for status in STATUSES} | totals["by_status"]
    top_errors = list(totals["errors"].items())[:TOP_ERRORS]
    prompt, cached, completion = totals["prompt_tokens"], totals["cached_tokens"], totals["completion_tokens"]
    generated, model_outputs = totals["generated"], totals["model_outputs"]
    timing = _timing(job, stats, store)
    return {
        "job": job.name,
        "job_fingerprint": job.fingerprint(),
        "engine_version": __version__,
        "backend": job.model.backend,
        "model": job.model.name,
        "adapter": job.model.adapter,  # the LoRA adapter served on top of `model` (engine train), or null
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": totals["notes"],
        "limit": getattr(stats, "limit", None),  # the run's --limit (or input.limit); null: the whole input
        "notes_in_input": getattr(stats, "notes_in_input", None),  # rows in the input, those past the limit too
        "patients": totals["patients"],
        "questions": len(job.questions),
        "rows": totals["rows"],
        "rows_by_status": by_status,
        "rows_by_route": totals["by_route"],
        "model_calls_saved": _calls_saved(totals["by_route"]),
        "top_errors": [{"error": e, "rows": n} for e, n in top_errors],
        # rows whose model server could not be reached after retries (backend openai); a re-run asks them again
        "server_unavailable_rows": sum(n for e, n in totals["errors"].items() if e.startswith(SERVER_UNAVAILABLE)),
        "notes_truncated": totals["notes_truncated"],
        "grounding": totals["grounding"],
        "verification": _verification(job, totals, patients),
        "answers_by_question": totals["by_question"],  # rows per question: yes, no, value, not_in_note, error
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "computed_prompt_tokens": prompt - cached,
        "prefix_cache_hit_rate": round(cached / prompt, 4) if prompt else None,
        "completion_tokens": completion,
        "completion_tokens_per_answer": round(completion / generated, 2) if generated else None,
        "model_outputs": model_outputs,
        "schema_valid_rate": round(1 - totals["unparsed"] / model_outputs, 6) if model_outputs else None,
        "cohort": cohort_section(patients, funnel),
        **_windows(job, patients),
        **_review(job, answers, patients),
        **timing,
        **_cost_basis(job, totals),
    }


def cached_prompt_price(pricing) -> float:
    """USD per million cached prompt tokens: their own price, else the prompt tokens' price."""
    cached = pricing.usd_per_million_cached_prompt_tokens
    return pricing.usd_per_million_prompt_tokens if cached is None else cached


def token_cost(pricing, prompt: int, cached: int, completion: int) -> float:
    """USD for these tokens at the job's prices per million; `prompt` counts all prompt tokens, `cached` among them."""
    return ((prompt - cached) * pricing.usd_per_million_prompt_tokens + cached * cached_prompt_price(pricing)
            + completion * pricing.usd_per_million_completion_tokens) / 1_000_000


def _cost_basis(job: JobSpec, totals: dict) -> dict:
    """backend openai: cost from the server's tokens (all answers in the output, so a resumed or redone run is priced
    whole), which replaces the hardware-hour figure in cost_per_10k_patients_usd. Other backends: hardware hours."""
    if job.model.backend != "openai":
        return {"cost_basis": "gpu_hours", "token_cost_usd": None}
    pricing = job.pricing
    prompt, cached, completion = totals["prompt_tokens"], totals["cached_tokens"], totals["completion_tokens"]
    usd = token_cost(pricing, prompt, cached, completion)
    patients = max(totals["patients"], 1)
    cached_price = cached_prompt_price(pricing)
    return {
        "cost_basis": "tokens",
        "token_cost_usd": round(usd, 6),
        "token_prices_usd_per_million": {"prompt": pricing.usd_per_million_prompt_tokens, "cached_prompt": cached_price,
                                         "completion": pricing.usd_per_million_completion_tokens},
        "cost_per_10k_patients_usd": round(usd / patients * 10_000, 4),
        "cost_method": (
            f"tokens: ({prompt - cached:,} computed prompt x ${pricing.usd_per_million_prompt_tokens}/M + {cached:,} cached "
            f"prompt x ${cached_price}/M + {completion:,} completion x ${pricing.usd_per_million_completion_tokens}/M) "
            f"= ${usd:.4f} for the {totals['patients']} patients in the output / {totals['patients']} x 10,000"
        ),
    }


def _calls_saved(by_route: dict[str, int]) -> float | None:
    """Share of routed (note, question) pairs answered without the model (hybrid and lexical extraction)."""
    routed = sum(by_route.values())
    return round(1 - by_route.get("model", 0) / routed, 4) if routed else None


def _verification(job: JobSpec, totals: dict, patients: pa.Table) -> dict:
    """Model answers checked against their notes (engine.stages.verify): passed, failed by category, how many gave
    way to the cue answer (hybrid), and the patients and criteria an unverified answer puts on hold (model mode)."""
    return {
        "model_answers_checked": totals["verified_checked"],
        "passed": totals["verified_passed"],
        "failed": totals["verified_failed"],
        "cue_answer_kept": totals["verified_replaced"],
        "failed_by_reason": totals["verification_failures"],
        **_verification_holds(job, patients),
    }


def _held_by(job: JobSpec, patients: pa.Table, why: str) -> tuple[dict[str, str], pa.Array]:
    """The criteria's `<criterion>__<why>` flag columns of the patient table, and per patient whether any is set."""
    flags = {c.id: f"{c.id}__{why}" for c in job.criteria if f"{c.id}__{why}" in patients.column_names}
    held = pa.array([False] * patients.num_rows)
    for column in flags.values():
        held = pc.or_(held, patients[column].fill_null(False))
    return flags, held


def _verification_holds(job: JobSpec, patients: pa.Table) -> dict:
    """The patients and criteria that unverified model answers hold for review (they follow the rules: `engine
    rules` recounts them)."""
    flags, held = _held_by(job, patients, "unverified")
    return {
        "require_verified_answers": job.review.require_verified_answers,
        "patients_held": int(pc.sum(held).as_py() or 0),
        "criteria_held": {cid: int(pc.sum(patients[col].fill_null(False)).as_py() or 0) for cid, col in flags.items()},
    }


def cohort_section(patients: pa.Table, funnel: list[dict]) -> dict:
    """report.json's `cohort`: patients per status and the funnel (criteria in job order)."""
    return {"status": _status_counts(patients), "funnel": funnel}


def with_rules_cohort(report: dict | None, job: JobSpec, patients: pa.Table, funnel: list[dict]) -> dict:
    """report.json after `engine rules`: the run's figures as they were, `cohort` from the rules just applied (with
    `rules_applied`, when). Without a report.json (e.g. --output to a new folder) a minimal one: job and cohort."""
    report = dict(report) if report else {"job": job.name, "job_fingerprint": job.fingerprint(), "engine_version": __version__,
                                          "patients": patients.num_rows}
    report["cohort"] = cohort_section(patients, funnel) | {"rules_applied": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "verification" in report:  # the answers' counts stay; who is held follows the rules just applied
        report["verification"] = {**report["verification"], **_verification_holds(job, patients)}
    report.pop("windows", None)  # the windows follow the job just applied (a lookback changed needs only engine rules)
    report.update(_windows(job, patients))
    return report


def _windows(job: JobSpec, patients: pa.Table) -> dict:
    """report.json's `windows` (engine.cohort.windows.window_summary), only for a job with an index date or windows:
    per windowed question the notes its window excluded and the undated notes it counted, and the index dates' sources."""
    from engine.cohort.windows import window_summary

    summary = window_summary(patients, job)
    return {"windows": summary} if summary is not None else {}


def _status_counts(patients: pa.Table) -> dict[str, int]:
    if "status" not in patients.column_names or not patients.num_rows:
        return {}
    return {row["values"]: int(row["counts"]) for row in pc.value_counts(patients["status"].drop_null()).to_pylist()}


def _review(job: JobSpec, answers, patients: pa.Table) -> dict:
    """With review.require_grounded_evidence: ungrounded answer rows and the patients and criteria they put on hold."""
    from engine.store.answers import ungrounded_answers

    review = job.review
    if not review.require_grounded_evidence:
        return {}
    flags, held = _held_by(job, patients, "ungrounded")
    review_now = pc.and_(held, pc.equal(patients["status"], "needs_review")) if patients.num_rows else held
    return {"ungrounded": {
        "require_grounded_evidence": True, "accept_fuzzy": review.accept_fuzzy,
        "answers": ungrounded_answers(answers, review.accept_fuzzy),
        "patients": int(pc.sum(held).as_py() or 0),
        "patients_needs_review": int(pc.sum(review_now).as_py() or 0),
        "criteria": {cid: int(pc.sum(patients[col].fill_null(False)).as_py() or 0) for cid, col in flags.items()},
    }}


def _timing(job: JobSpec, stats, store) -> dict:
    """Wall time of this run; cost per 10k patients from the engines' measured busy time (start-up excluded, stated)."""
    if stats.pairs_processed == 0:  # nothing new: keep the figures measured when the answers were produced
        previous = store.read_json("report.json") or {}
        keys = ("wall_seconds", "startup_seconds", "processing_seconds", "seconds_per_pair", "pairs_per_second", "wall_pairs_per_second",
                "hardware", "usd_per_hour", "cost_per_10k_patients_usd", "cost_method")
        return {k: previous.get(k) for k in keys} | {"this_run": this_run_summary(stats)}
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
            f"processing_seconds ({processing:.1f} s: busy time of the {stats.actors} model actor(s) plus the candidate "
            f"stage, measured inside them, start-up excluded) "
            f"/ 3600 x ${job.pricing.usd_per_hour}/h / {patients} patients x 10,000; "
            f"{len(job.questions)} questions per note, {stats.notes_processed} notes this run"
        ),
        "this_run": this_run_summary(stats),
    }


RECOVERY_KEYS = ("model_actor_restarts", "batches_retried", "pairs_retried", "commits_retried", "model_actors_by_node",
                 "batches_by_node", "commits_by_node")


def this_run_summary(stats) -> dict:
    """What this run did, with the work a lost worker or node made it do again: model actors Ray restarted, batches
    run again (in flight on a lost actor, or done but their output lost with its node) and their pairs, commit tasks
    run again; where the model actors started (restarts included), where batches were answered (each try) and where
    shards were committed (by a commit task, or by the actor whose batch held the whole shard)."""
    recovery = getattr(stats, "recovery", None) or {}
    return {
        "shards_total": stats.shards_total,
        "shards_resumed": stats.shards_resumed,
        "shards_committed": stats.shards_committed,
        "notes_processed": stats.notes_processed,
        "pairs_processed": stats.pairs_processed,
        "shards_redone": getattr(stats, "shards_redone", 0),  # committed shards whose server-unavailable rows were asked again
        "pairs_redone": getattr(stats, "pairs_redone", 0),
        "nodes": getattr(stats, "nodes", 1),
        **{key: recovery.get(key, {} if key.endswith("_by_node") else 0) for key in RECOVERY_KEYS},
        "first_retry_at": _iso(recovery.get("first_retry")),  # when work was first begun again (UTC), null: never
        "first_actor_restart_at": _iso(recovery.get("first_restart")),  # when a restarted model actor was first up
    }


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"

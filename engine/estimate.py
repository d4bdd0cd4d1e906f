"""Projected wall time, GPU-hours and dollars for N patients: the job's own token counts x a throughput profile.

time per note = computed prompt tokens / prefill rate + completion tokens / decode rate, where computed prompt
tokens count the note once (prefix cache) plus each question's suffix and the part of the note's last KV block
that is recomputed per question. A profile is either shipped (engine/profiles.yaml, stated estimates) or
measured here by a calibration run on the job's own model and notes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.job import JobSpec
from engine.plan import make_plan
from engine.prompt import render_messages

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
DEFAULT_ANSWER_TOKENS = 20.0
SAMPLE_NOTES = 200


@dataclass(frozen=True)
class Profile:
    name: str
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    usd_per_hour: float
    source: str


@dataclass(frozen=True)
class Workload:
    notes_sampled: int
    note_tokens: float  # mean prompt tokens of the shared prefix (instructions + note)
    suffix_tokens: float  # mean tokens a question adds after the note
    answer_tokens: float  # completion tokens per answer
    answer_tokens_source: str
    notes_per_patient: float
    questions: int
    block_size: int
    tokenizer: str


def shipped_profiles(prices: dict[str, float] | None = None) -> dict[str, Profile]:
    raw = yaml.safe_load(PROFILES_FILE.read_text())["profiles"]
    prices = prices or {}
    return {name: Profile(name, p["prefill_tokens_per_second"], p["decode_tokens_per_second"],
                          prices.get(name, p["usd_per_gpu_hour"]), p["source"]) for name, p in raw.items()}


def measure_workload(job: JobSpec, answer_tokens: float | None = None, block_size: int = 32) -> Workload:
    """Token counts of this job's prompts on a sample of its input notes (the model's tokenizer when available)."""
    from engine.stages.read import plan_input, read_shards

    plan = make_plan(job)
    inputs = plan_input(job.input, notes_per_shard=SAMPLE_NOTES, limit=SAMPLE_NOTES)
    notes = read_shards(job.input, inputs.shards[:1], inputs.schema)
    texts = [t for t, err in zip(notes["text"].to_pylist(), notes["note_error"].to_pylist()) if err is None] or [""]
    count, tokenizer_name = _token_counter(job)
    question = plan.questions[0]
    prefix = [count(_flatten(render_messages(t, question)).split("\nQUESTION: ")[0]) for t in texts]
    suffixes = [count(_flatten(render_messages("", q)).split("\nQUESTION: ")[-1]) + 8 for q in plan.questions]
    patients = len(set(notes["patient_id"].to_pylist())) or 1
    return Workload(
        notes_sampled=len(texts), note_tokens=statistics.fmean(prefix), suffix_tokens=statistics.fmean(suffixes),
        answer_tokens=answer_tokens or DEFAULT_ANSWER_TOKENS,
        answer_tokens_source="measured by an earlier run (report.json)" if answer_tokens else f"assumed {DEFAULT_ANSWER_TOKENS:g} (no run yet)",
        notes_per_patient=notes.num_rows / patients, questions=len(plan.questions), block_size=block_size, tokenizer=tokenizer_name,
    )


def _flatten(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def _token_counter(job: JobSpec):
    try:
        from transformers import AutoTokenizer

        from engine.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(job.model.name))
        return (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])), f"{job.model.name} tokenizer"
    except Exception:  # noqa: BLE001 - no local tokenizer (hub id offline): fall back, and say so
        return (lambda text: max(1, len(text) // 4)), "approximation: 4 characters per token (model tokenizer not available)"


def project(workload: Workload, profile: Profile, patients: int) -> dict:
    """The projection and its arithmetic, line by line."""
    recomputed_tail = workload.block_size / 2
    computed_prompt = workload.note_tokens + workload.questions * (workload.suffix_tokens + recomputed_tail)
    completion = workload.questions * workload.answer_tokens
    seconds_per_note = computed_prompt / profile.prefill_tokens_per_second + completion / profile.decode_tokens_per_second
    notes = patients * workload.notes_per_patient
    gpu_hours = notes * seconds_per_note / 3600
    cost = gpu_hours * profile.usd_per_hour
    return {
        "profile": profile.name, "patients": patients, "notes": round(notes), "seconds_per_note": seconds_per_note,
        "gpu_hours": gpu_hours, "usd": cost, "usd_per_10k_patients": cost / patients * 10_000,
        "arithmetic": [
            f"computed prompt tokens per note = {workload.note_tokens:.0f} (instructions + note, once) + "
            f"{workload.questions} x ({workload.suffix_tokens:.0f} question + {recomputed_tail:.0f} recomputed tail) = {computed_prompt:.0f}",
            f"completion tokens per note = {workload.questions} x {workload.answer_tokens:.1f} = {completion:.0f}",
            f"seconds per note = {computed_prompt:.0f} / {profile.prefill_tokens_per_second:,.0f} + {completion:.0f} / "
            f"{profile.decode_tokens_per_second:,.0f} = {seconds_per_note:.4f}",
            f"notes = {patients:,} patients x {workload.notes_per_patient:.2f} notes/patient = {notes:,.0f}",
            f"GPU-hours = {notes:,.0f} x {seconds_per_note:.4f} / 3600 = {gpu_hours:.3f}",
            f"cost = {gpu_hours:.3f} h x ${profile.usd_per_hour:.2f}/h = ${cost:,.2f}",
        ],
        "source": profile.source,
    }


def calibrate(job: JobSpec, notes: int = 8) -> Profile:
    """Measure prefill and decode rates of the job's own model on this machine (two passes over a few notes)."""
    from vllm import SamplingParams

    from engine.backends import Request
    from engine.backends.vllm import VLLMBackend
    from engine.stages.read import plan_input, read_shards

    plan = make_plan(job)
    inputs = plan_input(job.input, notes_per_shard=notes, limit=notes)
    table = read_shards(job.input, inputs.shards[:1], inputs.schema).to_pylist()
    backend = VLLMBackend(plan)
    requests = [Request(n["note_id"], n["text"], q) for n in table if n["note_error"] is None for q in plan.questions]
    answers_params = dict(backend.sampling)
    backend.sampling = {k: SamplingParams(temperature=0.0, max_tokens=1) for k in answers_params}
    started = time.perf_counter()
    prefill = backend.generate(requests)
    prefill_seconds = time.perf_counter() - started
    computed = sum(g.prompt_tokens - g.cached_tokens for g in prefill)
    backend.close()
    backend = VLLMBackend(plan)  # fresh cache, full answers
    started = time.perf_counter()
    full = backend.generate(requests)
    total_seconds = time.perf_counter() - started
    decode_tokens = sum(g.completion_tokens for g in full)
    decode_seconds = max(total_seconds - prefill_seconds, 1e-6)
    return Profile("measured", computed / prefill_seconds, decode_tokens / decode_seconds, job.pricing.usd_per_hour,
                   f"calibrated here: {len(requests)} pairs, {computed} computed prompt tokens in {prefill_seconds:.1f} s, "
                   f"{decode_tokens} completion tokens in {decode_seconds:.1f} s extra")


# --- distillation (one-off): teacher tokens and LoRA training GPU-hours, as the reference study reported ----------

PROFILE_PARAMS_B = 8.0  # the shipped profiles are for an 8B model
LORA_PASS_FACTOR = 2.0  # a LoRA step per token: forward (2N FLOPs) + activation gradients (2N); frozen weights get none
DEFAULT_DISTILL_EXAMPLES = 10_000


@dataclass(frozen=True)
class Distillation:
    examples: int  # training examples
    tokens_per_example: float  # prompt + answer tokens
    epochs: float
    teacher_requests: int
    teacher_prompt_tokens: float
    teacher_completion_tokens: float
    source: str
    measured: str | None = None  # what this machine's own training run took, from train.json


def distillation_workload(workload: Workload, synth_dir: Path | None = None, adapter_dir: Path | None = None,
                          examples: int | None = None, epochs: float = 1.0, teacher: bool = True) -> Distillation:
    """The distillation's token counts: from an `engine synth` card (and an `engine train` card) when there is one,
    otherwise `examples` windows shaped like the job's own prompts, each labelled once by a teacher."""
    train_card = _card(adapter_dir, "train.json")
    if synth_dir is None and train_card.get("data"):
        synth_dir = Path(train_card["data"])
    synth_card = _card(synth_dir, "synth.json")
    measured = None
    if train_card.get("tokens"):
        measured = (f"measured by `engine train` ({adapter_dir}): {train_card['tokens']:,} tokens in {train_card['seconds']:,.0f} s, "
                    f"{train_card['tokens_per_second']:,.0f} tokens/s on {train_card.get('device', 'cpu')}, {train_card['steps']} steps")
        settings = train_card.get("settings", {})
        seen = train_card["steps"] * settings.get("batch_size", 1) * settings.get("gradient_accumulation", 1)
        epochs = seen / max(train_card.get("examples") or 1, 1)
    if synth_card.get("train"):
        n = synth_card["train"]["examples"]
        per_example = synth_card["train"]["prompt_tokens"] / max(n, 1) + workload.answer_tokens
        usage = synth_card.get("teacher_usage") or {}
        return Distillation(n, per_example, epochs, usage.get("requests", 0), usage.get("prompt_tokens", 0),
                            usage.get("completion_tokens", 0), f"engine synth card ({synth_dir / 'synth.json'})", measured)
    n = examples or DEFAULT_DISTILL_EXAMPLES
    per_example = workload.note_tokens + workload.suffix_tokens + workload.answer_tokens
    requests = n if teacher else 0
    return Distillation(n, per_example, epochs, requests, requests * (per_example - workload.answer_tokens),
                        requests * workload.answer_tokens,
                        f"assumed: {n:,} examples shaped like this job's prompts, each labelled by the teacher once", measured)


def _card(folder: Path | None, name: str) -> dict:
    import json

    if folder is None or not (Path(folder) / name).exists():
        return {}
    return json.loads((Path(folder) / name).read_text(encoding="utf-8"))


def project_distillation(d: Distillation, profile: Profile, teacher_params_b: float, student_params_b: float = PROFILE_PARAMS_B) -> dict:
    """Teacher inference and LoRA training on one GPU of `profile` (an 8B profile, scaled by parameter count)."""
    teacher_scale = teacher_params_b / PROFILE_PARAMS_B
    student_scale = student_params_b / PROFILE_PARAMS_B
    teacher_seconds = (d.teacher_prompt_tokens / profile.prefill_tokens_per_second
                       + d.teacher_completion_tokens / profile.decode_tokens_per_second) * teacher_scale
    train_tokens = d.examples * d.tokens_per_example * d.epochs
    train_rate = profile.prefill_tokens_per_second / (LORA_PASS_FACTOR * student_scale)
    train_seconds = train_tokens / train_rate
    teacher_hours, train_hours = teacher_seconds / 3600, train_seconds / 3600
    usd = (teacher_hours + train_hours) * profile.usd_per_hour
    return {
        "profile": profile.name, "teacher_tokens": d.teacher_prompt_tokens + d.teacher_completion_tokens,
        "teacher_gpu_hours": teacher_hours, "train_tokens": train_tokens, "train_gpu_hours": train_hours,
        "gpu_hours": teacher_hours + train_hours, "usd": usd,
        "arithmetic": [
            f"teacher tokens = {d.teacher_prompt_tokens:,.0f} prompt + {d.teacher_completion_tokens:,.0f} completion "
            f"({d.teacher_requests:,} requests)",
            f"teacher GPU-hours = ({d.teacher_prompt_tokens:,.0f} / {profile.prefill_tokens_per_second:,.0f} + "
            f"{d.teacher_completion_tokens:,.0f} / {profile.decode_tokens_per_second:,.0f}) x {teacher_params_b:g}B/{PROFILE_PARAMS_B:g}B "
            f"/ 3600 = {teacher_hours:.3f}",
            f"training tokens = {d.examples:,} examples x {d.tokens_per_example:,.0f} tokens x {d.epochs:.2f} epochs = {train_tokens:,.0f}",
            f"training rate = {profile.prefill_tokens_per_second:,.0f} prefill tokens/s / ({LORA_PASS_FACTOR:g} LoRA forward+backward "
            f"x {student_params_b:g}B/{PROFILE_PARAMS_B:g}B) = {train_rate:,.0f} tokens/s",
            f"training GPU-hours = {train_tokens:,.0f} / {train_rate:,.0f} / 3600 = {train_hours:.3f}",
            f"cost = ({teacher_hours:.3f} + {train_hours:.3f}) h x ${profile.usd_per_hour:.2f}/h = ${usd:,.2f} (once, not per patient)",
        ],
    }

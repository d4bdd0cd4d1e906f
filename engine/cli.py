"""Commands: parse arguments, call the library, print. Errors are one line `Error: ...` and exit 1."""

from __future__ import annotations

import functools
import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from engine.errors import EngineError, JobError
from engine.job import JobSpec, load_job

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Screen EHR notes for trial cohorts with single-order questions and rules.")
console = Console(stderr=False)
err_console = Console(stderr=True, soft_wrap=True)

JobArg = Annotated[Path, typer.Argument(help="Job file (YAML), e.g. jobs/apixaban.yaml.")]


def reports_errors(command):
    """A command's EngineError (a bad job, input or output: the user's to fix) as one line and an exit code, no
    traceback; anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EngineError as exc:
            _fail(exc)

    return wrapper


def _fail(exc: EngineError) -> None:
    if isinstance(exc, JobError) and len(exc.problems) > 1:
        err_console.print(f"Error: {exc.path}: {len(exc.problems)} problems", markup=False, highlight=False)
        for problem in exc.problems:
            err_console.print(f"  {problem}", markup=False, highlight=False)
    else:
        err_console.print(f"Error: {exc}", markup=False, highlight=False)
    raise typer.Exit(exc.exit_code)


class ExtractionMode(str, Enum):
    model = "model"
    hybrid = "hybrid"
    lexical = "lexical"


def _load(job_path: Path, input_uri: str | None = None, output_uri: str | None = None, mode: str | None = None) -> JobSpec:
    from engine.cohort.rules import check_rules

    job = load_job(job_path)
    if mode and mode != "lexical" and job.model.backend == "lexical":
        raise JobError(str(job_path), [f"--mode {mode} needs a model, and model.backend is lexical (no model): set "
                                       "model.backend to vllm, or run with --mode lexical"])
    if mode:
        job = job.model_copy(update={"extraction": job.extraction.model_copy(update={"mode": mode})})
    if input_uri:
        job = job.model_copy(update={"input": job.input.model_copy(update={"uri": input_uri})})
    if output_uri:
        job = job.model_copy(update={"output": job.output.model_copy(update={"uri": output_uri})})
    problems = check_rules(job)
    if problems:
        raise JobError(str(job_path), problems)
    return job


@app.command()
@reports_errors
def run(
    job_path: JobArg,
    input: Annotated[Optional[str], typer.Option("--input", help="Parquet file/folder or s3:// URI; overrides input.uri.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Output folder or s3:// URI; overrides output.uri.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N notes.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the output folder's earlier results and start afresh.")] = False,
    mode: Annotated[Optional[ExtractionMode], typer.Option("--mode", help="Override extraction.mode: model (ask the model every pair), hybrid (cues first, the model where it can answer), lexical (cues only, no model).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Ray and vLLM logs (they never contain note text at the default level).")] = False,
) -> None:
    """Answer every question for every note, apply the rules, write answers/, patients/ and report.json."""
    from engine.run import run_job
    from engine.progress import RunProgress

    job = _load(job_path, input, output, mode.value if mode else None)
    if verbose:
        from engine.runtime import ensure_ray

        ensure_ray(verbose=True)
    _warn_embedded(job)
    for warning in batching_warnings(job):
        console.print(f"[yellow]Warning:[/] {warning}", soft_wrap=True)
    progress = RunProgress(console)
    try:
        report, stats = run_job(job, limit=limit, overwrite=overwrite, progress=progress)
    finally:
        progress.stop()
    if stats.shards_resumed == stats.shards_total:
        console.print(f"Nothing to do: all {stats.shards_total} shards of this job are already in {job.output.uri} (use --overwrite to start afresh).")
    print_summary(report, job.output.uri)


def batching_warnings(job: JobSpec) -> list[str]:
    """Settings that leave the engine under-filled, each naming the number to change."""
    requests = job.batching.notes_per_batch * len(job.questions)
    warnings = []
    if job.model.backend == "vllm" and requests < job.model.max_num_seqs:
        needed = -(-job.model.max_num_seqs // len(job.questions))
        warnings.append(f"batching.notes_per_batch {job.batching.notes_per_batch} sends {requests} requests per engine call, "
                        f"fewer than model.max_num_seqs {job.model.max_num_seqs}: raise notes_per_batch to {needed} "
                        f"or lower max_num_seqs to {requests} to keep the engine full")
    if job.model.backend == "openai" and requests < job.model.max_concurrency:
        needed = -(-job.model.max_concurrency // len(job.questions))
        warnings.append(f"batching.notes_per_batch {job.batching.notes_per_batch} sends {requests} requests per engine call, "
                        f"fewer than model.max_concurrency {job.model.max_concurrency}: raise notes_per_batch to {needed} "
                        "to keep that many requests in flight")
    if job.batching.notes_per_shard < job.batching.notes_per_batch:
        warnings.append(f"batching.notes_per_shard {job.batching.notes_per_shard} is below notes_per_batch "
                        f"{job.batching.notes_per_batch}: engine calls get only {job.batching.notes_per_shard} notes; raise notes_per_shard")
    return warnings


def _warn_embedded(job: JobSpec) -> None:
    from engine.job import EMBEDDED_MODEL
    from engine.models import EMBEDDED_DISCLAIMER

    if job.model.backend in ("vllm", "openai") and job.model.name == EMBEDDED_MODEL and job.extraction.mode != "lexical":
        console.print(f"[yellow]Note:[/] {EMBEDDED_DISCLAIMER}")


@app.command()
@reports_errors
def validate(job_path: JobArg) -> None:
    """Check a job file (fields, questions, rules) without touching data or models."""
    job = _load(job_path)
    console.print(f"OK: {job_path}: {len(job.questions)} questions, {len(job.derived)} derived values, {len(job.criteria)} criteria.")


@app.command()
@reports_errors
def rules(
    job_path: JobArg,
    answers: Annotated[str, typer.Option("--answers", help="An output folder or its answers/ folder, written by `engine run`.")],
    output: Annotated[Optional[str], typer.Option("--output", help="Where to write patients/ (default: beside the answers).")] = None,
) -> None:
    """Re-screen from existing answers after changing rules or thresholds: no model, seconds. Writes patients/ and
    report.json's cohort (status counts and funnel)."""
    from engine.reporting.report import with_rules_cohort
    from engine.store.answers import answers_dataset
    from engine.store.layout import OutputStore, output_folder
    from engine.cohort.rules import screen

    started = time.perf_counter()
    job = _load(job_path)
    table = answers_dataset(answers, job.output.storage_options)
    patients, funnel = screen(table, job)
    target = output or output_folder(answers)
    store = OutputStore(target, job.output.storage_options)
    store.write_patients(patients)  # patients/ holds only Parquet: the funnel goes to report.json
    try:
        previous = store.read_json("report.json")
    except ValueError:  # not JSON (a write cut short): replaced by a minimal one
        previous = None
    store.write_json("report.json", with_rules_cohort(previous, job, patients, funnel))
    print_funnel(funnel, patients)
    console.print(f"patients/ and report.json's cohort written to {target} ({patients.num_rows} patients, {time.perf_counter() - started:.2f} s)")


class ExportFormat(str, Enum):
    omop_note_nlp = "omop-note-nlp"


class FileFormat(str, Enum):
    parquet = "parquet"
    csv = "csv"
    both = "both"


@app.command()
@reports_errors
def export(
    job_path: JobArg,
    answers: Annotated[str, typer.Option("--answers", help="An output folder or its answers/ folder, written by `engine run`.")],
    export_format: Annotated[ExportFormat, typer.Option("--format", help="omop-note-nlp: OMOP CDM v5.4 NOTE_NLP rows, one per answered (note, question); note ids must be integers.")],
    output: Annotated[str, typer.Option("--output", help="Folder (local or s3://) to write note_nlp.parquet and/or note_nlp.csv to.")],
    file_format: Annotated[FileFormat, typer.Option("--file-format", help="parquet, csv (header row, quoted text) or both.")] = FileFormat.parquet,
) -> None:
    """Export answers to a standard table: OMOP CDM v5.4 NOTE_NLP (answered rows; not-in-note and error rows are skipped)."""
    from engine.reporting.export import export_note_nlp
    from engine.store.layout import output_folder

    job = _load(job_path)
    summary = export_note_nlp(job, answers, output, file_format.value, run_folder=output_folder(answers))
    exists = ", ".join(f"{k} {summary.term_exists.get(k, 0)}" for k in ("Y", "N"))
    skipped = ", ".join(f"{n} {status}" for status, n in summary.skipped.items()) or "none"
    console.print(f"{export_format.value}: {summary.rows} rows from {summary.rows_by_status.get('answered', 0)} answered rows "
                  f"(term_exists {exists}); skipped rows: {skipped}", markup=False, soft_wrap=True)
    console.print(f"nlp_date {summary.processed_at:%Y-%m-%d} (from {summary.processed_from})", markup=False, soft_wrap=True)
    console.print("Written: " + ", ".join(summary.paths), markup=False, soft_wrap=True)


@app.command()
@reports_errors
def estimate(
    job_path: JobArg,
    patients: Annotated[int, typer.Option("--patients", min=1, help="Patients to project for.")] = 10_000,
    gpu: Annotated[Optional[list[str]], typer.Option("--gpu", help="Shipped profile(s): h100, a100, l4 (default: all).")] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Also measure this machine with the job's model on a few notes (minutes on CPU).")] = False,
    price: Annotated[Optional[list[str]], typer.Option("--price", help="Override a price per GPU-hour: NAME=USD, e.g. h100=2.5.")] = None,
    synth_dir: Annotated[Optional[Path], typer.Option("--synth", help="An `engine synth` folder: the distillation cost from its card (default: the job's model.adapter's training data, if any).")] = None,
    distill_examples: Annotated[Optional[int], typer.Option("--distill-examples", min=1, help="Training examples to cost when there is no synth card.")] = None,
    teacher_size: Annotated[float, typer.Option("--teacher-size", min=0.0, help="Teacher model size in billions of parameters (0: no teacher, cue and synthetic labels only).")] = 70.0,
) -> None:
    """Project wall time, GPU-hours and dollars for N patients from the job's token counts and a throughput profile,
    and the one-off distillation cost (teacher tokens, LoRA training GPU-hours) beside it."""
    from engine.estimate import calibrate as run_calibration
    from engine.estimate import distillation_workload, measure_workload, project, project_distillation, shipped_profiles
    from engine.store.layout import OutputStore

    job = _load(job_path)
    prices = dict(_parse_price(p) for p in price or [])
    profiles = shipped_profiles(prices)
    unknown = [g for g in gpu or [] if g not in profiles]
    if unknown:
        raise EngineError(f"unknown GPU profile(s) {', '.join(unknown)}; known: {', '.join(profiles)}")
    chosen = [profiles[g] for g in (gpu or profiles)]
    previous = OutputStore(job.output.uri, job.output.storage_options).read_json("report.json") or {}
    workload = measure_workload(job, answer_tokens=previous.get("completion_tokens_per_answer"), block_size=job.model.block_size or 16)
    if calibrate:
        chosen.append(run_calibration(job))
    console.print(f"Workload ({workload.notes_sampled} sampled notes, {workload.tokenizer}): {workload.questions} questions, "
                  f"{workload.note_tokens:.0f} prefix tokens/note, answers {workload.answer_tokens:.1f} tokens ({workload.answer_tokens_source}).")
    table = Table(title=f"Projection for {patients:,} patients")
    for name in ("profile", "s/note", "GPU-hours", "USD", "USD per 10k patients"):
        table.add_column(name, justify="left" if name == "profile" else "right")
    results = [project(workload, p, patients) for p in chosen]
    for r in results:
        table.add_row(r["profile"], f"{r['seconds_per_note']:.4f}", f"{r['gpu_hours']:.2f}", f"{r['usd']:,.2f}", f"{r['usd_per_10k_patients']:,.2f}")
    console.print(table)
    for r in results:
        console.print(f"[bold]{r['profile']}[/] ({r['source']})")
        for line in r["arithmetic"]:
            console.print(f"  {line}", markup=False, soft_wrap=True)
    adapter = Path(job.model.adapter) if job.model.adapter and Path(job.model.adapter).is_dir() else None
    distill = distillation_workload(workload, synth_dir, adapter, distill_examples, teacher=teacher_size > 0)
    _print_distillation(distill, [p for p in chosen if p.name != "measured"], teacher_size, results)


def _print_distillation(distill, profiles, teacher_size: float, screening: list[dict]) -> None:
    from engine.estimate import project_distillation

    console.print(f"\n[bold]Distillation, once per job[/] ({distill.source})")
    if distill.measured:
        console.print(f"  {distill.measured}", markup=False, soft_wrap=True)
    table = Table(title="Distillation (teacher labels + LoRA training of an 8B student)")
    for name in ("profile", "teacher tokens", "teacher GPU-h", "training tokens", "training GPU-h", "USD", "= screening of"):
        table.add_column(name, justify="left" if name == "profile" else "right")
    per_patient = {r["profile"]: r["usd"] / r["patients"] for r in screening}
    results = [project_distillation(distill, p, teacher_size) for p in profiles]
    for r in results:
        patients = r["usd"] / per_patient[r["profile"]] if per_patient.get(r["profile"]) else 0
        table.add_row(r["profile"], f"{r['teacher_tokens']:,.0f}", f"{r['teacher_gpu_hours']:.3f}", f"{r['train_tokens']:,.0f}",
                      f"{r['train_gpu_hours']:.3f}", f"{r['usd']:,.2f}", f"{patients:,.0f} patients")
    console.print(table)
    for r in results[:1]:
        for line in r["arithmetic"]:
            console.print(f"  {line}", markup=False, soft_wrap=True)


def _parse_price(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise EngineError(f"--price {text!r}: write NAME=USD, e.g. h100=2.5") from None


@app.command()
@reports_errors
def synth(
    job_path: JobArg,
    output: Annotated[Path, typer.Option("--output", help="Folder for train.jsonl, eval.jsonl and synth.json (the card).")],
    notes: Annotated[Optional[str], typer.Option("--notes", help="Unlabelled notes (Parquet, local or s3://) for weak labels from the cues; never a held-out set.")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="A model that answers the same prompts (a local path or shipped model name); only its verified answers are kept.")] = None,
    n: Annotated[Optional[int], typer.Option("--n", min=1, help="Training examples to keep: balanced per question and answer class, hardest first.")] = None,
    synthetic_patients: Annotated[int, typer.Option("--synthetic-patients", min=0, help="Patients from the synthetic-note generator (gold answers).")] = 60,
    window_chars: Annotated[Optional[int], typer.Option("--window-chars", min=200, help="Cut notes into windows of about this many characters, so examples fit a small model's context.")] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option("--max-prompt-tokens", min=64, help="Leave out examples whose prompt is longer (tokens of the job's model).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Read at most this many notes from --notes.")] = None,
    eval_share: Annotated[float, typer.Option("--eval-share", min=0.0, max=0.5, help="Share of patients held out for eval.jsonl.")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the synthetic notes, the balance and the split.")] = 0,
) -> None:
    """Training data for the job's own questions, in exactly the prompt and answer format the engine serves."""
    from engine.distill.synth import synth as make_data

    job = _load(job_path)
    if not notes and not synthetic_patients:
        raise EngineError("nothing to make examples from: give --notes URI and/or --synthetic-patients N (> 0)")
    card = make_data(job, output, notes=notes, teacher=teacher, n=n, synthetic_patients=synthetic_patients, seed=seed,
                     eval_share=eval_share, limit=limit, max_prompt_tokens=max_prompt_tokens, window_chars=window_chars)
    train_total, eval_total = card.train.get("examples", 0), card.eval.get("examples", 0)
    console.print(f"{train_total} training and {eval_total} eval examples in {card.seconds:.0f} s "
                  f"(candidates: {', '.join(f'{k} {v}' for k, v in card.candidates.items()) or 'none'})", markup=False)
    table = Table(title="Training examples by answer class")
    for name in ("answer class", "train", "eval"):
        table.add_column(name, justify="left" if name == "answer class" else "right")
    for label in sorted(set(card.train.get("by_label", {})) | set(card.eval.get("by_label", {}))):
        table.add_row(label, str(card.train.get("by_label", {}).get(label, 0)), str(card.eval.get("by_label", {}).get(label, 0)))
    console.print(table)
    for reason, count in card.dropped.items():
        console.print(f"  left out: {count} {reason}", markup=False, soft_wrap=True)
    if not train_total:
        raise EngineError(f"no training example survived the checks (see {output / 'synth.json'}); give more notes or synthetic patients")
    console.print(f"Written: {output / 'train.jsonl'}, {output / 'eval.jsonl'}, {output / 'synth.json'}", markup=False, soft_wrap=True)


@app.command()
@reports_errors
def train(
    job_path: JobArg,
    data: Annotated[Path, typer.Option("--data", help="A folder written by `engine synth` (train.jsonl, eval.jsonl, synth.json).")],
    output: Annotated[Path, typer.Option("--output", help="Adapter folder; use it as model.adapter in the job. Checkpoints go in its checkpoints/.")],
    rank: Annotated[int, typer.Option("--rank", min=1, max=256, help="LoRA rank.")] = 8,
    learning_rate: Annotated[float, typer.Option("--learning-rate", min=0.0, help="Peak learning rate (cosine schedule).")] = 2e-4,
    epochs: Annotated[float, typer.Option("--epochs", min=0.0, help="Passes over train.jsonl (ignored when --max-steps is given).")] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Optimizer steps to run, overriding --epochs.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per device step.")] = 1,
    gradient_accumulation: Annotated[int, typer.Option("--gradient-accumulation", min=1, help="Device steps per optimizer step.")] = 8,
    save_steps: Annotated[int, typer.Option("--save-steps", min=1, help="Write a checkpoint every this many steps.")] = 25,
    max_length: Annotated[int, typer.Option("--max-length", min=64, help="Leave out examples longer than this many tokens.")] = 4096,
    seed: Annotated[int, typer.Option("--seed", help="Seed for initialisation, dropout and data order.")] = 0,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming from the last checkpoint in OUTPUT/checkpoints.")] = False,
) -> None:
    """Train a LoRA adapter of the job's model (peft) on `engine synth` data; resumes from its last checkpoint."""
    from engine.distill.train import TrainSettings, last_checkpoint
    from engine.distill.train import train as fit

    job = _load(job_path)
    settings = TrainSettings(rank=rank, alpha=2 * rank, learning_rate=learning_rate, epochs=epochs,
                             max_steps=max_steps or -1, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
                             save_steps=save_steps, seed=seed, max_length=max_length)
    checkpoint = None if fresh else last_checkpoint(output)
    if checkpoint:
        console.print(f"Resuming from {checkpoint} (--fresh starts over)", markup=False, soft_wrap=True)
    card = fit(job, data, output, settings, resume=not fresh)
    before = f"{card.eval_loss_before} -> " if card.eval_loss_before is not None else ""
    console.print(f"{card.steps} steps on {card.examples} examples in {card.seconds:.0f} s ({card.tokens_per_second:.0f} tokens/s, "
                  f"{card.device}); train loss {card.train_loss}, eval loss {before}{card.eval_loss}", markup=False, soft_wrap=True)
    console.print(f"Adapter written to {output}; serve it with `model: {{adapter: {output}}}` in the job", markup=False, soft_wrap=True)


@app.command(name="eval")
@reports_errors
def evaluate_answers(
    job_path: JobArg,
    predictions: Annotated[str, typer.Option("--predictions", help="An output folder or its answers/ folder, written by `engine run`.")],
    labels: Annotated[str, typer.Option("--labels", help="Gold labels, Parquet in long format: note_id, question_id, value_bool, value_num, unit (e.g. data/sample_gold.parquet).")],
    criteria_labels: Annotated[Optional[str], typer.Option("--criteria-labels", help="Gold criterion states, Parquet: subject_id or patient_id and one met/not_met/unknown column per criterion (e.g. data/sample_expected.parquet).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Where to write eval.md, eval.parquet and report.html (default: the predictions folder).")] = None,
    draws: Annotated[int, typer.Option("--draws", min=100, help="Bootstrap draws (resampling notes) for the 95% confidence intervals.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed, so the intervals repeat.")] = 0,
) -> None:
    """Score answers against gold labels: balanced accuracy and F1 per yes/no question, accuracy per numeric question, 95% CIs."""
    from engine.reporting.evaluate import evaluate_run
    from engine.reporting.html import write_report_html
    from engine.store.layout import OutputStore

    job = _load(job_path)
    evaluation, answers, target = evaluate_run(job, predictions, labels, criteria_labels, output, draws=draws, seed=seed)
    source = OutputStore(evaluation.predictions_folder, job.output.storage_options)
    write_report_html(OutputStore(target, job.output.storage_options), job, answers=answers, source=source)
    print_evaluation(evaluation)
    console.print(f"eval.md, eval.parquet and report.html written to {target}")


def print_evaluation(evaluation) -> None:
    from rich import box

    from engine.reporting.evaluate import METRIC_NAMES, matching_line, overall_line

    table = Table(title="Evaluation (95% CI: bootstrap over notes; patients for criteria)", box=box.SIMPLE_HEAD)
    for name in ("question / criterion", "n", "metric", "value [95% CI]", "errors"):
        table.add_column(name, justify="right" if name in ("n", "errors") else "left",
                         no_wrap=name != "question / criterion", overflow="fold")
    previous = None
    for r in evaluation.table.to_pylist():
        if previous is not None and (r["scope"], r["kind"]) != previous:
            table.add_section()
        previous = (r["scope"], r["kind"])
        table.add_row(f"overall {r['kind']}" if r["scope"] == "overall" else r["id"], str(r["n"]), METRIC_NAMES.get(r["metric"], r["metric"]),
                      _value_with_interval(r), "" if r["errors"] is None else str(r["errors"]))
    console.print(table)
    console.print(matching_line(evaluation), markup=False, soft_wrap=True)
    console.print(overall_line(evaluation), markup=False, soft_wrap=True)


def _value_with_interval(row: dict) -> str:
    from engine.reporting.evaluate import fmt, fmt_interval

    value = fmt(row["value"])
    return value if value == "-" else f"{value} [{fmt_interval(row['ci_low'], row['ci_high'])}]"


def print_funnel(funnel: list[dict], patients) -> None:
    table = Table(title="Cohort funnel")
    for name in ("criterion", "kind", "met", "not_met", "unknown", "remaining"):
        table.add_column(name, justify="right" if name not in ("criterion", "kind") else "left")
    for row in funnel:
        table.add_row(str(row.get("criterion")), str(row.get("kind", "")), *(str(row.get(k, "")) for k in ("met", "not_met", "unknown", "remaining")))
    console.print(table)
    if "status" in patients.column_names:
        import pyarrow.compute as pc

        counts = {r["values"]: r["counts"] for r in pc.value_counts(patients["status"]).to_pylist()}
        console.print("patients: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def print_summary(report: dict, output_uri: str) -> None:
    table = Table(title=f"engine run: {report['job']}", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("notes / patients / questions", f"{report['notes']} / {report['patients']} / {report['questions']}"),
        ("rows answered / not in note / error", " / ".join(str(report["rows_by_status"].get(s, 0)) for s in ("answered", "not_in_note", "error"))),
        ("answered by model / cues / no cue (calls saved)", " / ".join(str((report.get("rows_by_route") or {}).get(r, 0)) for r in ("model", "lexical", "no_candidate"))
         + (f" ({report['model_calls_saved']:.0%})" if report.get("model_calls_saved") is not None else "")),
        ("prompt tokens (computed after prefix cache)", f"{report['prompt_tokens']:,} ({report['computed_prompt_tokens']:,})"),
        ("prefix-cache hit rate", _fmt(report.get("prefix_cache_hit_rate"))),
        ("completion tokens per answer", _fmt(report.get("completion_tokens_per_answer"))),
        ("wall seconds (start-up)", f"{_fmt(report.get('wall_seconds'))} ({_fmt(report.get('startup_seconds'))})"),
        ("pairs per second", _fmt(report.get("pairs_per_second"))),
        ("cost per 10k patients (USD)", _fmt(report.get("cost_per_10k_patients_usd"))
         + (" from tokens" if report.get("cost_basis") == "tokens" else "")),
        ("cohort", json.dumps(report["cohort"]["status"])),
    ]
    this_run = report.get("this_run") or {}
    redone = [this_run.get(k) or 0 for k in ("model_actor_restarts", "batches_retried", "commits_retried")]
    if (this_run.get("nodes") or 1) > 1 or any(redone):  # a cluster run, or work a lost worker made it do again
        rows.append(("Ray nodes / actor restarts / batches / commits redone", " / ".join(map(str, [this_run.get("nodes", 1), *redone]))))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"Output: {output_uri} (answers/, patients/, report.json)")
    if report.get("server_unavailable_rows"):
        console.print(f"[yellow]Warning:[/] {report['server_unavailable_rows']} (note, question) pairs met the model server "
                      "unavailable (error rows 'model server unavailable: ...'); run the same command again when it is "
                      "back: only those pairs are asked again.", soft_wrap=True)


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:,.4g}" if isinstance(value, float) else str(value))

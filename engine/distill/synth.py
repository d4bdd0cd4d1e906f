"""engine synth: training data for a job's own questions, in exactly the prompt and answer format the engine serves.

Woo et al. (2025) distil synthetic question-answer data into a small model. Here every example is one
(note, question) rendered by the serving renderer (engine.prompt.render_messages) with, as the answer, the compact
JSON the answer grammar produces, and every answer has passed the served chain (parse -> ground -> verify) before it
is kept, so training data and serving cannot drift and no example teaches a quote the engine would refuse.

Sources (each example says which):
  cues         notes (unlabelled, `--notes`) whose cue answer is unambiguous (route lexical or no_candidate in
               hybrid): weak labels; notes without a mention give the not_in_note examples
  synthetic    the synthetic-note generator's notes with its gold answers (from the note plan, never from the text);
               where the cues got it wrong the gold answer gets a quote found in the note, and is kept only if
               that quote passes verification
  teacher      a stronger model (`--teacher`, a model folder or Hugging Face id served by vLLM) answers the pairs the
               cues find ambiguous; only its verified answers are kept
Prompts show what the job serves: the note, or with `extraction.model_sees: windows` the text around the question's
mentions (a pair without a mention is never asked of a model, so it is no example).
Then: balanced per question and answer class, hardest first within each class; split by patient into train and
eval; a card (synth.json) with every count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.errors import InputError
from engine.job import JobSpec
from engine.plan import Plan, PlannedQuestion, make_plan
from engine.prompt import SYSTEM_PROMPT, note_date_hint, render_messages
from engine.stages.answer import answer_rows
from engine.stages.candidates import shown_text
from engine.stages.cues import find_mentions
from engine.stages.generate import GENERATION_COLUMNS, GenerateAnswers
from engine.stages.verify import counts_from, value_in_quote
from engine.tools.inprocess import candidate_rows

log = logging.getLogger(__name__)

SYNTH_MODEL = "synth"  # the `model` of the rows whose target is checked by the served chain
SOURCES = ("cues", "synthetic", "teacher")
UNAMBIGUOUS = ("lexical", "no_candidate")


@dataclass
class Example:
    note_id: str
    patient_id: str
    question_id: str
    source: str
    label: str  # the answer class: yes / no / not_in_note (yes/no questions), value / not_in_note (numbers)
    target: str  # compact JSON, as the grammar writes it
    messages: list[dict[str, str]]
    hardness: float = 0.0
    prompt_tokens: int = 0

    def record(self) -> dict:
        return {"messages": self.messages + [{"role": "assistant", "content": self.target}],
                "note_id": self.note_id, "patient_id": self.patient_id, "question_id": self.question_id,
                "source": self.source, "label": self.label, "hardness": self.hardness,
                "prompt_tokens": self.prompt_tokens}


@dataclass
class SynthCard:
    job: str
    job_fingerprint: str
    renderer: str  # hash of the system prompt: a changed prompt means the data must be rebuilt
    seed: int
    sources: dict = field(default_factory=dict)
    candidates: dict = field(default_factory=dict)  # source -> examples offered before checks
    dropped: dict = field(default_factory=dict)  # reason -> count
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    teacher_usage: dict = field(default_factory=dict)  # requests, prompt_tokens, completion_tokens (engine estimate)
    seconds: float = 0.0


def compact(obj: dict) -> str:
    """The answer as the grammar writes it (no free whitespace, keys in schema order)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def renderer_hash() -> str:
    return hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest()[:12]


ANSWER_FIELD = {"numeric": "value", "date": "date", "categorical": "choice"}  # the field that holds the answer


def label_of(question: PlannedQuestion, target: dict) -> str:
    """The answer class: yes / no / not_in_note for yes/no questions; value / not_in_note for the others."""
    if question.spec.type == "yes_no":
        return target["answer"]
    return "value" if target.get(ANSWER_FIELD[question.spec.type]) is not None else "not_in_note"


# ---------------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------------

def served_form(question: PlannedQuestion, raw: str) -> dict | None:
    """A cue or model output as the answer model reads it, re-serialised in schema order; None if it does not parse."""
    try:
        answer = question.answer_model.model_validate_json(raw)
    except ValueError:
        return None
    return answer.model_dump(mode="json")


def gold_target(text: str, question: PlannedQuestion, gold: dict, counted: str | None, limit: int) -> dict | None:
    """The generator's gold answer with a quote from the note the served verification can accept, or None when no
    such quote exists (the example is dropped, never taught without evidence)."""
    spec = question.spec
    if spec.type == "yes_no":
        if gold["value_bool"] is None:
            return {"evidence": "", "answer": "not_in_note"}
        if not gold["value_bool"]:
            return {"evidence": "", "answer": "no"}
        spans = [tuple(int(x) for x in s.split("-")) for s in (counted or "").split(";") if s]
        if not spans:
            return None
        return {"evidence": _quote(text, spans[0][0], spans[0][1], limit), "answer": "yes"}
    if gold["value_num"] is None:
        return {"evidence": "", "value": None, "unit": None}
    unit = gold["unit"] or spec.unit
    for m in find_mentions(text, spec):
        line_start, line_end = text.rfind("\n", 0, m.start) + 1, text.find("\n", m.end)
        line_end = len(text) if line_end < 0 else line_end
        quote = _quote(text, m.start, min(line_end, m.end + limit), limit, line_start, line_end)
        if value_in_quote(gold["value_num"], unit, quote, question):
            return {"evidence": quote, "value": f"{gold['value_num']:g}", "unit": unit}
    return None


def _quote(text: str, start: int, end: int, limit: int, lo: int | None = None, hi: int | None = None) -> str:
    """Up to `limit` characters of the note's own text from `start`, within its line, without cut words at the end."""
    lo = text.rfind("\n", 0, start) + 1 if lo is None else lo
    hi = (text.find("\n", end) if text.find("\n", end) >= 0 else len(text)) if hi is None else hi
    piece = text[start:min(hi, start + limit)]
    if start + limit < hi and " " in piece:
        piece = piece[: piece.rfind(" ")]
    return piece.strip()


# ---------------------------------------------------------------------------------------------------------------
# Checking targets with the served chain
# ---------------------------------------------------------------------------------------------------------------

def check_targets(rows: pa.Table, targets: list[str], plan: Plan, keep_cue_check: list[bool]) -> list[str | None]:
    """Each target through parse -> ground -> verify as if a model had written it; None where it holds up, else
    the failure. `keep_cue_check` False: a gold target whose not_in_note the cue answer must not overrule."""
    n = rows.num_rows
    cue_output = rows["cue_output"].combine_chunks().to_pylist()
    cue_output = [c if keep else None for c, keep in zip(cue_output, keep_cue_check)]
    generated = rows.set_column(rows.schema.get_field_index("route"), "route", pa.array(["model"] * n, pa.string()))
    generated = generated.set_column(generated.schema.get_field_index("cue_output"), "cue_output", pa.array(cue_output, pa.string()))
    columns = {"raw_output": pa.array(targets, pa.string()), "finish_reason": pa.array(["stop"] * n),
               "prompt_tokens": pa.array([0] * n, pa.int32()), "cached_tokens": pa.array([0] * n, pa.int32()),
               "completion_tokens": pa.array([0] * n, pa.int32()), "truncated": pa.array([False] * n),
               "generation_error": pa.nulls(n, pa.string()), "model": pa.array([SYNTH_MODEL] * n)}
    for name in GENERATION_COLUMNS:
        generated = generated.append_column(name, columns[name])
    generated = generated.append_column("batch_seconds", pa.array(np.zeros(n)))
    answered = answer_rows(generated, plan)
    status, verified, reason = (answered[c].to_pylist() for c in ("status", "verified", "verification"))
    error = answered["error"].to_pylist()
    return [None if v else (e or r or s) for s, v, r, e in zip(status, verified, reason, error)]


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------

def _hybrid(job: JobSpec, uri: str) -> JobSpec:
    """The job reading `uri`, in hybrid mode with the model asked only where the cues are ambiguous: the routes say
    which cue answers are weak labels and which pairs need a teacher."""
    return job.model_copy(update={
        "input": job.input.model_copy(update={"uri": uri}),
        "extraction": job.extraction.model_copy(update={"mode": "hybrid", "ask_model": "unresolved"}),
    })


def _row_dicts(rows: pa.Table) -> list[dict]:
    keep = [c for c in ("note_id", "patient_id", "question_id", "route", "candidates", "cue_output", "cue_hint",
                        "counted_mentions", "note_error", "charttime") if c in rows.schema.names]
    return rows.select(keep).to_pylist()


def _texts(rows: pa.Table) -> list[str]:
    return rows["text"].combine_chunks().cast(pa.string()).to_pylist()


WINDOW_MARK = "#w"


def windowed(notes: pa.Table, text_column: str, id_column: str, width: int | None) -> pa.Table:
    """Each note cut at line ends into windows of about `width` characters, each a note of its own
    (id `<note id>#w<k>`); the note as it is when width is None. Windows keep training prompts short on CPUs and
    teach the model to answer from the text it is shown (a window without the mention is a true not_in_note)."""
    if not width:
        return notes
    rows = []
    for row in notes.to_pylist():
        text = row[text_column] or ""
        pieces, current = [], ""
        for line in text.splitlines(keepends=True):
            if current and len(current) + len(line) > width:
                pieces.append(current)
                current = ""
            current += line
        pieces.append(current)
        for k, piece in enumerate(p for p in pieces if p.strip()):
            rows.append({**row, id_column: f"{row[id_column]}{WINDOW_MARK}{k}", text_column: piece})
    return pa.Table.from_pylist(rows, notes.schema)


def _note_of(note_id: str) -> str:
    return note_id.split(WINDOW_MARK)[0]


def windowed_input(job: JobSpec, uri: str, width: int | None, limit: int | None, workdir: Path) -> str:
    """`uri`'s notes (the first `limit`) cut into windows, as a Parquet file in workdir; `uri` itself without width."""
    if not width:
        return uri
    from engine.storage import filesystem

    fs, path = filesystem(uri, job.input.storage_options)
    table = pq.read_table(path, filesystem=fs)
    if limit is not None:
        table = table.slice(0, limit)
    out = workdir / f"windows-{hashlib.sha256(uri.encode()).hexdigest()[:8]}.parquet"
    pq.write_table(windowed(table, job.input.text, job.input.note_id, width), out)
    return str(out)


def from_cues(job: JobSpec, plan: Plan, uri: str, limit: int | None, dropped: Counter) -> tuple[list, pa.Table]:
    """Weak labels: the unambiguous cue answers of unlabelled notes (or windows). Also returns every candidate row
    (the ambiguous ones are the teacher's)."""
    rows = candidate_rows(_hybrid(job, uri), limit)
    picked = [i for i, r in enumerate(_row_dicts(rows)) if r["route"] in UNAMBIGUOUS and r["cue_output"] and not r["note_error"]]
    targets = [r["cue_output"] for r in _row_dicts(rows.take(picked))] if picked else []
    return _checked(rows, picked, plan, "cues", targets, None, dropped), rows


def from_synthetic(job: JobSpec, plan: Plan, patients: int, seed: int, workdir: Path, dropped: Counter,
                   width: int | None = None) -> list:
    """The generator's notes (or their windows) with its gold answers; hard where the cues disagree with the gold.
    A window shows part of a note: where the note's gold answer is positive and the window holds a quote that
    supports it, that is the target; where the window does not, the cue answer on the window (not in it) is;
    a cue answer the gold contradicts is dropped."""
    from engine.tools.synthetic import make_sample, use_job

    try:
        use_job(job)  # the generator's gold follows this job's questions, units and caps
    except ValueError as exc:
        raise InputError(f"{exc}; the synthetic notes are written for the apixaban job's questions: "
                         "run engine synth with --synthetic-patients 0 and --notes or --teacher") from exc
    sample = make_sample(n_patients=patients, seed=seed)
    path = workdir / "synthetic_notes.parquet"
    pq.write_table(windowed(sample["notes"], "text", "note_id", width), path)
    gold = {(g["note_id"], g["question_id"]): g for g in sample["gold"].to_pylist()}
    rows = candidate_rows(_hybrid(job, str(path)))
    texts = _texts(rows)
    limit = job.model.evidence_max_chars
    picked, targets, agree = [], [], []
    for i, r in enumerate(_row_dicts(rows)):
        g = gold.get((_note_of(r["note_id"]), r["question_id"]))
        if g is None or r["note_error"]:
            continue
        question = plan.by_id[r["question_id"]]
        cue = served_form(question, r["cue_output"]) if r["cue_output"] else None
        if cue is not None and _agrees(question, cue, g):
            picked.append(i), targets.append(cue), agree.append(True)
            continue
        target = gold_target(texts[i], question, g, r["counted_mentions"], limit)
        if target is None and width and _positive(g) and cue is not None and label_of(question, cue) == "not_in_note":
            target = cue  # the window does not show what the note documents elsewhere
        if target is None:
            dropped["synthetic: no quote in the text supports the gold answer"] += 1
            continue
        picked.append(i), targets.append(target), agree.append(target is cue)
    return _checked(rows, picked, plan, "synthetic", targets, agree, dropped)


def _positive(gold: dict) -> bool:
    return bool(gold["value_bool"]) or gold["value_num"] is not None


def _agrees(question: PlannedQuestion, cue: dict, gold: dict) -> bool:
    if question.spec.type == "yes_no":
        said = cue["answer"]
        return (said == "yes") == bool(gold["value_bool"])
    value = cue.get("value")
    if gold["value_num"] is None or value is None:
        return (gold["value_num"] is None) == (value is None)
    spec = question.spec
    try:
        said = float(str(value).replace(",", "")) * spec.units[cue.get("unit") or spec.unit]
    except (ValueError, KeyError):
        return False
    return math.isclose(said, gold["value_num"] * spec.units[gold["unit"] or spec.unit], rel_tol=1e-3, abs_tol=1e-6)


def from_teacher(job: JobSpec, plan: Plan, rows: pa.Table, teacher: str, dropped: Counter, usage: dict | None = None) -> list:
    """A stronger model answers the pairs the cues find ambiguous (route model); only verified answers are kept."""
    ambiguous = pc.indices_nonzero(pc.fill_null(pc.equal(rows["route"], "model"), False)).to_pylist()
    if not ambiguous:
        return []
    teacher_job = job.model_copy(update={
        "model": job.model.model_copy(update={"backend": "vllm", "name": teacher, "adapter": None}),
        "extraction": job.extraction.model_copy(update={"mode": "hybrid", "ask_model": "unresolved"}),
    })
    generate = GenerateAnswers(teacher_job.model_dump_json())
    try:
        generated = generate(rows.take(ambiguous))
    finally:
        generate.backend.close()
    raw = generated["raw_output"].to_pylist()
    if usage is not None:
        usage.update(requests=len(ambiguous), prompt_tokens=int(pc.sum(generated["prompt_tokens"]).as_py() or 0),
                     completion_tokens=int(pc.sum(generated["completion_tokens"]).as_py() or 0))
    subset = rows.take(ambiguous)
    targets = []
    keep = []
    for i, (r, out) in enumerate(zip(_row_dicts(subset), raw)):
        parsed = served_form(plan.by_id[r["question_id"]], out) if out else None
        if parsed is None:
            dropped["teacher: output does not parse"] += 1
            continue
        keep.append(i), targets.append(parsed)
    return _checked(subset, keep, plan, "teacher", targets, None, dropped)


def _checked(rows: pa.Table, picked: list[int], plan: Plan, source: str, targets: list, agree: list | None,
             dropped: Counter) -> list[Example]:
    """Examples for rows[picked] whose targets pass the served chain."""
    if not picked:
        return []
    subset = rows.take(picked)
    dicts = _row_dicts(subset)
    texts = _texts(subset)
    targets = [served_form(plan.by_id[r["question_id"]], t) if isinstance(t, str) else t for r, t in zip(dicts, targets)]
    serialised = [compact(t) if t is not None else "" for t in targets]
    keep_cue_check = [True] * len(picked) if agree is None else [a for a in agree]
    failures = check_targets(subset, serialised, plan, keep_cue_check)
    examples = []
    for r, text, target, raw, failure, i in zip(dicts, texts, targets, serialised, failures, range(len(picked))):
        if target is None:
            dropped[f"{source}: the cue answer does not parse"] += 1
            continue
        if failure:
            dropped[f"{source}: {failure.split(' (')[0]}"] += 1
            continue
        question = plan.by_id[r["question_id"]]
        shown = shown_text(text, question, plan)  # the note, or (model_sees: windows) the text around its mentions
        if shown is None:
            dropped[f"{source}: no mention, so the job never asks a model"] += 1
            continue
        if target.get("evidence") and target["evidence"] not in shown:
            dropped[f"{source}: the quote is outside the windows the model is shown"] += 1
            continue
        hard = (agree is not None and not agree[i]) or source == "teacher" or r["route"] == "model"
        hardness = (10.0 if hard else 0.0) + min(r["candidates"] or 0, 9)
        # as model mode serves it: the text and the question (a date question also the note's date, see candidates)
        served_hint = note_date_hint(r.get("charttime")) if question.spec.type == "date" else ""
        examples.append(Example(r["note_id"], str(r["patient_id"]), r["question_id"], source, label_of(question, target),
                                raw, render_messages(shown, question, served_hint), hardness))
        if r["route"] == "model" and r["cue_hint"]:  # hybrid serves ambiguous pairs with the cue hint: teach that too
            examples.append(Example(r["note_id"], str(r["patient_id"]), r["question_id"], source,
                                    label_of(question, target), raw, render_messages(shown, question, r["cue_hint"]), hardness))
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Selection, split, card
# ---------------------------------------------------------------------------------------------------------------

def balance(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """Up to n examples, an equal share per (question, answer class), hardest first within each; a class with fewer
    than its share gives the rest to the others."""
    rng = random.Random(seed)
    groups: dict[tuple, list[Example]] = defaultdict(list)
    for e in examples:
        groups[(e.question_id, e.label)].append(e)
    for items in groups.values():
        rng.shuffle(items)
        items.sort(key=lambda e: -e.hardness)
    if n is None or n >= len(examples):
        return [e for items in groups.values() for e in items]
    chosen: list[Example] = []
    queues = {k: list(v) for k, v in sorted(groups.items())}
    while len(chosen) < n and queues:
        for key in list(queues):
            if len(chosen) >= n:
                break
            chosen.append(queues[key].pop(0))
            if not queues[key]:
                del queues[key]
    return chosen


def split(examples: list[Example], eval_share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """By patient, so no note (and no patient) is in both."""
    def bucket(patient: str) -> float:
        return int(hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    train = [e for e in examples if bucket(e.patient_id) >= eval_share]
    held = [e for e in examples if bucket(e.patient_id) < eval_share]
    return train, held


def _counts(examples: list[Example]) -> dict:
    per_question: dict[str, Counter] = defaultdict(Counter)
    for e in examples:
        per_question[e.question_id][e.label] += 1
    return {"examples": len(examples), "patients": len({e.patient_id for e in examples}),
            "notes": len({e.note_id for e in examples}),
            "by_source": dict(Counter(e.source for e in examples)),
            "by_label": dict(Counter(e.label for e in examples)),
            "prompt_tokens": sum(e.prompt_tokens for e in examples),
            "by_question": {q: dict(c) for q, c in sorted(per_question.items())}}


def count_tokens(examples: list[Example], model_path: str, max_prompt_tokens: int | None, dropped: Counter) -> list[Example]:
    """Prompt tokens per example with the job model's chat template (what vLLM is sent); drop the longer ones."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    kept = []
    for e in examples:
        prompt = tokenizer.apply_chat_template(e.messages, add_generation_prompt=True, tokenize=False)
        e.prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if max_prompt_tokens and e.prompt_tokens > max_prompt_tokens:
            dropped[f"longer than {max_prompt_tokens} prompt tokens"] += 1
            continue
        kept.append(e)
    return kept


def synth(job: JobSpec, output: Path, *, notes: str | None = None, teacher: str | None = None, n: int | None = None,
          synthetic_patients: int = 60, seed: int = 0, eval_share: float = 0.1, limit: int | None = None,
          max_prompt_tokens: int | None = None, window_chars: int | None = None) -> SynthCard:
    """Write train.jsonl, eval.jsonl and synth.json to `output`; return the card."""
    from engine.models import resolve_model

    started = time.perf_counter()
    plan = make_plan(_hybrid(job, job.input.uri))
    dropped: Counter = Counter()
    card = SynthCard(job=job.name, job_fingerprint=job.fingerprint(), renderer=renderer_hash(), seed=seed,
                     sources={"notes": notes, "synthetic_patients": synthetic_patients, "teacher": teacher, "limit": limit,
                              "window_chars": window_chars, "max_prompt_tokens": max_prompt_tokens})
    examples: list[Example] = []
    with tempfile.TemporaryDirectory(prefix="engine-synth-") as tmp:
        if notes:
            uri = windowed_input(job, notes, window_chars, limit, Path(tmp))
            weak, rows = from_cues(job, plan, uri, None if window_chars else limit, dropped)
            examples += weak
            if teacher:
                examples += from_teacher(job, plan, rows, teacher, dropped, card.teacher_usage)
        if synthetic_patients:
            examples += from_synthetic(job, plan, synthetic_patients, seed + 1009, Path(tmp), dropped, window_chars)
    card.candidates = dict(Counter(e.source for e in examples))
    examples = count_tokens(examples, resolve_model(job.model.name), max_prompt_tokens, dropped)
    train, held = split(examples, eval_share, seed)
    train = balance(train, n, seed)
    held = balance(held, None if n is None else max(1, int(n * eval_share)), seed)
    output.mkdir(parents=True, exist_ok=True)
    for name, items in (("train.jsonl", train), ("eval.jsonl", held)):
        with open(output / name, "w", encoding="utf-8") as f:
            for e in items:
                f.write(json.dumps(e.record(), ensure_ascii=False) + "\n")
    card.dropped = dict(sorted(dropped.items()))
    card.train, card.eval = _counts(train), _counts(held)
    card.seconds = round(time.perf_counter() - started, 1)
    (output / "synth.json").write_text(json.dumps(asdict(card), indent=2) + "\n", encoding="utf-8")
    return card


def read_examples(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

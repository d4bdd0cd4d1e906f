"""Candidates: find the evidence first, and route each (note, question) to the model only where it can answer.

Per note, once: every question's cue mentions (engine.stages.cues), then one medspaCy pass for their context
(engine.stages.context). Per (note, question), a cue answer in the answer schema's JSON (so parse and ground treat it
like a model's) and a route:

  no_candidate  no mention: decided without the model (not in note; "no" for absent: "no" questions)
  lexical       answered from the cues (extraction mode lexical, or hybrid with ask_model: unresolved where
                the cue answer is unambiguous)
  model         sent to the model, with the whole note or only the windows around the mentions, and (hybrid) the
                mentions' context flags in the question ("AF" (negated); "afib" (hypothetical))

Extraction mode model sends every pair to the model with the question alone. With `model_sees: windows` the model
reads only the text around the question's mentions (the cues as a retriever): a pair with no mention is
no_candidate, decided without a model call, as in hybrid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.stages.choices import categorical_answer
from engine.stages.context import Context, contexts, near, quote_around
from engine.stages.cues import LabValue, Match, find_mentions, read_values
from engine.stages.dates import find_dates
from engine.job import QuestionSpec
from engine.plan import Plan, PlannedQuestion
from engine.prompt import note_date_hint
from engine.stages import require_columns

REQUIRED_COLUMNS = ("question_id", "text")  # what this stage reads

CANDIDATE_COLUMNS = {
    "route": pa.string(),
    "candidates": pa.int32(),
    "cue_flags": pa.string(),
    "cue_output": pa.string(),
    "model_text": pa.string(),
    "cue_hint": pa.string(),
    "counted_mentions": pa.string(),  # spans of the mentions that count for the patient ("12-14;40-59"), for verify
}
WINDOW_SEPARATOR = "\n[...]\n"
NO_CUES_ERROR = "no cues for this question in the job, so the cues alone cannot answer it; add cues: to it or use extraction mode hybrid"
HINT_MENTIONS = 6


@dataclass(frozen=True, slots=True)
class Mention:
    match: Match
    context: Context
    counts: bool  # not negated/family/... as the question's `ignore` says


@dataclass(slots=True)
class Assessment:
    """The candidate stage's verdict on one (note, question)."""

    route: str | None
    candidates: int = 0
    flags: str | None = None
    output: str | None = None
    model_text: str | None = None
    hint: str | None = None
    counted: str | None = None


def find_candidates(batch: pa.Table, plan: Plan) -> pa.Table:
    """Append CANDIDATE_COLUMNS to an expanded (note x question) batch."""
    require_columns(batch, "candidates", REQUIRED_COLUMNS)
    n = batch.num_rows
    model_mode = plan.job.extraction.mode == "model"
    if n == 0 or (model_mode and not plan.verifies_model_answers):
        return _every_pair_to_the_model(batch)
    failed = batch["note_error"].is_valid().to_pylist() if "note_error" in batch.column_names else [False] * n
    texts = batch["text"].combine_chunks()
    note_of = texts.indices.to_pylist() if pa.types.is_dictionary(texts.type) else list(range(n))
    notes = texts.dictionary.to_pylist() if pa.types.is_dictionary(texts.type) else texts.to_pylist()
    questions = batch["question_id"].to_pylist()
    dated = any(q.spec.type == "date" for q in plan.questions) and "charttime" in batch.column_names
    times = batch["charttime"] if dated else None  # read per note (one scalar each), only for a job with date questions
    rows_by_note: dict[int, list[int]] = {}
    for row in range(n):
        rows_by_note.setdefault(note_of[row], []).append(row)
    verdicts: list[Assessment] = [NOT_ASKED] * n
    for note, rows in rows_by_note.items():
        live = [r for r in rows if not failed[r]]
        if live:
            charttime = times[live[0]].as_py() if times is not None else None
            assessed = assess_note(notes[note] or "", [plan.by_id[questions[r]] for r in live], plan, charttime)
            for row, verdict in zip(live, assessed):
                verdicts[row] = verdict
    return _append(batch, verdicts)


def _spans(mentions: list[Mention]) -> list[tuple[int, int]]:
    return [(m.match.start, m.match.end) for m in mentions]


def _to_the_model(verdict: Assessment, text: str, mentions: list, plan: Plan, date_hint: str | None) -> Assessment:
    """Extraction mode model: the pair goes to the model, shown the note (or, with model_sees: windows, the text
    around its mentions) and the question alone (a date question also the note's date); the cue reading stays (cue
    answer, flags, mentions that count) for verify to check the model's answer against. With windows, a pair without
    a mention has nothing to show: it stays no_candidate."""
    extraction = plan.job.extraction
    windowed = extraction.model_sees == "windows"
    if windowed and not mentions and verdict.route == "no_candidate":
        return verdict
    verdict.route, verdict.hint = "model", date_hint
    verdict.model_text = windows(text, _spans(mentions), extraction.window_chars) if windowed and mentions else None
    return verdict


_NO_SENTENCE = Context(frozenset(), 0, 0, None)  # quote_around then keeps to the line
NOT_ASKED = Assessment(None)  # a row whose note failed (empty, duplicate, ...): an error row, asked of nobody


def _every_pair_to_the_model(batch: pa.Table) -> pa.Table:
    """Extraction mode model: whole columns at once (millions of rows; no per-row Python)."""
    n = batch.num_rows
    if "note_error" in batch.column_names:
        route = pc.if_else(pc.is_valid(batch["note_error"]), pa.scalar(None, pa.string()), pa.scalar("model"))
    else:
        route = pa.array(["model"] * n, pa.string())
    columns = {"route": route, "candidates": pa.array(np.zeros(n, dtype=np.int32))}
    for name, dtype in CANDIDATE_COLUMNS.items():
        batch = batch.append_column(name, columns.get(name, pa.nulls(n, dtype)))
    return batch


def _append(batch: pa.Table, verdicts: list[Assessment]) -> pa.Table:
    values = {
        "route": [v.route for v in verdicts], "candidates": [v.candidates for v in verdicts],
        "cue_flags": [v.flags for v in verdicts], "cue_output": [v.output for v in verdicts],
        "model_text": [v.model_text for v in verdicts], "cue_hint": [v.hint for v in verdicts],
        "counted_mentions": [v.counted for v in verdicts],
    }
    for name, dtype in CANDIDATE_COLUMNS.items():
        batch = batch.append_column(name, pa.array(values[name], dtype))
    return batch


def assess_note(text: str, questions: list[PlannedQuestion], plan: Plan, charttime=None) -> list[Assessment]:
    """One note, many questions: mentions per question, one context pass for all, then a verdict each.
    `charttime`: the note's time, which the dates of date questions are resolved against."""
    extraction = plan.job.extraction
    matches = [find_mentions(text, q.spec) for q in questions]
    spans = sorted({(m.start, m.end) for found in matches for m in found})
    context_of = dict(zip(spans, contexts(text, spans, tuple(extraction.context_rules), extraction.sentences)))
    verdicts = []
    for question, found in zip(questions, matches):
        ignore = set(question.spec.cues.ignore) if question.spec.cues else set()
        mentions = [Mention(m, context_of[(m.start, m.end)], not (context_of[(m.start, m.end)].flags & ignore)) for m in found]
        verdicts.append(assess(text, question, mentions, plan, charttime))
    return verdicts


def assess(text: str, question: PlannedQuestion, mentions: list[Mention], plan: Plan, charttime=None) -> Assessment:
    """Route and cue answer for one (note, question)."""
    extraction = plan.job.extraction
    spec = question.spec
    date_hint = note_date_hint(charttime) if spec.type == "date" else None
    if spec.cues is None:  # nothing to look for: only a model can answer, from the whole note
        return Assessment("lexical" if extraction.mode == "lexical" else "model", hint=date_hint)
    evidence_chars = plan.job.model.evidence_max_chars
    if spec.type == "yes_no":
        output, resolved = yes_no_answer(text, mentions, evidence_chars)
    elif spec.type == "date":
        output, resolved = date_answer(text, spec, mentions, evidence_chars, charttime)
    elif spec.type == "categorical":
        output, resolved = categorical_answer(text, spec, mentions, evidence_chars)
    else:
        output, resolved = numeric_answer(text, spec, mentions, evidence_chars)
    flags = ",".join(sorted({f for m in mentions for f in m.context.flags})) or None
    if not mentions:
        verdict = Assessment("no_candidate", 0, None, output)
        return _to_the_model(verdict, text, mentions, plan, date_hint) if extraction.mode == "model" else verdict
    counted = ";".join(f"{m.match.start}-{m.match.end}" for m in mentions if m.counts) or None
    verdict = Assessment("lexical", len(mentions), flags, output, counted=counted)
    if extraction.mode == "model":
        return _to_the_model(verdict, text, mentions, plan, date_hint)
    if extraction.mode == "lexical" or (extraction.ask_model == "unresolved" and resolved):
        return verdict
    verdict.route = "model"
    verdict.hint = mention_hint(text, mentions) + (f"; {date_hint}" if date_hint else "")
    if extraction.model_sees == "windows":
        verdict.model_text = windows(text, _spans(mentions), extraction.window_chars)
    return verdict


# --- cue answers, in the answer schemas' JSON -------------------------------------------------------------------
def yes_no_answer(text: str, mentions: list[Mention], evidence_chars: int) -> tuple[str, bool]:
    """yes if a mention counts; no if one is negated; else not in note. Resolved unless the mentions disagree."""
    counted = [m for m in mentions if m.counts]
    negated = [m for m in mentions if "negated" in m.context.flags]
    uncertain = any("uncertain" in m.context.flags for m in counted)
    if counted:
        answer, quote = "yes", counted[0]
    elif negated:
        answer, quote = "no", negated[0]
    else:
        answer, quote = "not_in_note", None
    evidence = quote_around(text, quote.match.start, quote.match.end, quote.context, evidence_chars) if quote else ""
    resolved = not uncertain and (not counted or len(counted) == len(mentions))
    return json.dumps({"evidence": evidence, "answer": answer}), resolved


def numeric_answer(text: str, spec: QuestionSpec, mentions: list[Mention], evidence_chars: int) -> tuple[str, bool]:
    """The extreme (or latest) value read after the lab's names, in an accepted unit and plausible range."""
    read: list[tuple[LabValue, float, Mention]] = []
    guessed = False
    for mention in (m for m in mentions if m.counts):
        for value in read_values(text, mention.match, spec):
            canonical, was_guessed = _canonical(value, spec)
            guessed |= was_guessed or canonical is None
            if canonical is not None:
                read.append((value, canonical, mention))
    if not read:
        return json.dumps({"evidence": "", "value": None, "unit": None}), not mentions
    if spec.rollup == "min":
        value, _, mention = min(read, key=lambda item: item[1])
    elif spec.rollup == "max":
        value, _, mention = max(read, key=lambda item: item[1])
    else:
        value, _, mention = max(read, key=lambda item: item[0].start)
    if value.unit_written:
        unit = value.unit
    else:
        unit = spec.unit if spec.minimum <= value.number <= spec.maximum else _guessed_unit(value, spec)
    same_line = text.find("\n", mention.match.start, value.start) < 0
    anchor = mention.match.start if same_line else value.start  # a column under a table header: quote the value's row
    evidence = quote_around(text, anchor, value.end, mention.context if same_line else _NO_SENTENCE, evidence_chars)
    return json.dumps({"evidence": evidence, "value": _as_written(value.number), "unit": unit}), not guessed


DATE_CHARS = 80  # a date phrase is read this far either side of a mention, within its sentence and line


def date_answer(text: str, spec: QuestionSpec, mentions: list[Mention], evidence_chars: int, charttime) -> tuple[str, bool]:
    """The date written nearest each mention that counts, resolved against the note's time; the most recent
    (rollup max, the default), the earliest (min) or the last written (latest). Unresolved (the model is asked in
    hybrid mode) where a phrase was found that cannot be resolved (a relative date in a note without a charttime,
    "POD 3" without an operation date) where the mentions give different dates, the question's roll-up picks one."""
    picked = []
    unresolved = False
    for mention in (m for m in mentions if m.counts):
        lo, hi = near(text, mention.match.start, mention.match.end, mention.context, DATE_CHARS)
        phrases = find_dates(text, charttime, lo, hi, note=text)
        if not phrases:
            continue
        phrase = min(phrases, key=lambda p: min(abs(p.start - mention.match.end), abs(mention.match.start - p.end)))
        if not phrase.resolved:
            unresolved = True
            continue
        picked.append((phrase, mention))
    if not picked:
        return json.dumps({"evidence": "", "phrase": None, "date": None}), not unresolved
    if spec.effective_rollup == "min":
        phrase, mention = min(picked, key=lambda item: item[0].value)
    elif spec.effective_rollup == "max":
        phrase, mention = max(picked, key=lambda item: item[0].value)
    else:
        phrase, mention = max(picked, key=lambda item: item[0].start)
    start, end = min(phrase.start, mention.match.start), max(phrase.end, mention.match.end)
    evidence = quote_around(text, start, end, mention.context, evidence_chars)
    if phrase.written not in evidence:  # the quote must hold the phrase: quote from the phrase
        evidence = quote_around(text, phrase.start, phrase.end, mention.context, evidence_chars)
    return json.dumps({"evidence": evidence, "phrase": phrase.written[:40], "date": phrase.value.isoformat()}), \
        not unresolved


def _canonical(value: LabValue, spec: QuestionSpec) -> tuple[float | None, bool]:
    """(value in the canonical unit, whether the unit was guessed); None if no accepted unit makes it plausible."""
    if value.unit is None:
        return None, False
    if value.unit_written:
        canonical = value.number * spec.units[value.unit]
        return (canonical if spec.minimum <= canonical <= spec.maximum else None), False
    if spec.minimum <= value.number <= spec.maximum:
        return value.number, False
    unit = _guessed_unit(value, spec)  # '98,000' with no unit is a platelet count per uL
    return (None, True) if unit is None else (value.number * spec.units[unit], True)


def _guessed_unit(value: LabValue, spec: QuestionSpec) -> str | None:
    for unit, factor in spec.units.items():
        if spec.minimum <= value.number * factor <= spec.maximum:
            return unit
    return None


def _as_written(number: float) -> str:
    text = f"{number:.3f}".rstrip("0").rstrip(".")
    return text or "0"


# --- what the model is shown ------------------------------------------------------------------------------------
def windows(text: str, spans: list[tuple[int, int]], width: int) -> str:
    """The note's text around its mentions' (start, end) spans (merged where they overlap), in note order."""
    around = sorted((max(0, start - width), min(len(text), end + width)) for start, end in spans)
    merged: list[list[int]] = []
    for start, end in around:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return WINDOW_SEPARATOR.join(text[s:e] for s, e in merged)


def shown_text(text: str, question: PlannedQuestion, plan: Plan) -> str | None:
    """What the model is shown of `text` for `question` as the job serves it: the note itself (model_sees: note, or a
    question without cues), the windows around the question's mentions, or None where a windowed job sends the
    pair to no model (no mention). engine synth renders its training prompts with this."""
    extraction = plan.job.extraction
    if extraction.model_sees != "windows" or question.spec.cues is None:
        return text
    spans = [(m.start, m.end) for m in find_mentions(text, question.spec)]
    return windows(text, spans, extraction.window_chars) if spans else None


def mention_hint(text: str, mentions: list[Mention]) -> str:
    """The mentions and their context, for the model: 'Cue mentions: "AF" (negated); "afib" (hypothetical)'."""
    items = []
    for m in mentions[:HINT_MENTIONS]:
        flags = ", ".join(sorted(m.context.flags)) or "affirmed"
        items.append(f'"{text[m.match.start:m.match.end]}" ({flags})')
    more = f"; and {len(mentions) - HINT_MENTIONS} more" if len(mentions) > HINT_MENTIONS else ""
    return "Cue mentions: " + "; ".join(items) + more

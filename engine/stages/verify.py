"""Verify: check every model answer against its note before it may decide anything.

Grounding (engine.stages.ground) says whether a quote is in the note; it does not say whether the quote supports
the answer. A weak model quotes "platelets" and answers 103.1, or quotes the prompt's own unit list. A model
answer (route `model`, status `answered` or `not_in_note`) is verified when:

  * its evidence quote is grounded in the note (exact, or fuzzy when the quote is not the prompt's own text);
  * numeric: the value is one of the numbers written in the quote, read the way notes write them ("2.0" is 2,
    "98,000" is 98000, "30-35" holds 30 and 35, "x 10^9/L" and "mm3" are units, not numbers), in any unit the
    question accepts ("8.5 g/dL" supports 85 g/L), or the question's cap when the quote holds a value at or above
    it (LVEF "60-65%" supports 55); and a mention of the question's cues stands on the quote's line or in the
    few lines above it (a table's header);
  * yes/no: the quote overlaps a mention of the question's cues in the note (or, for a question without cues, one
    of the question's own content words); for a "yes", at least one such mention must count for the patient in
    its clinical context (medspaCy ConText, engine.stages.context, the same reading the cues use: a "yes" that quotes
    only "no h/o stroke", a family member's or a hypothetical mention, each as the question's `ignore` says, is
    not supported by its own quote). A "no" must not pass over a mention that counts: every mention of the note
    that counts for the patient must lie inside its quote (a "no" quoting "denies stroke" while the note also says
    "prior CVA 2019" has not addressed the evidence for "yes"; a "no" that quotes the one affirmed mention and
    disputes it is the model's reading, and stands). A "no" without a quote on an `absent: "no"` question claims
    nothing beyond "not in note" and passes when no mention counts;
  * date: the date phrase (`value_text`) is written in the quote, the date follows from it (the phrase, read by
    engine.stages.dates against the note's charttime, names a period that holds the answer's date: "2 weeks ago" in
    a note of 2026-03-10 is 2026-02-24, "March 2026" any day of that month), and a cue mention of the question stands
    on the quote's line within NEAR_CHARS of it;
  * categorical: the quote writes the choice (its words or a declared synonym) and a cue mention stands near it (the
    same);
  * "not in note": a yes/no question's note holds no mention that counts for the patient, and (hybrid mode) the cues
    read no value (no date, no choice) for a numeric (date, categorical) question.

Columns added: `verified` (true / false; null where there was no model answer to check: cue answers, errors)
and `verification` (why it failed). In hybrid mode a failed model answer gives way to the cue answer of the
same (note, question) (`model` becomes `cues`, `verified` stays false and the reason ends with "the cue answer
stands"); in model mode it is kept, and the roll-up does not let it decide a criterion
(engine.cohort.rollup: `<question>__unverified`).

The context of each cue mention comes from the candidate stage (`counted_mentions`: the spans of the mentions
that count for the patient), which reads it in the CPU read tasks in every mode but the null backend's, so the
model actor adds only regular expressions and comparisons per checked row. The null backend's constant answers
are not checked: they measure the pipeline and are no model's answers.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc

from engine.stages.choices import choice_in
from engine.stages.context import contexts
from engine.stages.dates import resolve_phrase
from engine.stages.cues import find_mentions
from engine.plan import Plan, PlannedQuestion
from engine.stages.generate import CUE_MODEL_NAME
from engine.stages.ground import fold, locate, text_lookup
from engine.stages.parse import parse_one
from engine.prompt import SYSTEM_PROMPT, unit_hint
from engine.cohort.units import conversion_factor
from engine.stages import require_columns

REQUIRED_COLUMNS = (  # what this stage reads
    "status", "route", "text", "question_id", "value_bool", "value_num", "unit", "evidence", "evidence_start",
    "evidence_end", "grounding", "model",
)

VERIFY_COLUMNS = {"verified": pa.bool_(), "verification": pa.string()}
HEADER_LINES = 3  # a numeric quote's lab name may stand this many lines above it (a table's header row)
HEADER_CHARS = 400
RELATIVE_TOLERANCE = 1e-6
CUE_ANSWER_STANDS = "the cue answer stands"

# Failure categories: the text of `verification` up to " (" is one of these (report.json counts them).
NO_QUOTE = "no evidence quote"
NOT_GROUNDED = "evidence not found in note"
PROMPT_QUOTE = "evidence quotes the prompt, not the note"
VALUE_NOT_IN_QUOTE = "value not in evidence quote"
NO_MENTION = "evidence holds no mention of the question"
CONTEXT = "evidence's mention does not count for the patient"
PASSED_OVER = "a no that passes over a mention that counts"
PHRASE_NOT_IN_QUOTE = "date phrase not in evidence quote"
DATE_DOES_NOT_FOLLOW = "date does not follow from the phrase and the note's date"
CHOICE_NOT_IN_QUOTE = "choice not in evidence quote"
NOT_IN_NOTE_CONTRADICTED = "not in note, but the note has it"
CHECKED_STATUSES = ["answered", "not_in_note"]

# "x 10^9/L", "10*3", "10e9", "10³": powers of ten in units are not values; nor are digits glued to letters
# ("mm3", "A1c", "CHADS2"), which the number pattern's look-behind leaves out.
_POWER_OF_TEN = re.compile(r"(?:[x\u00d7*]\s*)?10\s*(?:\^|\*\*|\*|e)\s*-?\d+|10[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+", re.I)
_QUOTE_NUMBER = re.compile(r"(?<![A-Za-z0-9])(\d{1,3}(?:,\d{3})+(?![\d])|\d+(?:\.\d+)?|\.\d+)([kK](?![a-zA-Z]))?")
_STOP_WORDS = frozenset("""
    does document documents documented note notes patient patients that this have has had with which what when
    from into than their there these those about during within past last month months year years highest lowest
    value values reported report serum total blood level levels score including planned requires require
    """.split())


def quote_numbers(quote: str) -> list[float]:
    """The numbers written in a quote, as notes write them (see the module docstring); '98K' also gives 98000."""
    cleaned = _POWER_OF_TEN.sub(" ", quote)
    numbers = []
    for match in _QUOTE_NUMBER.finditer(cleaned):
        number = float(match.group(1).replace(",", ""))
        numbers.append(number)
        if match.group(2):
            numbers.append(number * 1000)
    return numbers


def value_in_quote(value: float, unit: str | None, quote: str, question: PlannedQuestion) -> bool:
    """Whether `value` (in `unit`) is written in `quote`, in any unit the question accepts, or is its cap."""
    spec = question.spec
    factor = conversion_factor(unit, spec)
    if factor is None or not math.isfinite(value):
        return False
    canonical = value * factor
    factors = {f for f in spec.units.values() if f}
    numbers = quote_numbers(quote)
    for number in numbers:
        if _close(number, value) or any(_close(number * f, canonical) for f in factors):
            return True
    if spec.cap is not None and _close(canonical, spec.cap):
        return any(number * f >= spec.cap * (1 - RELATIVE_TOLERANCE) for number in numbers for f in factors)
    return False


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9)


def content_words(question: PlannedQuestion) -> list[str]:
    """The question's own words that name what it asks about (for a question without cues)."""
    words = re.findall(r"[A-Za-z][A-Za-z-]{3,}", question.spec.question)
    return sorted({w.lower() for w in words if w.lower() not in _STOP_WORDS}, key=len, reverse=True)


def mentions_in(text: str, start: int, end: int, question: PlannedQuestion) -> bool:
    """A mention of the question's cues overlapping text[start:end] (its content words, without cues)."""
    if question.spec.cues is not None and (question.spec.cues.terms or question.spec.cues.abbreviations):
        return any(m.start < end and start < m.end for m in find_mentions(text, question.spec))
    window = text[start:end].lower()
    return any(re.search(rf"(?<![a-z]){re.escape(w)}", window) for w in content_words(question))


def _header_start(text: str, start: int) -> int:
    """Where the quote's line starts, moved up HEADER_LINES lines (at most HEADER_CHARS characters)."""
    position = text.rfind("\n", 0, start) + 1
    for _ in range(HEADER_LINES):
        if position == 0 or start - position >= HEADER_CHARS:
            break
        position = text.rfind("\n", 0, position - 1) + 1
    return max(position, start - HEADER_CHARS)


def _line_end(text: str, end: int) -> int:
    found = text.find("\n", end)
    return len(text) if found < 0 else found


def _in_prompt(quote: str, question: PlannedQuestion) -> bool:
    """Whether the quote is the prompt's own text (instructions, question, unit list) rather than the note's."""
    folded, _ = fold(re.sub(r"\s+", " ", quote.strip()))
    return len(folded) >= 3 and folded in _folded_prompt(question.spec.question, unit_hint(question))


@lru_cache(maxsize=256)
def _folded_prompt(question: str, hint: str) -> str:
    return fold(f"{SYSTEM_PROMPT}\n{question}{hint}")[0]


def check_answer(row: dict, text: str, question: PlannedQuestion, counts=None) -> str | None:
    """None when a model's answered row holds up against its note, else the failure category with details.
    `counts(start, end)` says whether the cue mention at that span counts for the patient (its context is not one
    the question ignores); without it the context checks of yes/no answers are left out."""
    quote = row["evidence"]
    spec = question.spec
    said = _said(row, spec.type)
    if not quote:
        if spec.type == "yes_no" and row["value_bool"] is False and spec.absent == "no":
            # "no" with nothing quoted claims no more than "not in note", which is "no" here, unless it passes over
            # a mention that counts
            passed_over = _counted_outside(text, 0, 0, question, counts)
            return f"{PASSED_OVER} (model: no, unaddressed: {passed_over!r})" if passed_over else None
        return f"{NO_QUOTE} (model: {said})"
    detail = f"(model: {said}, quote: {quote[:60]!r})"
    if row["grounding"] not in ("exact", "fuzzy") or row["evidence_start"] is None:
        return f"{NOT_GROUNDED} {detail}"
    if _in_prompt(quote, question) and row["grounding"] != "exact":
        return f"{PROMPT_QUOTE} {detail}"
    start, end = row["evidence_start"], row["evidence_end"]
    if spec.type == "numeric":
        if not value_in_quote(row["value_num"], row["unit"], text[start:end], question):
            return f"{VALUE_NOT_IN_QUOTE} {detail}"
        start, end = _header_start(text, start), _line_end(text, end)
    elif spec.type == "date":
        problem = _date_problem(row, text, text[start:end])
        if problem:
            return f"{problem} {detail}"
        start, end = _near(text, start, end)
    elif spec.type == "categorical":
        if not choice_in(text[start:end], spec, row["value_text"] or ""):
            return f"{CHOICE_NOT_IN_QUOTE} {detail}"
        start, end = _near(text, start, end)
    if not mentions_in(text, start, end, question):
        return f"{NO_MENTION} {detail}"
    if spec.type == "yes_no" and row["value_bool"] and not _a_quoted_mention_counts(text, start, end, question, counts):
        return f"{CONTEXT} {detail[:-1]}, ignored: {', '.join(spec.cues.ignore)})"
    if spec.type == "yes_no" and row["value_bool"] is False:
        passed_over = _counted_outside(text, start, end, question, counts)
        if passed_over:
            return f"{PASSED_OVER} {detail[:-1]}, unaddressed: {passed_over!r})"
    return None


def _date_problem(row: dict, text: str, quote: str) -> str | None:
    """None when the date phrase is in the quote and names a period that holds the answer's date."""
    phrase = (row.get("value_text") or "").strip()
    folded_quote = re.sub(r"\s+", " ", quote).lower()
    if not phrase or re.sub(r"\s+", " ", phrase).lower() not in folded_quote:
        return PHRASE_NOT_IN_QUOTE
    named = resolve_phrase(phrase, row.get("charttime"), note=text)
    value = row.get("value_date")
    if named is None or not named.resolved or value is None or not named.first <= value <= named.last:
        return DATE_DOES_NOT_FOLLOW
    return None


NEAR_CHARS = 80  # a date's or a choice's mention stands on the quote's line, at most this far from it (as the cues read)


def _near(text: str, start: int, end: int) -> tuple[int, int]:
    return max(text.rfind("\n", 0, start) + 1, start - NEAR_CHARS), min(_line_end(text, end), end + NEAR_CHARS)


def _counted_outside(text: str, start: int, end: int, question: PlannedQuestion, counts) -> str:
    """A mention that counts for the patient outside text[start:end], as written, or ''. A "no" that passes over
    one has not addressed the evidence for "yes"."""
    if counts is None or question.spec.cues is None:
        return ""
    for m in find_mentions(text, question.spec):
        if (m.end <= start or m.start >= end) and counts(m.start, m.end):
            return text[m.start:m.end]
    return ""


def _a_quoted_mention_counts(text: str, start: int, end: int, question: PlannedQuestion, counts) -> bool:
    """Whether a cue mention in text[start:end] counts for the patient (True when that cannot be told)."""
    if counts is None or question.spec.cues is None or not question.spec.cues.ignore:
        return True
    found = [m for m in find_mentions(text, question.spec) if m.start < end and start < m.end]
    return not found or any(counts(m.start, m.end) for m in found)


def counted_mention_spans(text: str, question: PlannedQuestion, plan: Plan) -> list[tuple[int, int]]:
    """The spans of the question's cue mentions that count for the patient, from one medspaCy pass (what the
    candidate stage hands on in `counted_mentions`; computed here for batches that lack it)."""
    if question.spec.cues is None:
        return []
    ignore = set(question.spec.cues.ignore)
    spans = [(m.start, m.end) for m in find_mentions(text, question.spec)]
    extraction = plan.job.extraction
    found = contexts(text, spans, tuple(extraction.context_rules), extraction.sentences) if spans else []
    return [span for span, context in zip(spans, found) if not (context.flags & ignore)]


def counts_from(spans) -> object:
    """counts(start, end) over the spans of the mentions that count: a list of pairs, or the candidate stage's
    `counted_mentions` text ("12-14;40-59", '' or None for none)."""
    if isinstance(spans, str) or spans is None:
        spans = [tuple(int(x) for x in item.split("-")) for item in (spans or "").split(";") if item]
    counted = set(map(tuple, spans))
    return lambda start, end: (start, end) in counted


def check_row(row: dict, text: str, plan: Plan, counted_mentions: str | None, cue_output: str | None = None) -> str | None:
    """The check of one model row (answered or not in note) against its note; None when it holds up.
    `counted_mentions`: the spans of the cue mentions that count for the patient (see counts_from)."""
    question = plan.by_id[row["question_id"]]
    counts = counts_from(counted_mentions) if question.spec.type == "yes_no" else None
    if row["status"] == "not_in_note":
        cue_answer = parse_one(plan, question.id, None, "stop", cue_output) if cue_output else None
        return check_not_in_note(text, question, counts, cue_answer)
    return check_answer(row, text, question, counts)


def check_not_in_note(text: str, question: PlannedQuestion, counts=None, cue_answer: dict | None = None) -> str | None:
    """None when a model's "not in note" holds up, else why not: a yes/no question's note holds a mention that counts
    for the patient, or the cues read a value for a numeric question (`cue_answer`, hybrid mode)."""
    if question.spec.type == "yes_no":
        passed_over = _counted_outside(text, 0, 0, question, counts)
        return f"{NOT_IN_NOTE_CONTRADICTED} (model: not_in_note, unaddressed: {passed_over!r})" if passed_over else None
    if cue_answer and cue_answer.get("status") == "answered" and cue_answer.get("value_num") is not None:
        unit = f" {cue_answer['unit']}" if cue_answer.get("unit") else ""
        return f"{NOT_IN_NOTE_CONTRADICTED} (model: not_in_note, cues read: {cue_answer['value_num']:g}{unit})"
    if cue_answer and cue_answer.get("status") == "answered" and question.spec.type in ("date", "categorical"):
        read = cue_answer.get("value_date") or cue_answer.get("value_text")
        return f"{NOT_IN_NOTE_CONTRADICTED} (model: not_in_note, cues read: {read})"
    return None


def _said(row: dict, kind: str) -> str:
    if kind == "yes_no":
        return "yes" if row["value_bool"] else "no"
    if kind == "date":
        return f"{row.get('value_date')} from {row.get('value_text')!r}"
    if kind == "categorical":
        return str(row.get("value_text"))
    unit = f" {row['unit']}" if row["unit"] else ""
    return f"{row['value_num']:g}{unit}"


CHECKED = ["question_id", "status", "value_bool", "value_num", "unit", "evidence", "evidence_start", "evidence_end",
           "grounding"]
CHECKED_IF_PRESENT = ["value_date", "value_text", "charttime"]  # date and categorical answers (absent in old batches)


def verify_answers(batch: pa.Table, plan: Plan) -> pa.Table:
    """Append VERIFY_COLUMNS to grounded rows (which still hold `text`); in hybrid mode a failed model answer gives
    way to its cue answer. Rows without a model answer cost nothing: the check is per model-answered row."""
    require_columns(batch, "verify", REQUIRED_COLUMNS)
    n = batch.num_rows
    verified, reasons = [None] * n, [None] * n
    if not plan.verifies_model_answers or n == 0:  # the null backend's constant answers (benchmarks): no model
        return _with_verification(batch, verified, reasons)
    claims = pc.is_in(batch["status"], value_set=pa.array(CHECKED_STATUSES))
    answered = pc.fill_null(pc.and_(claims, pc.equal(batch["route"], "model")), False)
    rows = pc.indices_nonzero(answered).to_pylist()
    replaced: dict[int, dict] = {}
    if rows:
        columns = CHECKED + [c for c in CHECKED_IF_PRESENT if c in batch.column_names]
        picked = batch.select(columns).take(pa.array(rows)).to_pylist()
        text_of = text_lookup(batch["text"].combine_chunks())
        cue_outputs = batch["cue_output"].combine_chunks() if "cue_output" in batch.column_names else None
        handed_on = batch["counted_mentions"].combine_chunks() if "counted_mentions" in batch.column_names else None
        hybrid = plan.job.extraction.mode == "hybrid"
        for row, values in zip(rows, picked):
            text = text_of(row) or ""
            cue = cue_outputs[row].as_py() if cue_outputs is not None else None
            if handed_on is not None:
                counted = handed_on[row].as_py()
            else:  # a batch that did not pass the candidate stage (tests, tools): one ConText pass here
                counted = counted_mention_spans(text, plan.by_id[values["question_id"]], plan)
            reason = check_row(values, text, plan, counted, cue)
            verified[row] = reason is None
            reasons[row] = reason
            if reason is not None and hybrid and cue is not None:
                replaced[row] = _cue_answer(plan, values["question_id"], cue, text)
                reasons[row] = f"{reason}; {CUE_ANSWER_STANDS}"
    if replaced:
        batch = _replace(batch, replaced)
    return _with_verification(batch, verified, reasons)


def _with_verification(batch: pa.Table, verified: list, reasons: list) -> pa.Table:
    for name, values in (("verified", verified), ("verification", reasons)):
        dtype = VERIFY_COLUMNS[name]
        checked = any(v is not None for v in values)
        batch = batch.append_column(name, pa.array(values, dtype) if checked else pa.nulls(batch.num_rows, dtype))
    return batch


def _cue_answer(plan: Plan, question_id: str, cue_output: str, text: str) -> dict:
    answer = parse_one(plan, question_id, None, "stop", cue_output)
    start, end, grounding = locate(answer.get("evidence"), text)
    return {**answer, "evidence_start": start, "evidence_end": end, "grounding": grounding, "model": CUE_MODEL_NAME}


REPLACED_COLUMNS = ["status", "value_bool", "value_num", "unit", "value_date", "value_text", "evidence", "error", "evidence_start", "evidence_end",
                    "grounding", "model"]


def _replace(batch: pa.Table, replaced: dict[int, dict]) -> pa.Table:
    """The cue answer's fields in place of the model's on the replaced rows (every other row untouched)."""
    for name in REPLACED_COLUMNS:
        index = batch.schema.get_field_index(name)
        column = batch[name]
        plain = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        values = column.cast(plain).to_pylist()
        for row, answer in replaced.items():
            values[row] = answer.get(name)
        batch = batch.set_column(index, name, pa.array(values, plain))
    return batch

"""Prompt rendering: the note comes first so every question of a note shares it as a cached prefix.

Everything that does not depend on the question (instructions, both answer formats, the note) is in the shared
prefix; the per-question suffix is only the question itself, so a note's 23 questions add few computed tokens.
"""

from __future__ import annotations

from engine.plan import PlannedQuestion

SYSTEM_PROMPT = (
    "You read one clinical note and answer one question about the patient the note is about. "
    "Reply with one JSON object. First quote the shortest exact text from the note that answers the question "
    "as evidence, then give the answer. Only the patient's own findings count: not a family member's, not "
    "negated ('no AF', 'denies'), not ruled out, not hypothetical. If the note does not say, answer "
    "not_in_note (yes/no questions) or a null value (numbers) with empty evidence.\n"
    'Yes/no questions: {"evidence": "<exact quote or empty>", "answer": "yes" | "no" | "not_in_note"}\n'
    'Number questions: {"evidence": "<exact quote or empty>", "value": "<number as written>" | null, "unit": "<unit>" | null}\n'
    'Date questions: {"evidence": "<exact quote or empty>", "phrase": "<the date as the quote writes it>" | null, '
    '"date": "<YYYY-MM-DD, relative dates counted from the note date>" | null}\n'
    'Choice questions: {"evidence": "<exact quote or empty>", "choice": "<one of the choices>" | null}'
)
NOTE_HEADER = "NOTE:\n"
QUESTION_HEADER = "\n\nQUESTION: "


def render_messages(note_text: str, question: PlannedQuestion, hint: str = "") -> list[dict[str, str]]:
    """Chat messages for one (note, question). Everything up to QUESTION_HEADER is identical across questions;
    `hint` (hybrid mode: the cue mentions and their context flags) goes after the question."""
    hint = f"\n({hint})" if hint else ""
    user = f"{NOTE_HEADER}{note_text}{QUESTION_HEADER}{question.spec.question}{unit_hint(question)}{hint}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def unit_hint(question: PlannedQuestion) -> str:
    """What the answer may be, after the question: the units of a number, the choices of a choice question."""
    if question.spec.type == "categorical":
        return f" (choices: {' or '.join(question.spec.choices)})"
    if question.spec.type != "numeric":
        return ""
    return f" (unit: {' or '.join(question.spec.units)})"


def note_date_hint(charttime) -> str:
    """A date question's hint: the note's date, which relative dates ("2 weeks ago") count from."""
    return f"Note date: {charttime:%Y-%m-%d}" if charttime is not None else "Note date: not given"

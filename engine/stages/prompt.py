"""Prompt rendering: the note comes first so every question of a note shares it as a cached prefix."""

from __future__ import annotations

from engine.plan import PlannedQuestion

SYSTEM_PROMPT = (
    "You read one clinical note and answer one question about the patient the note is about. "
    "Reply with one JSON object. First quote the shortest exact text from the note that answers the question "
    "as evidence, then give the answer. Only the patient's own findings count: not a family member's, not "
    "negated ('no AF', 'denies'), not ruled out, not hypothetical. If the note does not say, answer "
    "not_in_note (yes/no questions) or a null value (numbers) with empty evidence."
)
NOTE_HEADER = "NOTE:\n"
QUESTION_HEADER = "\n\nQUESTION: "


def render_messages(note_text: str, question: PlannedQuestion) -> list[dict[str, str]]:
    """Chat messages for one (note, question). Everything up to QUESTION_HEADER is identical across questions."""
    user = f"{NOTE_HEADER}{note_text}{QUESTION_HEADER}{question.spec.question}\nReply as {question.template}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def prompt_overhead_chars(question: PlannedQuestion) -> int:
    """Characters a prompt adds around the note (for budgeting the note against the context length)."""
    return len(render_messages("", question)[0]["content"]) + len(render_messages("", question)[1]["content"])

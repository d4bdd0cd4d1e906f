"""engine.prompt: the note comes first so a note's questions share one cached prefix."""

from __future__ import annotations

from pathlib import Path

from engine.job import load_job
from engine.plan import make_plan
from engine.prompt import NOTE_HEADER, QUESTION_HEADER, SYSTEM_PROMPT, render_messages

PLAN = make_plan(load_job(Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml"))
NOTE = "Discharge summary.\r\nHx: atrial fibrillation, Cr 1.4 mg/dL \u2265 baseline, QUESTION: not a real one.\n\n\u00b5 \U0001F600"


def flatten(messages: list[dict]) -> str:
    return "".join(f"<{m['role']}>{m['content']}" for m in messages)


def common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_two_questions_of_a_note_share_everything_up_to_the_question_header():
    yes_no, numeric = PLAN.by_id["atrial_fibrillation"], PLAN.by_id["creatinine_max"]
    first, second = render_messages(NOTE, yes_no), render_messages(NOTE, numeric)
    assert [m["role"] for m in first] == [m["role"] for m in second] == ["system", "user"]
    assert first[0] == second[0] == {"role": "system", "content": SYSTEM_PROMPT}
    shared = common_prefix(flatten(first), flatten(second))
    expected = flatten([first[0]]) + f"<user>{NOTE_HEADER}{NOTE}{QUESTION_HEADER}"
    assert shared.startswith(expected)
    # and nothing of the question leaks before the header: the first difference is in the question text
    assert len(shared) - len(expected) < min(len(yes_no.spec.question), len(numeric.spec.question))


def test_every_question_pair_shares_the_note_prefix():
    prefix = f"{NOTE_HEADER}{NOTE}{QUESTION_HEADER}"
    for question in PLAN.questions:
        system, user = render_messages(NOTE, question)
        assert system["content"] == SYSTEM_PROMPT
        assert user["content"].startswith(prefix), question.id


def test_the_note_comes_before_the_question_and_the_unit_hint():
    question = PLAN.by_id["creatinine_max"]
    user = render_messages(NOTE, question)[1]["content"]
    note_at = user.index(NOTE)
    question_at = user.index(question.spec.question)
    assert note_at < user.index(QUESTION_HEADER) < question_at
    assert user.rindex(QUESTION_HEADER) == len(NOTE_HEADER) + len(NOTE)  # the header that counts follows the note
    assert user.index("(unit: mg/dL or umol/L)") > question_at
    assert NOTE not in render_messages(NOTE, question)[0]["content"]


def test_note_text_is_passed_verbatim():
    for text in ("", " ", "line one\r\nline two\ttab", "x" * 20_000):
        user = render_messages(text, PLAN.questions[0])[1]["content"]
        assert user[len(NOTE_HEADER):len(NOTE_HEADER) + len(text)] == text


def test_different_notes_differ_right_after_the_note_header():
    question = PLAN.questions[0]
    a = flatten(render_messages("alpha note", question))
    b = flatten(render_messages("beta note", question))
    assert common_prefix(a, b).endswith(NOTE_HEADER)


def test_the_suffix_after_the_note_is_only_the_question():
    """Answer formats live in the shared prefix; the per-question suffix stays short (fewer computed tokens)."""
    for question in PLAN.questions:
        user = render_messages(NOTE, question)[1]["content"]
        suffix = user[len(NOTE_HEADER) + len(NOTE):]
        assert suffix.startswith(QUESTION_HEADER + question.spec.question)
        assert len(suffix) <= len(QUESTION_HEADER) + len(question.spec.question) + 60
    assert '"answer": "yes" | "no" | "not_in_note"' in SYSTEM_PROMPT and '"value":' in SYSTEM_PROMPT

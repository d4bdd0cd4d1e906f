"""engine.backends.fit without a tokenizer (a hosted model): the note cut by characters, head and tail kept, marked.
The token cut (TokenFitter) is checked against a real server's token counts in tests/e2e/test_openai_server.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.backends.fit import CHARS_PER_TOKEN, HEAD_SHARE, TRUNCATION_MARK, CharacterFitter
from engine.errors import BackendError
from engine.job import load_job
from engine.plan import make_plan
from engine.prompt import render_messages

JOB = load_job(Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml")


def plan_with(**model):
    return make_plan(JOB.model_copy(update={"model": JOB.model.model_copy(update=model)}))


def test_a_note_that_fits_is_sent_whole():
    fitter = CharacterFitter(plan_with(max_model_len=4096))
    assert fitter.fit("AF on apixaban.") == ("AF on apixaban.", False)


def test_a_long_note_keeps_its_head_and_tail_within_the_budget():
    plan = plan_with(max_model_len=1024, max_tokens=96)
    fitter = CharacterFitter(plan)
    overhead = max(sum(len(m["content"]) for m in render_messages("", q)) for q in plan.questions)
    prompt_tokens = (len("x" * fitter.budget_chars) + overhead) / CHARS_PER_TOKEN
    assert prompt_tokens <= 1024 - 96  # at CHARS_PER_TOKEN the prompt and the answer fit the context
    note = "".join(chr(ord("a") + i % 26) for i in range(20_000))
    cut, truncated = fitter.fit(note)
    assert truncated and len(cut) == fitter.budget_chars and TRUNCATION_MARK in cut
    head, tail = cut.split(TRUNCATION_MARK)
    assert note.startswith(head) and note.endswith(tail) and len(head) == int((fitter.budget_chars - len(TRUNCATION_MARK)) * HEAD_SHARE)


def test_a_context_too_small_for_any_note_says_so():
    with pytest.raises(BackendError, match="max_model_len 256 leaves no room for the note; raise it"):
        CharacterFitter(plan_with(max_model_len=256, max_tokens=96))

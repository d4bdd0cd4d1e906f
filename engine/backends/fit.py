"""Prompts and note fitting shared by the backends: one rendering, one cut, whichever process or server runs the model.

The vLLM actor and the openai backend (with the model's tokenizer at hand) render the same chat template over the
same messages (engine.prompt) and cut an over-long note at the same token offsets, so a model served by `vllm serve`
sees exactly the tokens the in-process engine would (and the ones `engine train` trained on). Without the model's
tokenizer (a hosted model) the cut is made by characters, conservatively, and the server's own token count is
what the report shows.
"""

from __future__ import annotations

from engine.errors import BackendError
from engine.plan import Plan, PlannedQuestion
from engine.prompt import render_messages

TRUNCATION_MARK = "\n[... note truncated to fit the model's context ...]\n"
HEAD_SHARE = 0.67  # keep the start (history, problem list) and the end (discharge labs, diagnoses)
SAFETY_TOKENS = 16
MIN_NOTE_TOKENS = 64
CHARS_PER_TOKEN = 3  # without the tokenizer: clinical English runs 3.5-4.5 characters a token, so 3 errs short


def _budget(plan: Plan, overhead_tokens: int) -> int:
    budget = plan.job.model.max_model_len - plan.job.model.max_tokens - overhead_tokens - SAFETY_TOKENS
    if budget < MIN_NOTE_TOKENS:
        raise BackendError(f"model.max_model_len {plan.job.model.max_model_len} leaves no room for the note; raise it")
    return budget


def _cut(text: str, head_end: int, tail_start: int) -> str:
    return text[:head_end] + TRUNCATION_MARK + text[tail_start:]


class TokenFitter:
    """The model's own tokenizer: the chat template it serves with, the note cut by token offsets."""

    def __init__(self, tokenizer, plan: Plan):
        self.tokenizer = tokenizer
        self.budget = _budget(plan, max(len(self.prompt_ids("", q)) for q in plan.questions))

    def prompt(self, note_text: str, question: PlannedQuestion, hint: str = "") -> str:
        messages = render_messages(note_text, question, hint)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, note_text: str, question: PlannedQuestion) -> list[int]:
        return self.tokenizer(self.prompt(note_text, question), add_special_tokens=False)["input_ids"]

    def fit(self, text: str) -> tuple[str, bool]:
        """Cut a note that would overflow the context: keep its head and tail by token offsets; say if cut."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if len(offsets) <= self.budget:
            return text, False
        keep = self.budget - len(self.tokenizer(TRUNCATION_MARK, add_special_tokens=False)["input_ids"])
        head = int(keep * HEAD_SHARE)
        tail = keep - head
        return _cut(text, offsets[head - 1][1], offsets[len(offsets) - tail][0]), True


class CharacterFitter:
    """No tokenizer (a hosted model): the budget in characters at CHARS_PER_TOKEN, the same head and tail shares."""

    def __init__(self, plan: Plan):
        overhead = max(sum(len(m["content"]) for m in render_messages("", q)) for q in plan.questions)
        self.budget_chars = _budget(plan, -(-overhead // CHARS_PER_TOKEN)) * CHARS_PER_TOKEN

    def fit(self, text: str) -> tuple[str, bool]:
        if len(text) <= self.budget_chars:
            return text, False
        keep = self.budget_chars - len(TRUNCATION_MARK)
        head = int(keep * HEAD_SHARE)
        return _cut(text, head, len(text) - (keep - head)), True

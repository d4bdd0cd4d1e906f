"""A backend that answers 'not in note' instantly: measures the pipeline without a model (benchmarks)."""

from __future__ import annotations

import json

from engine.backends.base import Backend, Generation, Request
from engine.plan import Plan

NOT_IN_NOTE = {
    "yes_no": json.dumps({"evidence": "", "answer": "not_in_note"}),
    "numeric": json.dumps({"evidence": "", "value": None, "unit": None}),
    "date": json.dumps({"evidence": "", "phrase": None, "date": None}),
    "categorical": json.dumps({"evidence": "", "choice": None}),
}


class NullBackend(Backend):
    name = "null"

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.answers = {q.id: NOT_IN_NOTE[q.spec.type] for q in plan.questions}

    def constant_answers(self) -> dict[str, str]:
        return self.answers

    def generate(self, requests: list[Request]) -> list[Generation]:
        return [Generation(text=self.answers[r.question.id]) for r in requests]

    @property
    def model_name(self) -> str:
        return "null"

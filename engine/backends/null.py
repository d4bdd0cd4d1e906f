"""A backend that answers 'not in note' instantly: measures the pipeline without a model (benchmarks)."""

from __future__ import annotations

import json

from engine.backends.base import Backend, Generation, Request


class NullBackend(Backend):
    name = "null"

    def generate(self, requests: list[Request]) -> list[Generation]:
        return [Generation(text=_not_in_note(r)) for r in requests]

    @property
    def model_name(self) -> str:
        return "null"


def _not_in_note(request: Request) -> str:
    if request.question.spec.type == "yes_no":
        return json.dumps({"evidence": "", "answer": "not_in_note"})
    return json.dumps({"evidence": "", "value": None, "unit": None})

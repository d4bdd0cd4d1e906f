"""A backend that answers from the job's cues alone: values read with their units, presence with context.

The same answers as extraction mode lexical, behind the model interface, so any job can be run (and scored with
`engine eval`) as a rule-based baseline, and machines without a model still get answers. A question without
cues gets an error row saying so; nothing is made up.
"""

from __future__ import annotations

from engine.backends.base import Backend, Generation, Request
from engine.plan import Plan
from engine.stages.candidates import NO_CUES_ERROR, assess_note


class LexicalBackend(Backend):
    name = "lexical"

    def __init__(self, plan: Plan):
        lexical = plan.job.model_copy(update={"extraction": plan.job.extraction.model_copy(update={"mode": "lexical"})})
        super().__init__(Plan(job=lexical, questions=plan.questions, by_id=plan.by_id))

    def generate(self, requests: list[Request]) -> list[Generation]:
        by_note: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_note.setdefault(request.note_key, []).append(index)
        results: list[Generation | None] = [None] * len(requests)
        for indices in by_note.values():
            text = requests[indices[0]].note_text
            verdicts = assess_note(text, [requests[i].question for i in indices], self.plan)
            for i, verdict in zip(indices, verdicts):
                error = None if verdict.output is not None else NO_CUES_ERROR
                results[i] = Generation(text=verdict.output, error=error)
        return results

    @property
    def model_name(self) -> str:
        return "lexical"

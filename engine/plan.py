"""Job -> plan: each question with its answer model, JSON schema and prompt suffix, in job order."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from engine.constraints import answer_model_for, json_schema_for
from engine.job import JobSpec, QuestionSpec


@dataclass(frozen=True)
class PlannedQuestion:
    spec: QuestionSpec
    answer_model: type[BaseModel]
    json_schema: dict

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True)
class Plan:
    job: JobSpec
    questions: list[PlannedQuestion]
    by_id: dict[str, PlannedQuestion] = field(repr=False)

    @property
    def question_ids(self) -> list[str]:
        return [q.id for q in self.questions]

    @property
    def verifies_model_answers(self) -> bool:
        """Model answers are checked against their notes (engine.stages.verify), except the null backend's: its
        "not in note" for every pair measures the pipeline, it is no model's answer."""
        return self.job.model.backend != "null" and self.job.extraction.mode != "lexical"


def make_plan(job: JobSpec) -> Plan:
    planned = [
        PlannedQuestion(spec=q, answer_model=(m := answer_model_for(q, job.model.evidence_max_chars)),
                        json_schema=json_schema_for(m))
        for q in job.questions
    ]
    return Plan(job=job, questions=planned, by_id={q.id: q for q in planned})

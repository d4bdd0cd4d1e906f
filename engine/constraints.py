"""Pydantic answer model -> decoding constraint, in one place.

The enforcing backend was chosen by measurement (shared/RECIPES.md, re-checked in tests/e2e): vLLM structured
outputs with xgrammar and `disable_any_whitespace` gave 8/8 schema-valid answers from a random-weight model, where
outlines' regex (it drops `pattern` on bounded strings) and the guidance backend (extra keys) did not.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, create_model

from engine.job import QuestionSpec
from schemas import CategoricalAnswer, DateAnswer, NumericAnswer, YesNoAnswer
from schemas.numeric import number_pattern


def answer_model_for(question: QuestionSpec, evidence_max_chars: int) -> type[BaseModel]:
    """The question's answer model: the schema in schemas/, narrowed to this question (units, evidence length)."""
    evidence = (str, Field(max_length=evidence_max_chars, description=YesNoAnswer.model_fields["evidence"].description))
    name = "".join(part.title() for part in question.id.split("_")) + "Answer"
    if question.type == "yes_no":
        return create_model(name, __base__=YesNoAnswer, evidence=evidence)
    if question.type == "date":
        return create_model(name, __base__=DateAnswer, evidence=evidence)
    if question.type == "categorical":
        choices = tuple(question.choices)
        choice = (Literal[choices] | None, Field(description=f"One of {', '.join(choices)}; null if the note does not say."))  # type: ignore[valid-type]
        return create_model(name, __base__=CategoricalAnswer, evidence=evidence, choice=choice)
    units = tuple(question.units)
    unit = (Literal[units] | None, Field(description=f"One of {', '.join(units)}; null if not in note."))  # type: ignore[valid-type]
    # As many integer digits as the largest plausible value in any accepted unit needs, and no more.
    largest = max(question.maximum / factor for factor in question.units.values())
    digits = min(max(len(str(int(largest))), 1), 9)
    value = (Annotated[str, Field(pattern=number_pattern(digits))] | None, NumericAnswer.model_fields["value"])
    return create_model(name, __base__=NumericAnswer, evidence=evidence, unit=unit, value=value)


def json_schema_for(model: type[BaseModel]) -> dict:
    """JSON schema handed to the grammar compiler. Every field is bounded, so generation cannot run away."""
    schema = model.model_json_schema()
    _forbid_extras(schema)
    return schema


def _forbid_extras(node: object) -> None:
    if isinstance(node, dict):
        if node.get("type") == "object":
            node["additionalProperties"] = False
        for value in node.values():
            _forbid_extras(value)
    elif isinstance(node, list):
        for value in node:
            _forbid_extras(value)

"""Parse: validate each model output against its question's answer model and type it.

Statuses: answered, not_in_note, error (with the reason in `error`). Nothing is filled with a made-up default.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import ValidationError

from engine.plan import Plan

ANSWER_FIELDS = {
    "status": pa.string(),
    "value_bool": pa.bool_(),
    "value_num": pa.float64(),
    "unit": pa.string(),
    "evidence": pa.string(),
    "error": pa.string(),
}
MAX_ERROR_CHARS = 300


def parse_answers(batch: pa.Table, plan: Plan) -> pa.Table:
    columns = {name: [] for name in ANSWER_FIELDS}
    rows = zip(
        batch["question_id"].to_pylist(),
        batch["note_error"].to_pylist(),
        batch["generation_error"].to_pylist(),
        batch["finish_reason"].to_pylist(),
        batch["raw_output"].to_pylist(),
    )
    for question_id, note_error, generation_error, finish_reason, raw in rows:
        parsed = parse_one(plan, question_id, note_error or generation_error, finish_reason, raw)
        for name in ANSWER_FIELDS:
            columns[name].append(parsed.get(name))
    for name, dtype in ANSWER_FIELDS.items():
        batch = batch.append_column(name, pa.array(columns[name], dtype))
    return batch.drop_columns(["raw_output", "generation_error", "note_error"])


def parse_one(plan: Plan, question_id: str, problem: str | None, finish_reason: str | None, raw: str | None) -> dict:
    """One row's typed answer, or status error with a reason a user can act on."""
    if problem:
        return {"status": "error", "error": problem}
    if raw is None:
        return {"status": "error", "error": "the model returned no output"}
    if finish_reason == "length":
        return {"status": "error", "error": f"answer reached model.max_tokens ({plan.job.model.max_tokens}) before the JSON closed; raise max_tokens or lower evidence_max_chars"}
    question = plan.by_id[question_id]
    try:
        answer = question.answer_model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "answer"
        return {"status": "error", "error": f"output does not match the answer schema ({where}: {first['msg']})"[:MAX_ERROR_CHARS]}
    evidence = answer.evidence.strip() or None
    if question.spec.type == "yes_no":
        if answer.answer == "not_in_note":
            return {"status": "not_in_note", "evidence": evidence}
        return {"status": "answered", "value_bool": answer.answer == "yes", "evidence": evidence}
    value = answer.number()
    if value is None:
        return {"status": "not_in_note", "evidence": evidence}
    spec = question.spec
    unit = answer.unit or spec.unit
    canonical = value * spec.units[unit]
    if not spec.minimum <= canonical <= spec.maximum:
        return {"status": "error", "evidence": evidence, "unit": unit,
                "error": f"value {value:g} {unit} is outside the plausible range {spec.minimum:g}-{spec.maximum:g} {spec.unit} for {spec.id}"}
    return {"status": "answered", "value_num": value, "unit": unit, "evidence": evidence}

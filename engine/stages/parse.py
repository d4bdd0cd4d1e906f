"""Parse: validate each model output against its question's answer model and type it.

Statuses: answered, not_in_note, error (with the reason in `error`). Nothing is filled with a made-up default.
"""

from __future__ import annotations

import datetime

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError

from engine.plan import Plan
from engine.stages import require_columns

REQUIRED_COLUMNS = (  # what this stage reads
    "question_id", "note_error", "generation_error", "finish_reason", "raw_output",
)

ANSWER_FIELDS = {
    "status": pa.string(),
    "value_bool": pa.bool_(),
    "value_num": pa.float64(),
    "unit": pa.string(),
    "value_date": pa.date32(),
    "value_text": pa.string(),
    "evidence": pa.string(),
    "error": pa.string(),
}
MAX_ERROR_CHARS = 300


def parse_answers(batch: pa.Table, plan: Plan) -> pa.Table:
    """Each distinct (question, problem, finish reason, output) is validated once, then spread to its rows:
    with millions of rows most outputs repeat ("not in note"), and the work stays per distinct answer."""
    require_columns(batch, "parse", REQUIRED_COLUMNS)
    if batch.num_rows == 0:
        for name, dtype in ANSWER_FIELDS.items():
            batch = batch.append_column(name, pa.array([], dtype))
        return batch.drop_columns(["raw_output", "generation_error", "note_error"])
    keys = [_as_plain_string(batch[name]) for name in ("question_id", "note_error", "generation_error", "finish_reason", "raw_output")]
    joined = pc.binary_join_element_wise(*[pc.fill_null(k, "") for k in keys], SEPARATOR)
    encoded = joined.combine_chunks().dictionary_encode() if isinstance(joined, pa.ChunkedArray) else joined.dictionary_encode()
    firsts = _first_index_per_code(encoded.indices)
    parts = [k.combine_chunks().take(pa.array(firsts)).to_pylist() for k in keys]
    distinct = [parse_one(plan, q, ne or ge, fr, raw) for q, ne, ge, fr, raw in zip(*parts)]
    for name, dtype in ANSWER_FIELDS.items():
        values = pa.array([d.get(name) for d in distinct], dtype)
        batch = batch.append_column(name, values.take(encoded.indices))
    return batch.drop_columns(["raw_output", "generation_error", "note_error"])


SEPARATOR = "\x1f"


def _as_plain_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column


def _first_index_per_code(codes: pa.Array) -> list[int]:
    import numpy as np

    values = codes.to_numpy(zero_copy_only=False)
    _, first = np.unique(values, return_index=True)
    return first.tolist()


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
    if question.spec.type == "date":
        return _date_answer(answer, evidence)
    if question.spec.type == "categorical":
        if answer.choice is None:
            return {"status": "not_in_note", "evidence": evidence}
        return {"status": "answered", "value_text": answer.choice, "evidence": evidence}
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


def _date_answer(answer, evidence: str | None) -> dict:
    """A date answer: `value_date` the ISO date, `value_text` the phrase as written (kept as evidence of how)."""
    phrase = (answer.phrase or "").strip() or None
    if answer.date is None:
        return {"status": "not_in_note", "evidence": evidence, "value_text": phrase}
    try:
        value = datetime.date.fromisoformat(answer.date)
    except ValueError:
        return {"status": "error", "evidence": evidence, "value_text": phrase,
                "error": f"date {answer.date!r} is not a calendar date"}
    return {"status": "answered", "value_date": value, "value_text": phrase, "evidence": evidence}

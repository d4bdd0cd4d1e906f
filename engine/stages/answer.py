"""The answer chain after generation, one copy for the Ray model actor and the in-process runner:
parse (typed answers) -> ground (evidence spans) -> verify (model answers checked against the note)."""

from __future__ import annotations

import pyarrow as pa

from engine.plan import Plan
from engine.stages.ground import ground_evidence
from engine.stages.parse import parse_answers
from engine.stages.verify import verify_answers


def answer_rows(generated: pa.Table, plan: Plan) -> pa.Table:
    """A generated batch (GenerateAnswers' output) as typed, grounded, verified answer rows without the note text."""
    grounded = ground_evidence(parse_answers(generated, plan), keep_text=True)
    return verify_answers(grounded, plan).drop_columns(["text"])

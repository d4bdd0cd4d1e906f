"""Every stage checks the columns it reads on entry: a missing one fails naming the stage, the column and what the
batch has (not a bare KeyError from deep inside pyarrow)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from engine.plan import make_plan
from engine.stages import StageInputError
from engine.stages import candidates, generate, ground, parse, verify
from engine.stages.answer import answer_rows
from test_verify import JOB, generated_batch, RIGHT_CREATININE

PLAN = make_plan(JOB.model_copy(update={"extraction": JOB.extraction.model_copy(update={"mode": "lexical"})}))
CALLS = {
    "candidates": lambda batch: candidates.find_candidates(batch, PLAN),
    "generate": lambda batch: generate.GenerateAnswers(PLAN.job.model_dump_json())(batch),
    "parse": lambda batch: parse.parse_answers(batch, PLAN),
    "ground": ground.ground_evidence,
    "verify": lambda batch: verify.verify_answers(batch, PLAN),
}
MODULES = {"candidates": candidates, "generate": generate, "parse": parse, "ground": ground, "verify": verify}


@pytest.mark.parametrize("stage", list(CALLS))
def test_a_stage_names_the_column_it_lacks_and_what_the_batch_has(stage):
    required = MODULES[stage].REQUIRED_COLUMNS
    batch = pa.table({name: pa.nulls(1, pa.string()) for name in required[1:]} | {"unrelated": ["x"]})
    with pytest.raises(StageInputError) as caught:
        CALLS[stage](batch)
    message = str(caught.value)
    assert message.startswith(f"stage {stage} needs column(s) {required[0]};")
    assert "unrelated" in message and all(name in message for name in required[1:])


def test_the_answer_chain_takes_what_generate_gives():
    """The declared columns are not stricter than the pipeline: generate's output passes parse, ground and verify."""
    out = answer_rows(generated_batch([RIGHT_CREATININE]), PLAN)
    assert out.num_rows == 1 and "text" not in out.column_names

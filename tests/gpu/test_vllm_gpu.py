"""The vLLM backend on a CUDA GPU: same code path as CPU. Skipped cleanly where no GPU is present."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_backend_answers_under_the_grammar_on_gpu(apixaban_job, tiny_model):
    from engine.backends import Request
    from engine.backends.vllm import VLLMBackend
    from engine.plan import make_plan

    # max_tokens above the longest answer the grammar admits (a 24-character quote is at most 96 byte tokens, plus
    # the JSON around it): every generation then ends by itself, so each one is checked, none skipped as cut off
    model = apixaban_job.model.model_copy(update={"name": str(tiny_model), "max_model_len": 2048, "evidence_max_chars": 24,
                                                  "max_tokens": 256, "gpu_memory_utilization": 0.3})
    plan = make_plan(apixaban_job.model_copy(update={"model": model}))
    backend = VLLMBackend(plan)
    assert backend.device == "gpu"
    note = "Discharge labs: Cr 2.7 mg/dL, Hgb 8.1 g/dL. History of atrial fibrillation."
    generations = backend.generate([Request("n1", note, q) for q in plan.questions])
    assert len(generations) == len(plan.questions)
    assert [g.finish_reason for g in generations] == ["stop"] * len(plan.questions), [g.finish_reason for g in generations]
    for question, generation in zip(plan.questions, generations, strict=True):
        question.answer_model.model_validate_json(generation.text)  # raises unless the answer fits its schema
    assert sum(g.cached_tokens for g in generations) > 0, "the note prefix is shared across questions"
    backend.close()

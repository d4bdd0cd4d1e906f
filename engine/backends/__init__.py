"""Model backends behind one small interface, chosen by name from the job; heavy imports stay inside each backend."""

from __future__ import annotations

from engine.backends.base import SERVER_UNAVAILABLE, Backend, Generation, Request
from engine.errors import BackendError
from engine.plan import Plan

BACKENDS = {
    "vllm": "engine.backends.vllm:VLLMBackend",
    "openai": "engine.backends.openai:OpenAIBackend",
    "null": "engine.backends.null:NullBackend",
}


def load_backend(plan: Plan) -> Backend:
    """Import and start the job's backend (lazily: `validate` and unit tests never import vLLM)."""
    import importlib

    if plan.job.model.backend == "lexical":
        raise BackendError("model.backend lexical loads no model: it is extraction mode lexical (the cues alone)")
    target = BACKENDS.get(plan.job.model.backend)
    if target is None:
        raise BackendError(f"unknown backend {plan.job.model.backend!r}; known backends: {', '.join(BACKENDS)}")
    module_name, class_name = target.split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class(plan)


__all__ = ["BACKENDS", "SERVER_UNAVAILABLE", "Backend", "Generation", "Request", "load_backend"]

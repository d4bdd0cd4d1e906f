"""Session-wide fixtures: one local Ray and one vLLM engine run per test session, never per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

SAMPLE_NOTES = ROOT / "data" / "sample_notes.parquet"
APIXABAN_JOB = ROOT / "jobs" / "apixaban.yaml"
E2E_NOTES = 10


@pytest.fixture(scope="session")
def apixaban_job():
    from engine.job import load_job

    return load_job(APIXABAN_JOB)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from engine.runtime import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


def job_for(apixaban_job, *, model: str, output: Path, backend: str = "vllm", input_uri: str | None = None, **model_overrides):
    """The real apixaban job pointed at a test model and folder; small evidence so a random model finishes."""
    model_spec = apixaban_job.model.model_copy(update={"backend": backend, "name": model, "max_model_len": 2048, **model_overrides})
    return apixaban_job.model_copy(update={
        "input": apixaban_job.input.model_copy(update={"uri": input_uri or str(SAMPLE_NOTES)}),
        "output": apixaban_job.output.model_copy(update={"uri": str(output)}),
        "model": model_spec,
        "batching": apixaban_job.batching.model_copy(update={"notes_per_shard": 4, "notes_per_batch": 5}),
    })


@pytest.fixture(scope="session")
def e2e_run(apixaban_job, tiny_model, ray_local, tmp_path_factory):
    """The real pipeline once: local Ray, a real vLLM CPU engine with a tiny random model, bundled notes."""
    from engine.pipeline import run_job

    output = tmp_path_factory.mktemp("e2e-output")
    job = job_for(apixaban_job, model=str(tiny_model), output=output, evidence_max_chars=24, max_tokens=64)
    report, stats = run_job(job, limit=E2E_NOTES)
    return job, report, stats, output

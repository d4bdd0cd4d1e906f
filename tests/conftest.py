"""Session-wide fixtures: one local Ray and one vLLM engine run per test session, never per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

SAMPLE_NOTES = ROOT / "data" / "sample_notes.parquet"
GOLD = ROOT / "data" / "sample_gold.parquet"
APIXABAN_JOB = ROOT / "jobs" / "apixaban.yaml"
E2E_SAMPLE_NOTES = 10  # the first bundled notes (one over 12,000 characters, one of a few words) ...
E2E_BAD_ROWS = 4  # ... plus a duplicate note id, a null text, a whitespace-only text and a table of odd characters
E2E_NOTES = E2E_SAMPLE_NOTES + E2E_BAD_ROWS


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


def job_for(apixaban_job, *, model: str, output: Path, backend: str = "vllm", input_uri: str | None = None,
            extraction: dict | None = None, **model_overrides):
    """The real apixaban job pointed at a test model and folder; small evidence so a random model finishes.
    Extraction mode model unless `extraction` says otherwise: these runs test the model path itself."""
    model_spec = apixaban_job.model.model_copy(update={"backend": backend, "name": model, "max_model_len": 2048, **model_overrides})
    return apixaban_job.model_copy(update={
        "input": apixaban_job.input.model_copy(update={"uri": input_uri or str(SAMPLE_NOTES)}),
        "output": apixaban_job.output.model_copy(update={"uri": str(output)}),
        "model": model_spec,
        "extraction": apixaban_job.extraction.model_copy(update=extraction or {"mode": "model"}),
        "batching": apixaban_job.batching.model_copy(update={"notes_per_shard": 4, "notes_per_batch": 5}),
    })


@pytest.fixture(scope="session")
def e2e_input(tmp_path_factory) -> Path:
    """Bundled notes plus the bad rows real extracts have."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    notes = pq.read_table(SAMPLE_NOTES).slice(0, E2E_SAMPLE_NOTES)
    first = notes.slice(0, 1).to_pylist()[0]
    odd = "Labs\t| Day 1 | Day 2\r\nCr\t| 1.2 | 2.9 µmol/L ≥ ±\u00a0\U0001F600\r\nHgb | 9.1 | 8.7 g/dL"
    bad = [dict(first, text="A second note that reuses the first note's id."),
           dict(first, note_id="bad-null-text", text=None),
           dict(first, note_id="bad-blank", text=" \r\n\t "),
           dict(first, note_id="odd-characters", text=odd)]
    path = tmp_path_factory.mktemp("e2e-input") / "notes.parquet"
    pq.write_table(pa.concat_tables([notes, pa.Table.from_pylist(bad, schema=notes.schema)]), path)
    return path


@pytest.fixture(scope="session")
def e2e_run(apixaban_job, tiny_model, ray_local, tmp_path_factory, e2e_input):
    """The real pipeline once: local Ray, a real vLLM CPU engine with a tiny random model, bundled and bad notes."""
    from engine.run import run_job

    output = tmp_path_factory.mktemp("e2e-output")
    job = job_for(apixaban_job, model=str(tiny_model), output=output, input_uri=str(e2e_input),
                  evidence_max_chars=24, max_tokens=64)
    report, stats = run_job(job, limit=E2E_NOTES)
    return job, report, stats, output


@pytest.fixture(scope="session")
def e2e_hybrid_run(apixaban_job, tiny_model, ray_local, tmp_path_factory, e2e_input):
    """The hybrid path on the real stack: every pair with a cue mention to vLLM, shown only the text around it."""
    from engine.run import run_job

    output = tmp_path_factory.mktemp("e2e-hybrid")
    job = job_for(apixaban_job, model=str(tiny_model), output=output, input_uri=str(e2e_input),
                  extraction={"mode": "hybrid", "ask_model": "candidates", "model_sees": "windows", "window_chars": 120},
                  evidence_max_chars=24, max_tokens=64)
    report, stats = run_job(job, limit=E2E_NOTES)
    return job, report, output


@pytest.fixture(scope="session")
def synth_folder(tmp_path_factory, tiny_model) -> Path:
    """`engine synth` on 6 bundled notes (windows) and 6 synthetic patients, the job's model the tiny one; the job
    file it used is beside the data (../job.yaml)."""
    import yaml
    from typer.testing import CliRunner

    from engine.cli import app

    folder = tmp_path_factory.mktemp("synth")
    job = yaml.safe_load(APIXABAN_JOB.read_text(encoding="utf-8"))
    job["model"]["name"] = str(tiny_model)
    job_path = folder / "job.yaml"
    job_path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    result = CliRunner().invoke(app, ["synth", str(job_path), "--output", str(folder / "data"), "--notes", str(SAMPLE_NOTES),
                                      "--limit", "6", "--synthetic-patients", "6", "--window-chars", "1500", "--n", "120"])
    assert result.exit_code == 0, result.output
    assert "training and" in result.output and "Written:" in result.output
    return folder / "data"


@pytest.fixture(scope="session")
def vllm_server(tiny_model, tmp_path_factory):
    """A real `vllm serve` (vLLM's OpenAI-compatible server, CPU) of the tiny model on 127.0.0.1, once per session."""
    from vllm_server import VLLMServer

    server = VLLMServer(tiny_model, tmp_path_factory.mktemp("vllm-serve") / "serve.log", max_model_len=1024).start()
    yield server
    server.stop()

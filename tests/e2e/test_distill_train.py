"""`engine train` on `engine synth` data: a real LoRA run (peft + transformers Trainer) of a few steps on the tiny
model writes an adapter, checkpoints and a card, resumes from its checkpoint, and the pipeline serves the adapter
with vLLM's LoRA support (local Ray, vLLM CPU engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import job_for
from engine.cli import app

pytestmark = pytest.mark.e2e

STEPS = 3


def train_cli(job: Path, data: Path, output: Path, steps: int) -> str:
    result = CliRunner().invoke(app, ["train", str(job), "--data", str(data), "--output", str(output), "--max-steps", str(steps),
                                      "--save-steps", "2", "--gradient-accumulation", "2", "--learning-rate", "1e-3",
                                      "--max-length", "8192"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def adapter(synth_folder, tmp_path_factory) -> tuple[Path, str]:
    output = tmp_path_factory.mktemp("adapter")
    return output, train_cli(synth_folder.parent / "job.yaml", synth_folder, output, STEPS)


def test_training_writes_an_adapter_checkpoints_and_a_card(adapter, synth_folder):
    folder, printed = adapter
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == 8 and config["peft_type"] == "LORA" and (folder / "adapter_model.safetensors").stat().st_size > 0
    card = json.loads((folder / "train.json").read_text(encoding="utf-8"))
    assert card["steps"] == STEPS and len(card["losses"]) == STEPS
    assert card["synth_card"] == json.loads((synth_folder / "synth.json").read_text(encoding="utf-8"))
    assert card["examples"] > 0 and card["tokens"] > 0 and card["tokens_per_second"] > 0 and card["seconds"] > 0
    assert card["eval_loss_before"] is not None and card["eval_loss"] is not None
    assert card["settings"]["seed"] == 0 and card["resumed_from"] is None
    assert (folder / "checkpoints" / "checkpoint-2").is_dir()
    assert f"{STEPS} steps on {card['examples']} examples" in printed and "eval loss" in printed


def test_training_resumes_from_its_last_checkpoint(adapter, synth_folder, tmp_path):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(adapter[0], folder)
    printed = train_cli(synth_folder.parent / "job.yaml", synth_folder, folder, STEPS + 1)
    card = json.loads((folder / "train.json").read_text(encoding="utf-8"))
    assert "Resuming from" in printed and card["resumed_from"].endswith(f"checkpoint-{STEPS}")
    assert card["steps"] == STEPS + 1


def test_the_pipeline_serves_the_adapter(adapter, apixaban_job, tiny_model, ray_local, tmp_path):
    from engine.run import run_job

    folder, _ = adapter
    output = tmp_path / "out"
    job = job_for(apixaban_job, model=str(tiny_model), output=output, evidence_max_chars=24, max_tokens=64,
                  adapter=str(folder), max_lora_rank=8)
    base = job_for(apixaban_job, model=str(tiny_model), output=output, evidence_max_chars=24, max_tokens=64)
    assert job.fingerprint() != base.fingerprint()  # an adapter's answers never resume into the base model's
    report, _ = run_job(job, limit=2)
    answers = pq.read_table(output / "answers")
    assert answers.num_rows == 2 * len(job.questions)
    assert set(answers["model"].to_pylist()) == {f"{tiny_model}+{folder.name}"}
    generated = pc.sum(answers["completion_tokens"]).as_py()
    assert generated > 0  # the adapted model wrote the answers (not only the cues)
    assert set(answers["status"].to_pylist()) <= {"answered", "not_in_note", "error"}
    assert report["model"] == str(tiny_model) and report["adapter"] == str(folder)

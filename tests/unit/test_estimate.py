"""engine estimate: the arithmetic of the projection and the job's measured token counts."""

import pytest

from engine.estimate import Profile, Workload, measure_workload, project, shipped_profiles


def workload(**overrides) -> Workload:
    values = dict(notes_sampled=10, note_tokens=1000.0, suffix_tokens=30.0, answer_tokens=20.0, answer_tokens_source="test",
                  notes_per_patient=1.5, questions=23, block_size=16, tokenizer="test")
    return Workload(**(values | overrides))


def test_projection_arithmetic_by_hand():
    profile = Profile("gpu", prefill_tokens_per_second=20_000, decode_tokens_per_second=10_000, usd_per_hour=4.0, source="test")
    result = project(workload(), profile, patients=10_000)
    computed = 1000 + 23 * (30 + 8)  # note once + each question's suffix and recomputed tail
    seconds = computed / 20_000 + 23 * 20 / 10_000
    assert result["seconds_per_note"] == pytest.approx(seconds)
    assert result["notes"] == 15_000
    assert result["gpu_hours"] == pytest.approx(15_000 * seconds / 3600)
    assert result["usd"] == pytest.approx(15_000 * seconds / 3600 * 4.0)
    assert result["usd_per_10k_patients"] == pytest.approx(result["usd"])
    assert any(f"= {computed}" in line for line in result["arithmetic"])


def test_cost_scales_linearly_with_patients_and_price():
    profile = shipped_profiles()["h100"]
    small, large = project(workload(), profile, 1_000), project(workload(), profile, 100_000)
    assert large["usd"] == pytest.approx(small["usd"] * 100)
    cheaper = project(workload(), shipped_profiles({"h100": profile.usd_per_hour / 2})["h100"], 1_000)
    assert cheaper["usd"] == pytest.approx(small["usd"] / 2)


def test_shipped_profiles_state_their_source_and_h100_beats_a100():
    profiles = shipped_profiles()
    assert {"h100", "a100"} <= set(profiles)
    assert all(p.source for p in profiles.values())
    assert project(workload(), profiles["h100"], 10_000)["gpu_hours"] < project(workload(), profiles["a100"], 10_000)["gpu_hours"]


def test_workload_is_measured_on_the_jobs_notes(apixaban_job):
    measured = measure_workload(apixaban_job)
    assert measured.questions == 25 and measured.notes_sampled > 20
    assert 300 < measured.note_tokens < 5_000  # bundled discharge summaries: a few thousand characters
    assert 5 < measured.suffix_tokens < 80  # only the question follows the note
    assert measured.notes_per_patient > 1.0 and measured.notes_per_patient < 3.0


def test_under_filled_engine_warning_names_the_number_to_change(apixaban_job):
    from engine.cli import batching_warnings

    assert batching_warnings(apixaban_job) == []
    small = apixaban_job.model_copy(update={"batching": apixaban_job.batching.model_copy(update={"notes_per_batch": 2})})
    (warning,) = batching_warnings(small)
    assert "raise notes_per_batch to 6" in warning and "max_num_seqs 128" in warning


def test_distillation_arithmetic_by_hand():
    from engine.estimate import Distillation, project_distillation

    profile = Profile("gpu", prefill_tokens_per_second=20_000, decode_tokens_per_second=10_000, usd_per_hour=4.0, source="test")
    d = Distillation(examples=1_000, tokens_per_example=900.0, epochs=2.0, teacher_requests=1_000,
                     teacher_prompt_tokens=880_000, teacher_completion_tokens=20_000, source="test")
    result = project_distillation(d, profile, teacher_params_b=70)
    teacher_hours = (880_000 / 20_000 + 20_000 / 10_000) * 70 / 8 / 3600
    train_hours = 1_000 * 900 * 2 / (20_000 / 2) / 3600  # LoRA step = 2 x a prefill token's work
    assert result["teacher_tokens"] == 900_000
    assert result["teacher_gpu_hours"] == pytest.approx(teacher_hours)
    assert result["train_gpu_hours"] == pytest.approx(train_hours)
    assert result["usd"] == pytest.approx((teacher_hours + train_hours) * 4.0)
    no_teacher = project_distillation(d, profile, teacher_params_b=0)
    assert no_teacher["teacher_gpu_hours"] == 0 and no_teacher["train_gpu_hours"] == pytest.approx(train_hours)


def test_distillation_reads_the_synth_and_train_cards(tmp_path):
    import json

    from engine.estimate import distillation_workload

    synth, adapter = tmp_path / "synth", tmp_path / "adapter"
    synth.mkdir(), adapter.mkdir()
    (synth / "synth.json").write_text(json.dumps({"train": {"examples": 400, "prompt_tokens": 320_000},
                                                  "teacher_usage": {"requests": 50, "prompt_tokens": 40_000, "completion_tokens": 900}}))
    (adapter / "train.json").write_text(json.dumps({"data": str(synth), "tokens": 123_000, "seconds": 800.0, "tokens_per_second": 153.75,
                                                    "steps": 100, "examples": 400, "device": "cpu",
                                                    "settings": {"batch_size": 1, "gradient_accumulation": 8}}))
    d = distillation_workload(workload(), adapter_dir=adapter)
    assert d.examples == 400 and d.tokens_per_example == pytest.approx(800 + 20)  # prompt + the answer tokens
    assert d.epochs == pytest.approx(2.0)  # 100 steps x 8 examples / 400
    assert (d.teacher_requests, d.teacher_prompt_tokens, d.teacher_completion_tokens) == (50, 40_000, 900)
    assert "123,000 tokens in 800 s" in d.measured and "synth.json" in d.source
    assumed = distillation_workload(workload(), examples=2_000)
    assert assumed.examples == 2_000 and assumed.teacher_requests == 2_000
    assert assumed.tokens_per_example == pytest.approx(1000 + 30 + 20) and "assumed" in assumed.source
    assert distillation_workload(workload(), examples=2_000, teacher=False).teacher_prompt_tokens == 0

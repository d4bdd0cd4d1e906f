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

"""engine.cohort.units: unit spellings onto job keys, conversion to the canonical unit, refusal of unknown units."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.job import QuestionSpec, load_job
from engine.cohort.units import match_unit, normalise_unit, to_canonical

JOB = load_job(Path(__file__).resolve().parents[2] / "jobs" / "apixaban.yaml")
NUMERIC = [q for q in JOB.questions if q.type == "numeric"]
BY_ID = {q.id: q for q in JOB.questions}


@pytest.mark.parametrize("question", NUMERIC, ids=[q.id for q in NUMERIC])
@settings(max_examples=40, deadline=None)
@given(fraction=st.floats(0, 1))
def test_round_trip_every_unit_of_every_numeric_question(question: QuestionSpec, fraction: float):
    """A canonical value written in any accepted unit comes back as the same canonical value (capped)."""
    canonical = question.minimum + fraction * (question.maximum - question.minimum)
    expected = min(canonical, question.cap) if question.cap is not None else canonical
    for unit, factor in question.units.items():
        written = canonical / factor
        for spelling in (unit, unit.upper(), f"  {unit} "):
            value, reason = to_canonical(written, spelling, question)
            assert reason is None
            assert value == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("question", NUMERIC, ids=[q.id for q in NUMERIC])
def test_missing_unit_means_the_canonical_unit(question: QuestionSpec):
    assert to_canonical(12.0, None, question) == (min(12.0, question.cap or math.inf), None)
    assert to_canonical(12.0, "", question)[0] == min(12.0, question.cap or math.inf)


@pytest.mark.parametrize(
    ("question_id", "spelling", "key"),
    [
        ("platelets_min", "K/uL", "10^3/uL"),
        ("platelets_min", "k/µL", "10^3/uL"),
        ("platelets_min", "K/mcL", "10^3/uL"),
        ("platelets_min", "x10^3/uL", "10^3/uL"),
        ("platelets_min", "thou/cumm", "10^3/uL"),
        ("platelets_min", "x10^9/L", "10^9/L"),
        ("platelets_min", "× 10⁹/L", "10^9/L"),
        ("platelets_min", "10*9/l", "10^9/L"),
        ("platelets_min", "10e9 /L", "10^9/L"),
        ("platelets_min", "/mm³", "/mm3"),
        ("platelets_min", "cells per mm3", "/mm3"),
        ("platelets_min", "/µL", "/uL"),
        ("bilirubin_max", "µmol/L", "umol/L"),
        ("bilirubin_max", "\u03bcmol/l", "umol/L"),
        ("creatinine_max", "mcmol/L", "umol/L"),
        ("creatinine_max", "micromol/L", "umol/L"),
        ("creatinine_max", " MG / DL ", "mg/dL"),
        ("creatinine_max", "mg/dl", "mg/dL"),
        ("hemoglobin_min", "gm/dL", "g/dL"),
        ("hemoglobin_min", "G/L", "g/L"),
        ("hemoglobin_min", "mmol/l", "mmol/L"),
        ("ast_max", "IU/l", "IU/L"),
        ("ast_max", "units/L", "U/L"),
        ("chads2_max", "pts", "points"),
        ("chads2_max", "Point", "points"),
        ("lvef_min", "percent", "%"),
        ("glucose_max", "mmol/L", "mmol/L"),
    ],
)
def test_spelling_variants_map_onto_the_job_keys(question_id: str, spelling: str, key: str):
    """Maps onto `key` or onto a key that is the same unit (1 mm3 = 1 uL) with the same factor."""
    question = BY_ID[question_id]
    matched = match_unit(spelling, question)
    assert matched is not None and question.units[matched] == question.units[key]
    assert normalise_unit(spelling) == normalise_unit(key)


def test_conversions_use_the_job_factors():
    assert to_canonical(221, "µmol/L", BY_ID["creatinine_max"])[0] == pytest.approx(2.49951)
    assert to_canonical(150_000, "/mm3", BY_ID["platelets_min"])[0] == pytest.approx(150)
    assert to_canonical(150, "K/uL", BY_ID["platelets_min"])[0] == pytest.approx(150)
    assert to_canonical(90, "g/L", BY_ID["hemoglobin_min"])[0] == pytest.approx(9)
    assert to_canonical(7, "mmol/L", BY_ID["glucose_max"])[0] == pytest.approx(126.112)


def test_cap_applies_after_conversion():
    assert to_canonical(70, "%", BY_ID["lvef_min"]) == (55, None)
    assert to_canonical(35, "%", BY_ID["lvef_min"]) == (35, None)


@pytest.mark.parametrize(
    ("question_id", "unit"),
    [("creatinine_max", "mmol/L"), ("creatinine_max", "mg"), ("hemoglobin_min", "mg/dL"),
     ("platelets_min", "/L"), ("lvef_min", "fraction"), ("glucose_max", "g/L"), ("ast_max", "ukat/L")],
)
def test_units_the_question_does_not_accept_are_refused_with_a_reason(question_id: str, unit: str):
    question = BY_ID[question_id]
    value, reason = to_canonical(3.0, unit, question)
    assert value is None
    assert repr(unit) in reason and question_id in reason
    assert all(key in reason for key in question.units)


@pytest.mark.parametrize("value", [None, math.nan, math.inf])
def test_missing_or_non_finite_values_are_unknown(value):
    result, reason = to_canonical(value, "mg/dL", BY_ID["creatinine_max"])
    assert result is None and reason


def test_yes_no_questions_have_no_units():
    with pytest.raises(ValueError, match="not numeric"):
        to_canonical(1.0, None, BY_ID["diabetes"])


UNITISH = st.text(alphabet="mgdlLuUµkK/^xX*%0123456789 .e", max_size=12)


@given(UNITISH)
def test_normalisation_ignores_case_and_whitespace(text: str):
    assert normalise_unit(text.upper()) == normalise_unit(text)
    assert normalise_unit(" ".join(text)) == normalise_unit(text)


@given(UNITISH)
def test_normalisation_is_idempotent(text: str):
    once = normalise_unit(text)
    assert normalise_unit(once) == once


def test_exact_key_wins_over_a_normalised_match():
    question = QuestionSpec(id="x_count", type="numeric", question="What is the x count?", unit="/uL",
                            units={"/uL": 1, "/mm3": 2})  # deliberately inconsistent job: keys stay distinct
    assert match_unit("/mm3", question) == "/mm3"
    assert match_unit("/uL", question) == "/uL"

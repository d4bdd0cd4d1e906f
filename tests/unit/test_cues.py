"""Cue matching and lab-value reading on the shapes real notes have (engine.stages.cues: pure, no NLP pipeline)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from engine.stages.cues import find_mentions, read_values


@pytest.fixture(scope="module")
def questions(apixaban_job):
    return {q.id: q for q in apixaban_job.questions}


def spans(text, question):
    return [text[m.start:m.end] for m in find_mentions(text, question)]


def values(text, question):
    found = []
    for mention in find_mentions(text, question):
        found += [(v.number, v.unit, v.unit_written) for v in read_values(text, mention, question)]
    return found


def test_terms_match_without_case_and_abbreviations_only_in_their_case(questions):
    af = questions["atrial_fibrillation"]
    assert spans("Paroxysmal A-Fib; AF on tele; afib; atrial  fibrillation", af) == ["A-Fib", "AF", "afib", "atrial  fibrillation"]
    assert spans("after a leaf fell; Af; safe", af) == []  # 'af' inside words and in the wrong case


def test_a_cue_overlapping_a_not_term_does_not_count(questions):
    assert spans("Seen by the Acute Stroke Team (AST) for a possible droop", questions["ast_max"]) == []
    assert spans("Seen by the Acute Stroke Team (AST) for a possible droop", questions["recent_stroke"]) == []
    assert spans("Estimated CrCl 38 mL/min", questions["creatinine_max"]) == []
    assert spans("Hemoglobin A1c 8.4%; HbA1c 7.9%", questions["hemoglobin_min"]) == []
    assert spans("CHA2DS2-VASc score 4", questions["chads2_max"]) == []


def test_mimic_lab_lines_give_each_lab_its_own_value(questions):
    line = "___ 07:15AM BLOOD WBC-8.1 RBC-3.9* Hgb-9.8* Hct-30.2* Plt Ct-142* Glucose-182* UreaN-31* Creat-1.9* Na-137"
    assert values(line, questions["hemoglobin_min"]) == [(9.8, "g/dL", False)]
    assert values(line, questions["platelets_min"]) == [(142.0, "10^3/uL", False)]
    assert values(line, questions["creatinine_max"]) == [(1.9, "mg/dL", False)]
    assert values(line, questions["glucose_max"]) == [(182.0, "mg/dL", False)]
    assert values("ALT-25 AST-41* AlkPhos-80 TotBili-1.1 DirBili-0.3", questions["bilirubin_max"]) == [(1.1, "mg/dL", False)]


def test_table_rows_with_the_unit_in_the_label(questions):
    assert values("| PLT (K/uL) | 362 | 402 |  |", questions["platelets_min"]) == [(362.0, "10^3/uL", True), (402.0, "10^3/uL", True)]
    assert values("Cr (\u00b5mol/L)\t69\t87\t74", questions["creatinine_max"]) == [(69.0, "umol/L", True), (87.0, "umol/L", True), (74.0, "umol/L", True)]
    assert values("PLT (x 10^9/L)\t182\t204", questions["platelets_min"]) == [(182.0, "10^9/L", True), (204.0, "10^9/L", True)]


def test_a_lab_name_in_a_table_header_reads_its_column(questions):
    table = ("| Date | Plt (K/uL) | Hgb (g/dL) | Cr (mg/dL) |\n|------|-----:|-----:|----:|\n"
             "| HD1 | 42 | 11.0 | 0.8 |\n| HD3 | 57 | 9.7 | 0.9 |\n\nPlan: none")
    assert values(table, questions["platelets_min"]) == [(42.0, "10^3/uL", True), (57.0, "10^3/uL", True)]
    assert values(table, questions["creatinine_max"]) == [(0.8, "mg/dL", True), (0.9, "mg/dL", True)]
    tabbed = "Lab\tHgb\tCr\nHD1\t9.1\t1.4\nHD2\t8.7\t1.9"
    assert values(tabbed, questions["hemoglobin_min"]) == [(9.1, "g/dL", False), (8.7, "g/dL", False)]


def test_a_unit_after_a_series_is_the_series_unit(questions):
    assert values("Hb: 5.3, 5.5, 5.7 mmol/L (serial)", questions["hemoglobin_min"]) == [(5.3, "mmol/L", True), (5.5, "mmol/L", True), (5.7, "mmol/L", True)]
    assert values("total bilirubin trended 8 -> 6 umol/L.", questions["bilirubin_max"]) == [(8.0, "umol/L", True), (6.0, "umol/L", True)]


def test_prose_thousands_ranges_and_stops(questions):
    assert values("Cr 1.2 on admission, peaked at 2.6 mg/dL", questions["creatinine_max"])[-1] == (2.6, "mg/dL", True)
    assert values("platelets 98,000/mm3", questions["platelets_min"]) == [(98000.0, "/mm3", True)]
    assert values("TTE: LVEF 30-35%, moderate hypokinesis", questions["lvef_min"]) == [(30.0, "%", True), (35.0, "%", True)]
    assert values("Platelet nadir 98,000/mm3 on day 2", questions["platelets_min"]) == [(98000.0, "/mm3", True)]
    assert values("platelets 240,000, ferritin 4", questions["platelets_min"]) == [(240000.0, "10^3/uL", False)]
    assert values("continue apixaban while plt >50 K", questions["platelets_min"]) == []  # a threshold
    assert values("AST (U/L)   38   -   29", questions["ast_max"]) == [(38.0, "U/L", True), (29.0, "U/L", True)]
    assert values("Echo: EF \u226555%", questions["lvef_min"]) == [(55.0, "%", True)]
    assert values("Cr 1.2, Hgb 9.8", questions["creatinine_max"]) == [(1.2, "mg/dL", False)]  # not Hgb's 9.8
    assert values("Cr on 3/4 was normal", questions["creatinine_max"]) == []  # a date is not a value
    assert values("CHADS2 score 1 at last clinic visit, now 2.", questions["chads2_max"]) == [(1.0, "points", False), (2.0, "points", False)]


def test_a_unit_the_question_does_not_accept_is_not_its_value(questions):
    found = values("creatinine clearance aside, Cr 38 mL/min", questions["creatinine_max"])
    assert found == [(38.0, None, True)]


@given(st.text(max_size=300))
def test_reading_never_fails_on_any_text(apixaban_job, text):
    for question in apixaban_job.questions:
        for mention in find_mentions(text, question):
            for value in read_values(text, mention, question):
                assert 0 <= value.start < value.end <= len(text)

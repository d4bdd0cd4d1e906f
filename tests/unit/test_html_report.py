"""engine.reporting.html: one self-contained page with the run's figures, funnel, criteria, answers, grounding and
(after `engine eval`) the evaluation; built here from an output folder written by engine's own writers."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from report_fixtures import (
    ERROR_REASON,
    EXPECTED,
    GOLD,
    ROOT,
    gold_answers,
    with_errors,
    with_unverified,
    write_output_folder,
)

from engine.reporting.evaluate import evaluate, to_markdown, write_evaluation
from engine.reporting.html import REPORT_HTML, nice_ticks, render_report, write_report_html
from engine.job import load_job
from engine.store.answers import read_answers
from engine.cohort.rules import apply_rules

NOTES = 12


class Marks(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def with_class(self, name: str, tag: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if name in (a.get("class") or "").split() and (tag is None or t == tag)]

    def by_id(self, ident: str) -> dict | None:
        return next((a for _, a in self.tags if a.get("id") == ident), None)


@pytest.fixture(scope="module")
def job():
    return load_job(ROOT / "jobs" / "apixaban.yaml")


@pytest.fixture(scope="module")
def run_folder(job, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    answers = with_errors(gold_answers(job, notes=NOTES), 3)
    store, report, patients = write_output_folder(folder, job, answers)
    write_report_html(store, job)
    return folder, store, report, patients, answers


@pytest.fixture(scope="module")
def page(run_folder) -> str:
    return (run_folder[0] / REPORT_HTML).read_text(encoding="utf-8")


def test_the_page_has_every_plot(page, job):
    marks = Marks(page)
    for chart in ("status", "funnel", "criteria", "answers", "grounding"):
        assert marks.by_id(chart) is not None and ("svg", marks.by_id(chart)) in marks.tags, chart
    assert len(marks.with_class("funnel-bar-remaining", "rect")) == len(job.criteria)
    assert len(marks.with_class("funnel-bar-excluded", "rect")) == len(job.criteria)
    for state in ("met", "not_met", "unknown"):
        assert len(marks.with_class(f"criterion-bar-{state}", "rect")) == len(job.criteria)
    for category in ("yes", "no", "value", "not_in_note", "error"):
        assert len(marks.with_class(f"answer-bar-{category}", "rect")) == len(job.questions)  # a bar per question
    assert "stroke_date" in page and "no answer rows" in page  # the gold labels no date: its bar is empty and says so
    numeric = [q.id for q in job.questions if q.type == "numeric"]
    assert [a["id"] for a in marks.with_class("histogram", "svg")] == [f"histogram-{q}" for q in numeric]
    assert marks.by_id("eval-section") is None  # no eval has run here


def test_the_funnel_matches_the_report(page, run_folder, job):
    report = run_folder[2]
    marks = Marks(page)
    for step in report["cohort"]["funnel"]:
        row = marks.by_id(f"funnel-{step['criterion']}")
        assert row is not None
        assert f"{step['entering']} in, {step['excluded']} excluded, {step['remaining']} remain" in page
    widths = [float(a["width"]) for a in marks.with_class("funnel-bar-remaining")]
    remaining = [s["remaining"] for s in report["cohort"]["funnel"]]
    assert widths == sorted(widths, reverse=True) and remaining == sorted(remaining, reverse=True)
    assert (widths[-1] == 0) == (remaining[-1] == 0)


def test_the_counts_shown_are_the_data(page, run_folder):
    _, _, report, patients, answers = run_folder
    statuses = Counter(patients["status"].to_pylist())
    assert f"eligible {statuses['eligible']}, needs review {statuses['needs_review']}, excluded {statuses['excluded']}" in page
    af = answers.filter(pc.equal(answers["question_id"], "atrial_fibrillation")).to_pylist()
    yes = sum(1 for r in af if r["status"] == "answered" and r["value_bool"])
    no = sum(1 for r in af if r["status"] == "answered" and r["value_bool"] is False)
    assert f"yes {yes} / no {no}, not in note" in page
    by_status = report["rows_by_status"]
    assert f"{by_status['answered']} / {by_status['not_in_note']} / {by_status['error']}" in page
    assert ERROR_REASON in page  # the top error reasons are listed
    assert f">{report['grounding']['exact']}<" in page


def test_the_page_is_self_contained_and_holds_no_note_text(page, run_folder):
    assert "<script" not in page and "src=" not in page and "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page
    text = " ".join(Marks(page).text)
    assert "gold atrial_fibrillation" not in page  # evidence quotes stay out of the page
    notes = pq.read_table(ROOT / "data" / "sample_notes.parquet", columns=["text"]).slice(0, NOTES)["text"].to_pylist()
    assert not any(note[:60] in text for note in notes)
    assert '"job_fingerprint":' not in page  # no raw JSON dump


def test_the_evaluation_appears_after_an_eval(job, run_folder):
    folder, store, _, _, answers = run_folder
    evaluation = evaluate(job, answers, pq.read_table(GOLD), pq.read_table(EXPECTED), draws=100)
    write_evaluation(evaluation, store, to_markdown(evaluation, job))
    write_report_html(store, job)
    page = (folder / REPORT_HTML).read_text(encoding="utf-8")
    marks = Marks(page)
    assert marks.by_id("eval-section") is not None and marks.by_id("eval-plot") is not None
    headline = [r for r in evaluation.table.to_pylist() if (r["kind"], r["metric"]) in
                (("yes_no", "balanced_accuracy"), ("numeric", "accuracy"), ("criterion", "agreement"))]
    defined = [r for r in headline if r["value"] == r["value"]]
    assert len(marks.with_class("eval-point", "circle")) == len(defined)
    table = page[page.index('<table id="eval-table">'):]
    assert table[:table.index("</table>")].count("<tr>") - 1 == evaluation.table.num_rows
    for circle in marks.with_class("eval-point"):
        assert 0 <= float(circle["cx"]) <= float(marks.by_id("eval-plot")["width"])


def test_a_page_from_missing_pieces(job):
    assert "engine report: engine run" in render_report()
    only_job = Marks(render_report(job=job))
    assert only_job.by_id("funnel") is None and only_job.by_id("answers") is None


def test_text_is_escaped(job):
    report = {"job": "x", "rows_by_status": {}, "top_errors": [{"error": "<script>alert(1)</script>", "rows": 2}],
              "cohort": {"status": {}, "funnel": []}, "grounding": {"exact": 1}}
    page = render_report(report, job=job)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_markup_in_any_value_is_escaped(job):
    """Question ids, criterion names, error and verification reasons and evaluation text reach the page as text
    (the template's autoescape), in text and in attributes, never as markup."""
    nasty = '"><script>alert(1)</script>'
    answers = gold_answers(job, notes=4)
    ids = answers["question_id"]
    answers = answers.set_column(answers.schema.get_field_index("question_id"), "question_id",
                                 pc.if_else(pc.equal(ids, "creatinine_max"), f"creatinine{nasty}", ids))
    funnel = [{"criterion": f"inc{nasty}", "kind": "inclusion", "entering": 4, "excluded": 1, "remaining": 3}]
    report = {"job": f"job{nasty}", "model": f"m{nasty}", "rows_by_status": {}, "grounding": {"exact": 1},
              "top_errors": [{"error": f"reason{nasty}", "rows": 2}], "cohort": {"status": {"eligible": 3}, "funnel": funnel},
              "verification": {"model_answers_checked": 3, "failed": 1, "failed_by_reason": {f"quote{nasty}": 1}}}
    evaluation = pa.table({"scope": ["question", "overall"], "id": [f"q{nasty}", "yes_no"], "kind": ["yes_no", "yes_no"],
                           "metric": ["balanced_accuracy", "mean_balanced_accuracy"], "n": [4, 4], "value": [0.5, 0.5],
                           "ci_low": [0.25, 0.25], "ci_high": [0.75, 0.75], "errors": [0, None]})
    page = render_report(report, answers, evaluation=(evaluation, {"matching": f"matched{nasty}", "overall": ""}))
    marks = Marks(page)
    assert "<script" not in page and nasty not in page
    assert [tag for tag, _ in marks.tags].count("script") == 0
    text = "".join(marks.text)
    for shown in (f"job{nasty}", f"m{nasty}", f"creatinine{nasty}", f"inc{nasty} (inclusion)", f"reason{nasty}",
                  f"quote{nasty}", f"q{nasty}", f"matched{nasty}"):
        assert shown in text, shown  # the parser decodes the escapes back to the value
    assert all(set(attrs.get("id", "")) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-") for _, attrs in marks.tags)
    assert marks.by_id("histogram-creatinine-script-alert-1-script") is not None


def test_the_funnel_follows_the_patient_table_after_a_rule_change(job, run_folder):
    _, _, report, patients, answers = run_folder
    relaxed = job.model_copy(update={"criteria": [c.model_copy(update={"rule": "FALSE"}) if c.kind == "exclusion" else c
                                                  for c in job.criteria]})
    base = patients.select([n for n in patients.column_names if n not in {c.id for c in job.criteria} | {"status", "reasons"}
                            and n not in {d.id for d in job.derived}])
    screened = apply_rules(base, relaxed)
    page = render_report(report, answers, screened, job=relaxed)
    excluded = [float(a["width"]) for a in Marks(page).with_class("funnel-bar-excluded")]
    kinds = [c.kind for c in job.criteria]
    assert [w for w, kind in zip(excluded, kinds) if kind == "exclusion"] == [0.0] * kinds.count("exclusion")
    statuses = Counter(screened["status"].to_pylist())
    assert statuses["excluded"] == 0 and statuses["eligible"] + statuses["needs_review"] == patients.num_rows
    # the cohort line counts the relaxed patient table, not the report.json of the run (which excluded some)
    assert report["cohort"]["status"].get("excluded", 0) > 0
    assert f"eligible {statuses['eligible']}, needs review {statuses['needs_review']}, excluded 0<" in page


@given(st.floats(min_value=0.001, max_value=1e9, allow_nan=False), st.integers(2, 8))
def test_ticks_are_round_and_cover_the_range(maximum, count):
    ticks = nice_ticks(maximum, count)
    assert ticks[0] == 0 and ticks[-1] >= maximum * (1 - 1e-9)
    assert all(b > a for a, b in itertools.pairwise(ticks))
    assert len(ticks) <= 2 * count + 2
    step = ticks[1]
    mantissa = step / 10 ** math.floor(math.log10(step))  # 1, 2 or 5 times a power of ten, nothing in between
    assert any(math.isclose(mantissa, m, rel_tol=1e-9) or math.isclose(mantissa, 10 * m, rel_tol=1e-9) for m in (1, 2, 5)), step
    assert all(math.isclose(t, i * step, rel_tol=1e-9, abs_tol=1e-12) for i, t in enumerate(ticks))  # evenly spaced


def test_histogram_values_are_converted_like_to_canonical(job):
    from engine.reporting.html import canonical_values
    from engine.cohort.units import to_canonical

    values, units = [1.0, 88.4, 2.0, 3.0, float("inf")], ["mg/dL", "µmol/l", None, "furlongs", "mg/dL"]
    question = job.question("creatinine_max")
    got = canonical_values(np.array(values), pa.chunked_array([pa.array(units, pa.string())]), question)
    expected = [to_canonical(v, u, question)[0] for v, u in zip(values, units, strict=True)]
    assert [None if not np.isfinite(g) else pytest.approx(g) for g in got] == expected
    capped = canonical_values(np.array([60.0, 30.0]), pa.chunked_array([pa.array([None, "%"])]), job.question("lvef_min"))
    assert capped.tolist() == [55.0, 30.0]


def test_failed_model_answers_are_counted_and_shown(job, tmp_path):
    """report.json and the page count the model answers that failed their check, by reason and by what became of
    them; a patient whose value rests on a kept failure is held for review."""
    answers = with_unverified(gold_answers(job, notes=NOTES), kept=3, replaced=2)
    store, report, patients = write_output_folder(tmp_path, job, answers)
    write_report_html(store, job)
    checked = report["verification"]
    answered = sum(1 for r in answers.to_pylist() if r["verified"] is not None)
    assert (checked["model_answers_checked"], checked["failed"], checked["cue_answer_kept"]) == (answered, 5, 2)
    assert checked["passed"] == answered - 5 and checked["failed_by_reason"] == {"value not in evidence quote": 5}
    held = [p for p in patients.to_pylist() if p["exc_creatinine__unverified"]]
    kept = {r["patient_id"] for r in answers.to_pylist() if r["verified"] is False and r["model"] != "cues"}
    assert {p["patient_id"] for p in held} == kept and checked["patients_held"] == len(held)
    assert checked["criteria_held"]["exc_creatinine"] == len(held) > 0
    assert all(p["creatinine_max"] is None and p["exc_creatinine"] == "unknown" for p in held)  # 9.9 would exclude
    assert all(any(r.startswith("exc_creatinine: creatinine_max model answer not verified") for r in p["reasons"])
               or p["status"] == "excluded" for p in held)
    page = Marks((tmp_path / REPORT_HTML).read_text(encoding="utf-8"))
    assert page.by_id("verification-section") is not None and page.by_id("verification-failures") is not None
    text = "".join(page.text)
    assert "value not in evidence quote" in text and f"{answered}model answers checked" in text


def test_engine_rules_recounts_who_unverified_answers_hold(job, tmp_path):
    """Turning review.require_verified_answers off with `engine rules` releases the held patients in report.json."""
    from engine.cohort.rules import screen
    from engine.reporting.report import with_rules_cohort

    answers = with_unverified(gold_answers(job, notes=NOTES), kept=3, replaced=2)
    store, report, _ = write_output_folder(tmp_path, job, answers)
    assert report["verification"]["patients_held"] > 0
    relaxed = job.model_copy(update={"review": job.review.model_copy(update={"require_verified_answers": False})})
    patients, funnel = screen(read_answers(store.uri), relaxed)
    again = with_rules_cohort(report, relaxed, patients, funnel)["verification"]
    assert (again["patients_held"], again["criteria_held"], again["require_verified_answers"]) == (0, {}, False)
    assert again["failed"] == report["verification"]["failed"] == 5  # the answers' own counts stay

"""report.html: one self-contained page (inline SVG and CSS, no JavaScript, nothing fetched) for people.

It shows the run's figures from report.json, the cohort funnel, each criterion's met / not met / unknown
counts, each question's answers (and a histogram of its numbers), evidence grounding and, when `engine eval`
has run, the evaluation with its confidence intervals. No note text or evidence quote is put in the page.

The functions here turn tables and dicts into plain dicts and lists (counts, rows, chart geometry); the Jinja2
template templates/report.html.j2 lays them out, with templates/report.css inlined, and escapes every value
(autoescape). Rendering is a pure function of tables and dicts (`render_report`); `write_report_html` reads and
writes.
"""

from __future__ import annotations

import functools
import math
import re

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import OutputError
from engine.job import JobSpec

REPORT_HTML = "report.html"
TEMPLATE = "report.html.j2"
PLOT_WIDTH = 460  # px of the bar area; labels sit left of it, counts right of it
ROW_HEIGHT = 24
BAR_HEIGHT = 15
CHAR_WIDTH = 7.2  # px per character of 12px labels, to size the label column
HISTOGRAM_BINS = 12
# Okabe-Ito colours (readable with colour-blindness); grey for "not in note"/"unknown".
ANSWER_COLOURS = {"yes": "#0072B2", "no": "#56B4E9", "value": "#009E73", "not_in_note": "#BBBBBB", "error": "#D55E00"}
ANSWER_LABELS = {"yes": "yes", "no": "no", "value": "number", "not_in_note": "not in note", "error": "error"}
CRITERION_COLOURS = {"met": "#0072B2", "not_met": "#E69F00", "unknown": "#BBBBBB"}
CRITERION_LABELS = {"met": "met", "not_met": "not met", "unknown": "unknown"}
FUNNEL_COLOURS = {"remaining": "#0072B2", "excluded": "#D55E00"}
FUNNEL_LABELS = {"remaining": "still in the running after this criterion", "excluded": "excluded by this criterion"}
STATUS_COLOURS = {"eligible": "#009E73", "needs_review": "#E69F00", "excluded": "#D55E00"}
STATUS_LABELS = {"eligible": "eligible", "needs_review": "needs review", "excluded": "excluded"}
GROUNDING_COLOURS = {"exact": "#009E73", "fuzzy": "#E69F00", "not_found": "#D55E00"}
GROUNDING_LABELS = {"exact": "quote found verbatim", "fuzzy": "found approximately", "not_found": "not found in the note"}
EVAL_HEADLINE = {"yes_no": "balanced_accuracy", "numeric": "accuracy", "date": "accuracy", "categorical": "accuracy",
                 "criterion": "agreement"}
EVAL_COLUMNS = (("question / criterion", ""), ("type", ""), ("n", "num"), ("metric", ""), ("value", "num"),
                ("95% CI", "num"), ("errors", "num"))


# --- the template ----------------------------------------------------------------------------------------------
@functools.cache
def environment() -> jinja2.Environment:
    """The templates shipped in engine/reporting/templates, every value escaped (autoescape), a misspelt name an
    error (StrictUndefined). Filters: `px` (a coordinate, one decimal) and `number` (a count or value as shown)."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("engine.reporting", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters["px"] = lambda value: f"{value:.1f}"
    env.filters["number"] = _number
    return env


# --- numbers and names -----------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", str(text).lower()).strip("-") or "x"


def nice_ticks(maximum: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `maximum` (steps of 1, 2 or 5 times a power of ten)."""
    if maximum <= 0:
        return [0.0, 1.0]
    raw = maximum / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(math.ceil(maximum / step - 1e-9) + 1)]


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.3g}"


def _percent(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


# --- chart geometry (the template's svg macros draw these) -----------------------------------------------------
def legend(labels: dict[str, str], colours: dict[str, str]) -> list[dict]:
    """One swatch per key: [{label, colour}]."""
    return [{"label": label, "colour": colours[key]} for key, label in labels.items()]


def stacked_bars(chart_id: str, rows: list[dict], colours: dict[str, str], names: dict[str, str], axis_label: str,
                 bar_class: str, scale_max: float | None = None) -> dict:
    """Horizontal stacked bars: rows [{id, label, segments: {key: count}, note}], one <g id="{chart_id}-{id}"> each.

    Every segment is a <rect class="{bar_class} {bar_class}-{key}"> (zero-width when empty), so each row holds
    the same marks and a reader (or a test) can count them.
    """
    label_width = int(max([len(r["label"]) for r in rows] + [8]) * CHAR_WIDTH) + 12
    note_width = int(max([len(r.get("note", "")) for r in rows] + [4]) * CHAR_WIDTH) + 12
    top, bottom = 8, 40
    width, height = label_width + PLOT_WIDTH + note_width, top + ROW_HEIGHT * len(rows) + bottom
    largest = scale_max or max([sum(r["segments"].values()) for r in rows] + [1])
    ticks = nice_ticks(largest)
    x = lambda v: label_width + v / ticks[-1] * PLOT_WIDTH
    axis_y = top + ROW_HEIGHT * len(rows)
    chart_rows = []
    for i, row in enumerate(rows):
        y = top + i * ROW_HEIGHT + (ROW_HEIGHT - BAR_HEIGHT) / 2
        bars, start = [], 0.0
        for key, value in row["segments"].items():
            bars.append({"css": f"{bar_class} {bar_class}-{_slug(key)}", "x": x(start), "y": y,
                         "width": x(start + value) - x(start), "height": BAR_HEIGHT, "fill": colours[key],
                         "tip": f'{row["label"]}: {names.get(key, key)} {_number(value)}'})
            start += value
        chart_rows.append({"id": f"{chart_id}-{_slug(row['id'])}", "label": row["label"], "label_x": label_width - 8,
                           "text_y": y + BAR_HEIGHT - 3, "bars": bars, "note_x": x(start) + 6, "note": row.get("note", "")})
    return {"id": chart_id, "width": width, "height": height, "label": axis_label,
            "grid": _grid(ticks, x, top, axis_y), "rows": chart_rows,
            "axis": _x_axis(ticks, x, axis_y, axis_label, label_width + PLOT_WIDTH / 2)}


def _grid(ticks: list[float], x, top: float, bottom: float) -> dict:
    return {"xs": [x(t) for t in ticks], "y1": top, "y2": bottom}


def _x_axis(ticks: list[float], x, y: float, label: str, centre: float) -> dict:
    return {"x1": x(ticks[0]), "x2": x(ticks[-1]), "y": y, "ticks": [{"x": x(t), "text": _number(t)} for t in ticks],
            "label": label, "centre": centre}


def histogram(chart_id: str, values: np.ndarray, unit: str, title: str, weights: np.ndarray | None = None) -> dict:
    """A histogram of one question's numbers: x the value (in `unit`), y the number of notes (each value counted
    `weights` times: the rows that gave it). `bins` is empty when there is no finite number."""
    width, height, left, right, top, bottom = 300, 170, 40, 12, 8, 40
    weights = np.ones(values.size) if weights is None else weights
    finite = np.isfinite(values)
    values, weights = values[finite], weights[finite]
    chart = {"id": chart_id, "width": width, "height": height, "title": title, "unit": unit, "bins": []}
    if values.size == 0:
        return chart
    low, high = float(values.min()), float(values.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(low, high), weights=weights)
    y_ticks = nice_ticks(float(counts.max()), 3)
    plot_w, plot_h = width - left - right, height - top - bottom
    x = lambda v: left + (v - low) / (high - low) * plot_w
    y = lambda c: top + plot_h - c / y_ticks[-1] * plot_h
    chart["bins"] = [{"x": x(a) + 0.5, "y": y(count), "width": max(x(b) - x(a) - 1, 0.5), "height": y(0) - y(count),
                      "tip": f"{_number(a)}-{_number(b)} {unit}: {int(count)} notes"}
                     for count, a, b in zip(counts, edges[:-1], edges[1:], strict=True)]
    chart["fill"] = ANSWER_COLOURS["value"]
    chart["axis"] = {"left": left, "right": width - right, "top": top, "base": y(0),
                     "x_ticks": [{"x": x(v), "text": _number(v), "anchor": anchor}
                                 for v, anchor in ((low, "start"), ((low + high) / 2, "middle"), (high, "end"))],
                     "y_ticks": [{"y": y(t), "text": _number(t)} for t in y_ticks],
                     "centre": left + plot_w / 2, "middle": top + plot_h / 2}
    return chart


def interval_plot(chart_id: str, rows: list[dict]) -> dict:
    """Dot and whisker per item on a 0-1 scale: rows [{id, label, value, low, high}] (NaN: undefined, no mark)."""
    label_width = int(max([len(r["label"]) for r in rows] + [8]) * CHAR_WIDTH) + 12
    top, width, height = 8, label_width + PLOT_WIDTH + 20, 8 + ROW_HEIGHT * len(rows) + 40
    x = lambda v: label_width + v * PLOT_WIDTH
    ticks = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    axis_y = top + ROW_HEIGHT * len(rows)
    plot_rows = []
    for i, r in enumerate(rows):
        cy = top + i * ROW_HEIGHT + ROW_HEIGHT / 2
        plot_rows.append({"id": f"{chart_id}-{_slug(r['id'])}", "label": r["label"], "label_x": label_width - 8, "cy": cy,
                          "interval": None if math.isnan(r["low"]) else {"x1": x(r["low"]), "x2": x(r["high"])},
                          "point": None if math.isnan(r["value"]) else
                          {"x": x(r["value"]), "tip": f'{r["label"]}: {r["value"]:.3f}'},
                          "undefined_x": x(0) + 6})
    return {"id": chart_id, "width": width, "height": height, "label": "metric with 95% confidence interval",
            "grid": _grid(ticks, x, top, axis_y), "rows": plot_rows,
            "axis": _x_axis(ticks, x, axis_y, "metric value (dot) and 95% confidence interval (line)",
                            label_width + PLOT_WIDTH / 2)}


VALUE_WORDS = {"numeric": "numbers", "date": "dates", "categorical": "choices"}


# --- data to rows ----------------------------------------------------------------------------------------------
def answer_rows(answers, job: JobSpec | None, by_question: dict | None = None) -> list[dict]:
    """One bar per question from the per-(question, category) counts: report.json's `answers_by_question` when
    given, else counted here (SQL over a table or the committed files)."""
    from engine.store.answers import answer_categories

    by_question = by_question if by_question is not None else answer_categories(answers)
    types = {q.id: q.type for q in job.questions} if job else {}
    order = list(types) + sorted(set(by_question) - set(types))  # every job question, an empty bar when it has no rows
    rows = []
    for qid in order:
        got = by_question.get(qid, {})
        segments = {k: got.get(k, 0) for k in ANSWER_COLOURS}
        if not any(segments.values()):
            rows.append({"id": qid, "label": qid, "segments": segments, "note": "no answer rows"})
            continue
        values = VALUE_WORDS.get(types.get(qid), "values")
        said = f"yes {segments['yes']} / no {segments['no']}" if segments["yes"] + segments["no"] else f"{values} {segments['value']}"
        note = f"{said}, not in note {segments['not_in_note']}, errors {segments['error']}"
        rows.append({"id": qid, "label": qid, "segments": segments, "note": note})
    return rows


def numeric_values(answers, job: JobSpec | None, numbers: pa.Table | None = None) -> list[tuple[str, np.ndarray, np.ndarray, str, int]]:
    """(question id, distinct numbers in the canonical unit, their row counts, unit, numbers left out for an
    unaccepted unit) per numeric question, from the distinct answered numbers (never the whole table): `numbers`
    when the run already counted them (engine.store.answers.answer_totals), else counted here."""
    from engine.store.answers import answered_numbers

    numbered = numbers if numbers is not None else answered_numbers(answers)
    questions = [q for q in job.questions if q.type == "numeric"] if job else []
    ids = [q.id for q in questions] or sorted(set(numbered["question_id"].to_pylist()))
    result = []
    for i, qid in enumerate(ids):
        rows = numbered.filter(pc.equal(numbered["question_id"], qid))
        values = rows["value_num"].to_numpy(zero_copy_only=False).astype(float)
        weights = rows["n"].to_numpy(zero_copy_only=False).astype(np.int64)
        if not questions:
            result.append((qid, values, weights, "as written", 0))
            continue
        converted = canonical_values(values, rows["unit"], questions[i])
        kept = np.isfinite(converted)
        result.append((qid, converted[kept], weights[kept], questions[i].unit or "", int(weights[~kept].sum())))
    return result


def canonical_values(values: np.ndarray, units: pa.ChunkedArray, question) -> np.ndarray:
    """engine.cohort.units.to_canonical over a column: one factor per distinct unit spelling, NaN where not accepted."""
    from engine.cohort.units import to_canonical_array, unit_factors

    spellings = pc.unique(units).to_pylist()
    factors = unit_factors(spellings, question)
    position = pc.index_in(units, value_set=pa.array(spellings, pa.string())).to_numpy(zero_copy_only=False)
    if units.null_count:  # index_in does not match nulls: a missing unit is the canonical one
        position = np.where(pc.is_null(units).to_numpy(zero_copy_only=False), spellings.index(None), position)
    return to_canonical_array(values, factors[position.astype(int)], question) if len(values) else values


def criterion_rows(patients: pa.Table, job: JobSpec | None, funnel: list[dict]) -> list[dict]:
    ids = [c.id for c in job.criteria] if job else [row["criterion"] for row in funnel]
    rows = []
    for cid in ids:
        if cid in patients.column_names:
            states = pc.value_counts(patients[cid].fill_null("unknown")).to_pylist()
            got = {s["values"]: s["counts"] for s in states}
        else:
            got = next((row for row in funnel if row["criterion"] == cid), {})
        segments = {k: int(got.get(k, 0)) for k in CRITERION_COLOURS}
        kind = next((c.kind for c in job.criteria if c.id == cid), "") if job else ""
        rows.append({"id": cid, "label": f"{cid} ({kind})" if kind else cid, "segments": segments,
                     "note": f"met {segments['met']}, not met {segments['not_met']}, unknown {segments['unknown']}"})
    return rows


def funnel_rows(funnel: list[dict]) -> list[dict]:
    rows = []
    for step in funnel:
        review = f", {step['needs_review']} need review" if step.get("needs_review") else ""
        rows.append({"id": step["criterion"], "label": f"{step['criterion']} ({step.get('kind', '')})",
                     "segments": {"remaining": step["remaining"], "excluded": step["excluded"]},
                     "note": f"{step['entering']} in, {step['excluded']} excluded, {step['remaining']} remain{review}"})
    return rows


# --- sections: what each section of the template shows (None: the section is left out) ------------------------
def figures_section(report: dict) -> dict:
    by_status = report.get("rows_by_status", {})
    cost = report.get("cost_per_10k_patients_usd")
    figures = [
        ("notes / patients", f"{report.get('notes', '-')} / {report.get('patients', '-')}"),
        ("questions per note", report.get("questions", "-")),
        ("answers: answered / not in note / error",
         " / ".join(str(by_status.get(s, 0)) for s in ("answered", "not_in_note", "error"))),
        ("schema-valid model outputs", _percent(report.get("schema_valid_rate"))),
        ("prefix-cache hit rate", _percent(report.get("prefix_cache_hit_rate"))),
        ("completion tokens per answer", report.get("completion_tokens_per_answer") or "-"),
        ("wall time, s (start-up)", f"{report.get('wall_seconds', '-')} ({report.get('startup_seconds', '-')})"),
        ("seconds per (note, question)", report.get("seconds_per_pair") or "-"),
        ("cost per 10k patients", "-" if cost is None else f"${cost:,.2f}"),
    ]
    notes = []
    if report.get("hardware"):
        notes.append(f"Hardware: {report['hardware']} at ${report.get('usd_per_hour')}/h.")
    if report.get("cost_method"):
        notes.append(f"Cost: {report['cost_method']}.")
    return {"cards": _cards(figures), "notes": notes,
            "errors": [{"reason": e["error"], "rows": e["rows"]} for e in report.get("top_errors") or []]}


def _cards(figures: list[tuple[str, object]]) -> list[dict]:
    return [{"value": value, "label": label} for label, value in figures]


def cohort_sections(report: dict | None, patients: pa.Table | None, funnel: list[dict], job: JobSpec | None) -> dict:
    """{status, funnel, criteria}: each a {legend, chart} or None."""
    status = {}
    if patients is not None and "status" in patients.column_names:
        status = {r["values"]: r["counts"] for r in pc.value_counts(patients["status"]).to_pylist()}
    elif report:
        status = report.get("cohort", {}).get("status", {})
    sections = {"status": None, "funnel": None, "criteria": None}
    if status:
        segments = {k: int(status.get(k, 0)) for k in STATUS_COLOURS}
        row = {"id": "patients", "label": "patients", "segments": segments,
               "note": ", ".join(f"{STATUS_LABELS[k]} {v}" for k, v in segments.items())}
        sections["status"] = {"legend": legend(STATUS_LABELS, STATUS_COLOURS),
                              "chart": stacked_bars("status", [row], STATUS_COLOURS, STATUS_LABELS, "patients", "status-bar")}
    if funnel:
        total = max([step["entering"] for step in funnel] + [1])
        sections["funnel"] = {"legend": legend(FUNNEL_LABELS, FUNNEL_COLOURS),
                              "chart": stacked_bars("funnel", funnel_rows(funnel), FUNNEL_COLOURS, FUNNEL_LABELS, "patients",
                                                    "funnel-bar", scale_max=total)}
    if patients is not None and (job and job.criteria or funnel):
        rows = criterion_rows(patients, job, funnel)
        sections["criteria"] = {"legend": legend(CRITERION_LABELS, CRITERION_COLOURS),
                                "chart": stacked_bars("criteria", rows, CRITERION_COLOURS, CRITERION_LABELS, "patients",
                                                      "criterion-bar")}
    return sections


def answer_sections(answers, job: JobSpec | None, by_question: dict | None = None, numbers: pa.Table | None = None) -> dict:
    """{answers: {legend, chart}, numbers: [{question, caption, chart}] (one histogram panel per numeric question)};
    `by_question` and `numbers`: counts the run already made (answer_rows, numeric_values)."""
    rows = answer_rows(answers, job, by_question)
    panels = []
    for qid, values, weights, unit, dropped in numeric_values(answers, job, numbers):
        extra = f"; {dropped} in a unit the question does not accept" if dropped else ""
        panels.append({"question": qid, "caption": f"{int(weights.sum())} numbers{extra}",
                       "chart": histogram(f"histogram-{_slug(qid)}", values, unit, qid, weights)})
    return {"answers": {"legend": legend(ANSWER_LABELS, ANSWER_COLOURS),
                        "chart": stacked_bars("answers", rows, ANSWER_COLOURS, ANSWER_LABELS, "notes", "answer-bar")},
            "numbers": panels}


def grounding_section(report: dict | None, answers) -> dict | None:
    from engine.store.answers import answer_totals

    counts = dict((report or {}).get("grounding") or {})
    if report is None and answers is not None and "grounding" in answers.schema.names:  # a report already counted them
        counts = answer_totals(answers)["grounding"]
    if not counts:
        return None
    rows = [{"id": k, "label": GROUNDING_LABELS.get(k, k), "segments": {k: int(counts.get(k, 0))}, "note": str(counts.get(k, 0))}
            for k in GROUNDING_COLOURS]
    return {"chart": stacked_bars("grounding", rows, GROUNDING_COLOURS, GROUNDING_LABELS, "answers", "grounding-bar")}


def verification_section(report: dict | None) -> dict | None:
    """Model answers checked against their notes (report.json `verification`): passed, failed by reason, and what
    became of the failures (the cue answer kept in hybrid mode; patients held for review in model mode)."""
    checked = (report or {}).get("verification") or {}
    if not checked.get("model_answers_checked"):
        return None
    figures = [("model answers checked", checked["model_answers_checked"]), ("passed", checked.get("passed", 0)),
               ("failed", checked.get("failed", 0)), ("failed, cue answer kept", checked.get("cue_answer_kept", 0)),
               ("patients held for review", checked.get("patients_held", 0))]
    return {"cards": _cards(figures),
            "failures": [{"reason": k, "answers": v} for k, v in (checked.get("failed_by_reason") or {}).items()]}


def evaluation_section(evaluation: pa.Table, summary: dict) -> dict:
    from engine.reporting.evaluate import DEFINITIONS, METRIC_NAMES, metric_name, fmt, fmt_interval

    records = evaluation.to_pylist()
    headline = [r for r in records if r["scope"] != "overall" and EVAL_HEADLINE.get(r["kind"]) == r["metric"]]
    plot_rows = [{"id": f"{r['scope']}-{r['id']}", "label": f"{r['id']} ({METRIC_NAMES[r['metric']]})", "value": r["value"],
                  "low": r["ci_low"], "high": r["ci_high"]} for r in headline]
    lines = [summary.get("matching", ""), summary.get("overall", "")]
    if summary.get("generated"):
        lines.append(f"Evaluated {summary['generated']}; {summary.get('draws')} bootstrap draws over notes "
                     f"(patients for criteria), seed {summary.get('seed')}.")
    rows = [{"item": "overall" if r["scope"] == "overall" else r["id"], "kind": r["kind"], "n": r["n"],
             "metric": metric_name(r["metric"]), "value": fmt(r["value"]),
             "interval": fmt_interval(r["ci_low"], r["ci_high"]), "errors": "" if r["errors"] is None else r["errors"]}
            for r in records]
    return {"lines": [line for line in lines if line], "plot": interval_plot("eval-plot", plot_rows) if plot_rows else None,
            "columns": [{"name": name, "css": css} for name, css in EVAL_COLUMNS], "rows": rows,
            "definitions": [{"name": METRIC_NAMES.get(k, k.replace("_", " ")), "text": v} for k, v in DEFINITIONS.items()]}


# --- the page --------------------------------------------------------------------------------------------------
def report_context(report: dict | None = None, answers=None, patients: pa.Table | None = None,
                   evaluation: tuple[pa.Table, dict] | None = None, job: JobSpec | None = None,
                   numbers: pa.Table | None = None) -> dict:
    """Everything the template shows, as plain dicts and lists (the arguments are render_report's)."""
    from engine.store.answers import row_count

    funnel = _funnel(report, patients, job)
    subtitle = [x for x in (
        f"model {report.get('model')} ({report.get('backend')})" if report else "",
        f"job fingerprint {report.get('job_fingerprint')}" if report else "",
        f"generated {report.get('generated')}" if report else "") if x]
    by_question = (report or {}).get("answers_by_question")  # counted by the run with the report's other counts
    answered = answer_sections(answers, job, by_question, numbers) if row_count(answers) else {"answers": None, "numbers": []}
    return {"name": (report or {}).get("job") or (job.name if job else "engine run"), "subtitle": subtitle,
            "figures": figures_section(report) if report else None,
            **cohort_sections(report, patients, funnel, job), **answered,
            "grounding": grounding_section(report, answers), "verification": verification_section(report),
            "evaluation": evaluation_section(*evaluation) if evaluation is not None else None}


def render_report(report: dict | None = None, answers=None, patients: pa.Table | None = None,
                  evaluation: tuple[pa.Table, dict] | None = None, job: JobSpec | None = None,
                  numbers: pa.Table | None = None) -> str:
    """The whole page as one string; every argument may be missing (its sections are left out).

    `answers` is a table or the committed files (a pyarrow dataset); only aggregates of it are read, and none
    that report.json (`answers_by_question`) or `numbers` (engine.store.answers.answer_totals) already hold.
    """
    context = report_context(report, answers, patients, evaluation, job, numbers)
    return environment().get_template(TEMPLATE).render(context)


def _funnel(report: dict | None, patients: pa.Table | None, job: JobSpec | None) -> list[dict]:
    """The funnel of the patient table as it is now (after `engine rules`), else the one report.json recorded."""
    if job is not None and job.criteria and patients is not None and all(c.id in patients.column_names for c in job.criteria):
        from engine.cohort.rules import cohort_funnel

        return cohort_funnel(patients, job)
    return list(((report or {}).get("cohort") or {}).get("funnel") or [])


def write_report_html(store, job: JobSpec | None = None, *, report: dict | None = None, answers=None,
                      patients: pa.Table | None = None, source=None, numbers: pa.Table | None = None) -> str:
    """Render report.html into `store` (an OutputStore); what is not passed is read from `source` (default: store).

    The evaluation is read from `store`'s eval.parquet when an eval has run there. Returns the file's path.
    """
    from engine.reporting.evaluate import read_evaluation

    source = source or store
    report = report if report is not None else source.read_json("report.json")
    if answers is None:
        from engine.store.answers import answers_dataset

        try:
            answers = answers_dataset(source.uri, source.storage_options)
        except OutputError:
            answers = None
    if patients is None:
        patients = _read_patients(source)
    evaluation = read_evaluation(store.uri, store.storage_options)
    store.write_text(REPORT_HTML, render_report(report, answers, patients, evaluation, job, numbers))
    return f"{store.uri.rstrip('/')}/{REPORT_HTML}"


def _read_patients(store) -> pa.Table | None:
    import pyarrow.parquet as pq

    from engine.storage import join

    path = join(store.fs, store.root, "patients", "patients.parquet")
    if not store.fs.exists(path):
        return None
    with store.fs.open(path, "rb") as handle:
        return pq.read_table(handle)

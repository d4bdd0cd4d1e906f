"""report.html: one self-contained page (inline SVG and CSS, no JavaScript, nothing fetched) for people.

It shows the run's figures from report.json, the cohort funnel, each criterion's met / not met / unknown
counts, each question's answers (and a histogram of its numbers), evidence grounding and, when `engine eval`
has run, the evaluation with its confidence intervals. No note text or evidence quote is put in the page.
Rendering is a pure function of tables and dicts (`render_report`); `write_report_html` reads and writes.
"""

from __future__ import annotations

import html
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import OutputError
from engine.job import JobSpec

REPORT_HTML = "report.html"
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
EVAL_HEADLINE = {"yes_no": "balanced_accuracy", "numeric": "accuracy", "criterion": "agreement"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1040px;margin:0 auto;padding:24px 32px 48px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 6px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:0 0 2px}p.note{color:#555;font-size:13px;margin:4px 0 10px;max-width:860px}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px;margin:12px 0}
.figure{border:1px solid #e2e2e2;border-radius:6px;padding:8px 10px}.figure b{display:block;font-size:20px}
.figure span{color:#555;font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border-bottom:1px solid #e6e6e6;padding:3px 8px;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.legend{font-size:12px;margin:4px 0 6px}.legend span{margin-right:14px;white-space:nowrap}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px;border-radius:2px}
.small-multiples{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
svg text{font-size:12px;fill:#222}svg .axis text{fill:#555;font-size:11px}svg .axis line,svg .axis path{stroke:#999}
svg .grid{stroke:#eee}
"""


# --- small SVG helpers -----------------------------------------------------------------------------------------
def _e(text) -> str:
    return html.escape(str(text), quote=True)


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


def _svg_open(chart_id: str, css_class: str, width: float, height: float, label: str) -> str:
    return (f'<svg id="{_e(chart_id)}" class="{css_class}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">')


def legend(labels: dict[str, str], colours: dict[str, str]) -> str:
    items = "".join(f'<span><i style="background:{colours[k]}"></i>{_e(v)}</span>' for k, v in labels.items())
    return f'<div class="legend">{items}</div>'


def stacked_bars(chart_id: str, rows: list[dict], colours: dict[str, str], names: dict[str, str], axis_label: str,
                 bar_class: str, scale_max: float | None = None) -> str:
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
    parts = [_svg_open(chart_id, "chart", width, height, axis_label)]
    axis_y = top + ROW_HEIGHT * len(rows)
    parts += [f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{axis_y}"/>' for t in ticks]
    for i, row in enumerate(rows):
        y = top + i * ROW_HEIGHT + (ROW_HEIGHT - BAR_HEIGHT) / 2
        parts.append(f'<g id="{_e(chart_id)}-{_slug(row["id"])}" class="row">')
        parts.append(f'<text x="{label_width - 8}" y="{y + BAR_HEIGHT - 3:.1f}" text-anchor="end">{_e(row["label"])}</text>')
        start = 0.0
        for key, value in row["segments"].items():
            tip = f'{row["label"]}: {names.get(key, key)} {_number(value)}'
            parts.append(f'<rect class="{bar_class} {bar_class}-{_slug(key)}" x="{x(start):.1f}" y="{y:.1f}" '
                         f'width="{x(start + value) - x(start):.1f}" height="{BAR_HEIGHT}" fill="{colours[key]}">'
                         f'<title>{_e(tip)}</title></rect>')
            start += value
        parts.append(f'<text x="{x(start) + 6:.1f}" y="{y + BAR_HEIGHT - 3:.1f}" class="count">{_e(row.get("note", ""))}</text></g>')
    parts.append(_x_axis(ticks, x, axis_y, axis_label, label_width + PLOT_WIDTH / 2))
    parts.append("</svg>")
    return "".join(parts)


def _x_axis(ticks: list[float], x, y: float, label: str, centre: float) -> str:
    marks = "".join(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{y}" y2="{y + 4}"/>'
                    f'<text x="{x(t):.1f}" y="{y + 16}" text-anchor="middle">{_number(t)}</text>' for t in ticks)
    return (f'<g class="axis"><line x1="{x(ticks[0]):.1f}" x2="{x(ticks[-1]):.1f}" y1="{y}" y2="{y}"/>{marks}'
            f'<text x="{centre:.1f}" y="{y + 32}" text-anchor="middle">{_e(label)}</text></g>')


def histogram(chart_id: str, values: np.ndarray, unit: str, title: str, weights: np.ndarray | None = None) -> str:
    """A histogram of one question's numbers: x the value (in `unit`), y the number of notes (each value counted
    `weights` times: the rows that gave it)."""
    width, height, left, right, top, bottom = 300, 170, 40, 12, 8, 40
    weights = np.ones(values.size) if weights is None else weights
    finite = np.isfinite(values)
    values, weights = values[finite], weights[finite]
    if values.size == 0:
        return f'<svg id="{_e(chart_id)}" class="histogram" width="{width}" height="40"><text x="0" y="20">no numbers answered</text></svg>'
    low, high = float(values.min()), float(values.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(low, high), weights=weights)
    y_ticks = nice_ticks(float(counts.max()), 3)
    plot_w, plot_h = width - left - right, height - top - bottom
    x = lambda v: left + (v - low) / (high - low) * plot_w
    y = lambda c: top + plot_h - c / y_ticks[-1] * plot_h
    parts = [_svg_open(chart_id, "histogram", width, height, title)]
    for count, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        tip = f"{_number(a)}-{_number(b)} {unit}: {int(count)} notes"
        parts.append(f'<rect class="histogram-bin" x="{x(a) + 0.5:.1f}" y="{y(count):.1f}" width="{max(x(b) - x(a) - 1, 0.5):.1f}" '
                     f'height="{y(0) - y(count):.1f}" fill="{ANSWER_COLOURS["value"]}"><title>{_e(tip)}</title></rect>')
    parts.append(f'<g class="axis"><line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>'
                 f'<line x1="{left}" x2="{left}" y1="{top}" y2="{y(0):.1f}"/>')
    for value, anchor in ((low, "start"), ((low + high) / 2, "middle"), (high, "end")):
        parts.append(f'<text x="{x(value):.1f}" y="{y(0) + 14:.1f}" text-anchor="{anchor}">{_e(_number(value))}</text>')
    parts += [f'<text x="{left - 4}" y="{y(t) + 4:.1f}" text-anchor="end">{_number(t)}</text>' for t in y_ticks]
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">value ({_e(unit)})</text>'
                 f'<text transform="translate(11 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">notes</text></g></svg>')
    return "".join(parts)


def interval_plot(chart_id: str, rows: list[dict]) -> str:
    """Dot and whisker per item on a 0-1 scale: rows [{id, label, value, low, high}]."""
    label_width = int(max([len(r["label"]) for r in rows] + [8]) * CHAR_WIDTH) + 12
    top, width, height = 8, label_width + PLOT_WIDTH + 20, 8 + ROW_HEIGHT * len(rows) + 40
    x = lambda v: label_width + v * PLOT_WIDTH
    ticks = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    parts = [_svg_open(chart_id, "chart", width, height, "metric with 95% confidence interval")]
    axis_y = top + ROW_HEIGHT * len(rows)
    parts += [f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{axis_y}"/>' for t in ticks]
    for i, r in enumerate(rows):
        cy = top + i * ROW_HEIGHT + ROW_HEIGHT / 2
        parts.append(f'<g id="{_e(chart_id)}-{_slug(r["id"])}" class="row"><text x="{label_width - 8}" y="{cy + 4:.1f}" '
                     f'text-anchor="end">{_e(r["label"])}</text>')
        if not math.isnan(r["low"]):
            parts.append(f'<line class="eval-ci" x1="{x(r["low"]):.1f}" x2="{x(r["high"]):.1f}" y1="{cy:.1f}" y2="{cy:.1f}" '
                         'stroke="#555" stroke-width="2"/>')
        if math.isnan(r["value"]):
            parts.append(f'<text x="{x(0) + 6:.1f}" y="{cy + 4:.1f}" style="fill:#777">undefined (see definitions)</text>')
        else:
            parts.append(f'<circle class="eval-point" cx="{x(r["value"]):.1f}" cy="{cy:.1f}" r="4.5" fill="#0072B2">'
                         f'<title>{_e(r["label"])}: {r["value"]:.3f}</title></circle>')
        parts.append("</g>")
    parts.append(_x_axis(ticks, x, axis_y, "metric value (dot) and 95% confidence interval (line)", label_width + PLOT_WIDTH / 2))
    parts.append("</svg>")
    return "".join(parts)


# --- data to rows ----------------------------------------------------------------------------------------------
def answer_rows(answers, job: JobSpec | None) -> list[dict]:
    """One bar per question from the per-(question, category) counts (SQL over a table or the committed files)."""
    from engine.store.answers import answer_categories

    by_question = answer_categories(answers)
    order = [q.id for q in job.questions if q.id in by_question] if job else []
    order += sorted(set(by_question) - set(order))
    rows = []
    for qid in order:
        got = by_question[qid]
        segments = {k: got.get(k, 0) for k in ANSWER_COLOURS}
        said = f"yes {segments['yes']} / no {segments['no']}" if segments["yes"] + segments["no"] else f"numbers {segments['value']}"
        note = f"{said}, not in note {segments['not_in_note']}, errors {segments['error']}"
        rows.append({"id": qid, "label": qid, "segments": segments, "note": note})
    return rows


def numeric_values(answers, job: JobSpec | None) -> list[tuple[str, np.ndarray, np.ndarray, str, int]]:
    """(question id, distinct numbers in the canonical unit, their row counts, unit, numbers left out for an
    unaccepted unit) per numeric question, from the distinct answered numbers (never the whole table)."""
    from engine.store.answers import answered_numbers

    numbered = answered_numbers(answers)
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


# --- sections --------------------------------------------------------------------------------------------------
def _section(title: str, section_id: str, note: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{_e(title)}</h2><p class="note">{_e(note)}</p>{body}</section>'


def _percent(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def figures_section(report: dict) -> str:
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
    cards = "".join(f'<div class="figure"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in figures)
    notes = []
    if report.get("hardware"):
        notes.append(f"Hardware: {report['hardware']} at ${report.get('usd_per_hour')}/h.")
    if report.get("cost_method"):
        notes.append(f"Cost: {report['cost_method']}.")
    errors = report.get("top_errors") or []
    table = ""
    if errors:
        body = "".join(f'<tr><td>{_e(e["error"])}</td><td class="num">{e["rows"]}</td></tr>' for e in errors)
        table = f'<h3>Most frequent error reasons</h3><table id="top-errors"><tr><th>reason</th><th class="num">rows</th></tr>{body}</table>'
    body = f'<div class="figures">{cards}</div>' + "".join(f'<p class="note">{_e(n)}</p>' for n in notes) + table
    return _section("Run figures", "figures", "Measured by this run (report.json); every (note, question) pair is one answer row.", body)


def cohort_sections(report: dict | None, patients: pa.Table | None, funnel: list[dict], job: JobSpec | None) -> str:
    status = {}
    if patients is not None and "status" in patients.column_names:
        status = {r["values"]: r["counts"] for r in pc.value_counts(patients["status"]).to_pylist()}
    elif report:
        status = report.get("cohort", {}).get("status", {})
    parts = []
    if status:
        segments = {k: int(status.get(k, 0)) for k in STATUS_COLOURS}
        row = {"id": "patients", "label": "patients", "segments": segments,
               "note": ", ".join(f"{STATUS_LABELS[k]} {v}" for k, v in segments.items())}
        parts.append(_section("Cohort decision", "cohort", "Each patient's status after all criteria.",
                              legend(STATUS_LABELS, STATUS_COLOURS) + stacked_bars("status", [row], STATUS_COLOURS, STATUS_LABELS,
                                                                                    "patients", "status-bar")))
    if funnel:
        total = max([step["entering"] for step in funnel] + [1])
        parts.append(_section(
            "Cohort funnel", "funnel-section",
            "Criteria in job order. Each bar is the patients still in the running when the criterion is applied: "
            "blue stay in, red are excluded by it. Patients whose criterion is unknown with 'needs_review' stay in.",
            legend(FUNNEL_LABELS, FUNNEL_COLOURS) + stacked_bars("funnel", funnel_rows(funnel), FUNNEL_COLOURS, FUNNEL_LABELS,
                                                                 "patients", "funnel-bar", scale_max=total)))
    if patients is not None and (job and job.criteria or funnel):
        rows = criterion_rows(patients, job, funnel)
        parts.append(_section(
            "Criteria: met, not met, unknown", "criteria-section",
            "Every patient judged on every criterion separately (not only those left in the funnel). Unknown: an "
            "answer the rule needs was not in the notes.",
            legend(CRITERION_LABELS, CRITERION_COLOURS) + stacked_bars("criteria", rows, CRITERION_COLOURS, CRITERION_LABELS,
                                                                       "patients", "criterion-bar")))
    return "".join(parts)


def answer_sections(answers, job: JobSpec | None) -> str:
    rows = answer_rows(answers, job)
    parts = [_section("Answers per question", "answers-section",
                      "One bar per question over all notes: yes/no answers, numbers given, 'not in note' and error rows.",
                      legend(ANSWER_LABELS, ANSWER_COLOURS) + stacked_bars("answers", rows, ANSWER_COLOURS, ANSWER_LABELS,
                                                                           "notes", "answer-bar"))]
    panels = []
    for qid, values, weights, unit, dropped in numeric_values(answers, job):
        extra = f"; {dropped} in a unit the question does not accept" if dropped else ""
        caption = f"{int(weights.sum())} numbers{extra}"
        panels.append(f'<div class="panel"><h3>{_e(qid)}</h3><p class="note">{_e(caption)}</p>'
                      f'{histogram(f"histogram-{_slug(qid)}", values, unit, qid, weights)}</div>')
    if panels:
        parts.append(_section("Numbers answered", "numbers-section",
                              "Histogram of each numeric question's answers, converted to the question's canonical unit "
                              "(cap applied), one count per note.", f'<div class="small-multiples">{"".join(panels)}</div>'))
    return "".join(parts)


def grounding_section(report: dict | None, answers) -> str:
    from engine.store.answers import answer_totals

    counts = dict((report or {}).get("grounding") or {})
    if report is None and answers is not None and "grounding" in answers.schema.names:  # a report already counted them
        counts = answer_totals(answers)["grounding"]
    if not counts:
        return ""
    rows = [{"id": k, "label": GROUNDING_LABELS.get(k, k), "segments": {k: int(counts.get(k, 0))}, "note": str(counts.get(k, 0))}
            for k in GROUNDING_COLOURS]
    return _section("Evidence grounding", "grounding-section",
                    "Where each answer's evidence quote was found in its note (answers without a quote are not counted).",
                    stacked_bars("grounding", rows, GROUNDING_COLOURS, GROUNDING_LABELS, "answers", "grounding-bar"))


def verification_section(report: dict | None) -> str:
    """Model answers checked against their notes (report.json `verification`): passed, failed by reason, and what
    became of the failures (the cue answer kept in hybrid mode; patients held for review in model mode)."""
    checked = (report or {}).get("verification") or {}
    if not checked.get("model_answers_checked"):
        return ""
    figures = [("model answers checked", checked["model_answers_checked"]), ("passed", checked.get("passed", 0)),
               ("failed", checked.get("failed", 0)), ("failed, cue answer kept", checked.get("cue_answer_kept", 0)),
               ("patients held for review", checked.get("patients_held", 0))]
    cards = "".join(f'<div class="figure"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in figures)
    reasons = checked.get("failed_by_reason") or {}
    table = ""
    if reasons:
        body = "".join(f'<tr><td>{_e(k)}</td><td class="num">{v}</td></tr>' for k, v in reasons.items())
        table = f'<table id="verification-failures"><tr><th>why it failed</th><th class="num">answers</th></tr>{body}</table>'
    return _section("Model answers verified", "verification-section",
                    "Every model answer is checked against its note before it may decide anything: its quote must be "
                    "in the note, hold the value (numbers) and name what the question asks about.",
                    f'<div class="figures">{cards}</div>{table}')


def evaluation_section(evaluation: pa.Table, summary: dict) -> str:
    from engine.reporting.evaluate import DEFINITIONS, METRIC_NAMES, fmt, fmt_interval

    records = evaluation.to_pylist()
    headline = [r for r in records if r["scope"] != "overall" and EVAL_HEADLINE.get(r["kind"]) == r["metric"]]
    plot_rows = [{"id": f"{r['scope']}-{r['id']}", "label": f"{r['id']} ({METRIC_NAMES[r['metric']]})", "value": r["value"],
                  "low": r["ci_low"], "high": r["ci_high"]} for r in headline]
    lines = [summary.get("matching", ""), summary.get("overall", "")]
    if summary.get("generated"):
        lines.append(f"Evaluated {summary['generated']}; {summary.get('draws')} bootstrap draws over notes "
                     f"(patients for criteria), seed {summary.get('seed')}.")
    body = "".join(f'<p class="note">{_e(line)}</p>' for line in lines if line)
    body += interval_plot("eval-plot", plot_rows) if plot_rows else ""
    header = "".join(f'<th class="{c}">{_e(h)}</th>' for h, c in (("question / criterion", ""), ("type", ""), ("n", "num"),
                     ("metric", ""), ("value", "num"), ("95% CI", "num"), ("errors", "num")))
    cells = "".join(
        f'<tr><td>{_e("overall" if r["scope"] == "overall" else r["id"])}</td><td>{_e(r["kind"])}</td><td class="num">{r["n"]}</td>'
        f'<td>{_e(METRIC_NAMES.get(r["metric"], r["metric"]))}</td><td class="num">{fmt(r["value"])}</td>'
        f'<td class="num">{fmt_interval(r["ci_low"], r["ci_high"])}</td><td class="num">{"" if r["errors"] is None else r["errors"]}</td></tr>'
        for r in records)
    body += f'<table id="eval-table"><tr>{header}</tr>{cells}</table>'
    body += "<ul>" + "".join(f'<li class="note"><b>{_e(METRIC_NAMES.get(k, k.replace("_", " ")))}</b>: {_e(v)}</li>'
                             for k, v in DEFINITIONS.items()) + "</ul>"
    return _section("Evaluation against gold labels", "eval-section",
                    "From engine eval (eval.parquet): per question balanced accuracy (yes/no) or accuracy (numeric), and "
                    "criterion agreement after rules; the plot shows each one's headline metric.", body)


# --- the page --------------------------------------------------------------------------------------------------
def render_report(report: dict | None = None, answers=None, patients: pa.Table | None = None,
                  evaluation: tuple[pa.Table, dict] | None = None, job: JobSpec | None = None) -> str:
    """The whole page as one string; every argument may be missing (its sections are left out).

    `answers` is a table or the committed files (a pyarrow dataset); only aggregates of it are read.
    """
    from engine.store.answers import row_count

    funnel = _funnel(report, patients, job)
    name = (report or {}).get("job") or (job.name if job else "engine run")
    subtitle = " · ".join(_e(x) for x in (
        f"model {report.get('model')} ({report.get('backend')})" if report else "",
        f"job fingerprint {report.get('job_fingerprint')}" if report else "",
        f"generated {report.get('generated')}" if report else "") if x)
    sections = [figures_section(report) if report else "", cohort_sections(report, patients, funnel, job)]
    if row_count(answers):
        sections.append(answer_sections(answers, job))
    sections.append(grounding_section(report, answers))
    sections.append(verification_section(report))
    if evaluation is not None:
        sections.append(evaluation_section(*evaluation))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f"<title>engine report: {_e(name)}</title><style>{CSS}</style></head><body><main>"
            f'<h1>engine report: {_e(name)}</h1><p class="note">{subtitle}</p>'
            '<p class="note">Screening of clinical notes with single-order questions and trial rules. Bars show counts; '
            "hover a bar for its exact number. No note text or evidence quote is included in this page.</p>"
            f'{"".join(sections)}<p class="note">Written by engine from report.json, answers/, patients/ and eval.parquet '
            "in this folder.</p></main></body></html>\n")


def _funnel(report: dict | None, patients: pa.Table | None, job: JobSpec | None) -> list[dict]:
    """The funnel of the patient table as it is now (after `engine rules`), else the one report.json recorded."""
    if job is not None and job.criteria and patients is not None and all(c.id in patients.column_names for c in job.criteria):
        from engine.cohort.rules import cohort_funnel

        return cohort_funnel(patients, job)
    return list(((report or {}).get("cohort") or {}).get("funnel") or [])


def write_report_html(store, job: JobSpec | None = None, *, report: dict | None = None, answers=None,
                      patients: pa.Table | None = None, source=None) -> str:
    """Render report.html into `store` (an OutputStore); what is not passed is read from `source` (default: store).

    The evaluation is read from `store`'s eval.parquet when an eval has run there. Returns the file's path.
    """
    from engine.reporting.evaluate import read_evaluation

    source = source or store
    report = report if report is not None else source._read_json("report.json")
    if answers is None:
        from engine.store.answers import answers_dataset

        try:
            answers = answers_dataset(source.uri, source.storage_options)
        except OutputError:
            answers = None
    if patients is None:
        patients = _read_patients(source)
    evaluation = read_evaluation(store.uri, store.storage_options)
    store.write_text(REPORT_HTML, render_report(report, answers, patients, evaluation, job))
    return f"{store.uri.rstrip('/')}/{REPORT_HTML}"


def _read_patients(store) -> pa.Table | None:
    import pyarrow.parquet as pq

    from engine.storage import join

    path = join(store.fs, store.root, "patients", "patients.parquet")
    if not store.fs.exists(path):
        return None
    with store.fs.open(path, "rb") as handle:
        return pq.read_table(handle)


"""engine eval: score answers against gold labels per question (and per criterion), with bootstrap 95% CIs.

Pure scoring over pyarrow tables plus two small readers/writers; no model, no Ray. Every metric is a ratio
of counts, so each question (or criterion) becomes a few per-note (per-patient) count columns; the point
estimate uses their sums and the bootstrap multiplies the same columns by a matrix of resampling counts
(draws x notes), one matrix product for all questions at once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.errors import EngineError, InputError
from engine.job import JobSpec, QuestionSpec
from engine.storage import describe_error, filesystem
from engine.store.layout import output_folder
from engine.cohort.units import to_canonical

DRAWS = 1000
SEED = 0
LEVEL = 0.95
EVAL_MARKDOWN = "eval.md"
EVAL_PARQUET = "eval.parquet"
METADATA_KEY = b"engine.eval"
LABEL_COLUMNS = ("note_id", "question_id", "value_bool", "value_num")
PATIENT_ID_COLUMNS = ("patient_id", "subject_id")
_CELLS_PER_CHUNK = 4_000_000  # draws x units held in memory at once by the bootstrap

DEFINITIONS = {
    "balanced_accuracy": "yes/no: mean of sensitivity (gold yes predicted yes) and specificity (gold no predicted "
    "no); positive class 'yes'. A prediction 'not in note' counts as 'no' when the question says absent: \"no\", "
    "otherwise as a wrong answer of its own; error rows are wrong. Undefined (-) when the gold labels hold one "
    "class only; bootstrap draws that hold one class only are left out of its CI.",
    "f1_yes": "yes/no: F1 of the positive class 'yes' = 2TP / (2TP + FP + FN) over notes (micro: counts pooled "
    "before dividing; the overall line pools all yes/no questions). FN includes gold 'yes' answered 'not in note' "
    "or error. Undefined (-) when neither gold nor prediction has a 'yes'.",
    "accuracy": "numeric: share of notes where the prediction equals the gold value within the question's "
    "tolerance after both are converted to the canonical unit (engine.cohort.units.to_canonical, cap applied), or both "
    "say 'not in note'. Errors and unconvertible units are wrong.",
    "not_in_note_precision": "numeric: of the notes predicted 'not in note', the share whose gold is 'not in note'.",
    "not_in_note_recall": "numeric: of the notes whose gold is 'not in note', the share predicted 'not in note'.",
    "date_accuracy": "date: share of notes where the predicted date is within the question's tolerance (days) of the "
    "gold date, or both say 'not in note' (accuracy, not-in-note precision and recall as for numbers). Gold dates: "
    "the labels' value_date column.",
    "categorical": "categorical: accuracy is the share of notes whose predicted choice equals the gold choice, or both "
    "say 'not in note'; F1 per choice over notes (one-vs-rest; 'not in note' is no choice) and macro-F1, their mean "
    "over the choices that gold or prediction hold. Gold choices: the labels' value_text column.",
    "agreement": "criterion: share of patients whose met / not_met / unknown state after rules equals the gold state.",
    "criterion_balanced_accuracy": "criterion: balanced accuracy of 'met' vs 'not met' (not_met or unknown).",
}

EVAL_SCHEMA = pa.schema([
    pa.field("scope", pa.string()),  # question | criterion | overall
    pa.field("id", pa.string()),
    pa.field("kind", pa.string()),  # yes_no | numeric | criterion
    pa.field("metric", pa.string()),
    pa.field("n", pa.int64()),  # the metric's denominator (notes, patients or the class it is a share of)
    pa.field("value", pa.float64()),  # NaN when undefined
    pa.field("ci_low", pa.float64()),
    pa.field("ci_high", pa.float64()),
    pa.field("errors", pa.int64()),  # error rows among the matched predictions
    pa.field("detail", pa.string()),
])


@dataclass
class Evaluation:
    """The scored table (EVAL_SCHEMA) and what was matched."""

    table: pa.Table
    labels: int
    matched: int
    notes: int
    unmatched: dict[str, int] = field(default_factory=dict)
    patients: int | None = None
    unmatched_patients: int | None = None
    draws: int = DRAWS
    seed: int = SEED
    predictions_folder: str = ""
    generated: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def summary(self) -> dict:
        return {"labels": self.labels, "matched": self.matched, "notes": self.notes, "unmatched": self.unmatched,
                "patients": self.patients, "unmatched_patients": self.unmatched_patients, "draws": self.draws,
                "seed": self.seed, "level": LEVEL, "generated": self.generated,
                "matching": matching_line(self), "overall": overall_line(self)}


@dataclass
class _Item:
    """One question or criterion: per-unit count columns, and the metrics computed from their sums."""

    scope: str
    id: str
    kind: str
    counts: dict[str, np.ndarray]
    errors: int | None = None
    detail: str = ""
    metrics: list | None = None  # (name, denominator key, function) when not the kind's METRICS (categorical)


# --- reading ---------------------------------------------------------------------------------------------------
def read_parquet(uri: str, storage_options: dict | None, required: tuple[str, ...], what: str) -> pa.Table:
    """A Parquet file (local or s3://) with the columns `required`; one-line errors naming what is there."""
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{what} {uri}: {describe_error(exc)}") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise InputError(f"{what} {uri} lacks column(s) {', '.join(missing)}; it has: {', '.join(table.column_names)}")
    return table


# --- matching --------------------------------------------------------------------------------------------------
def match_labels(answers: pa.Table, labels: pa.Table, job: JobSpec) -> tuple[pa.Table, dict[str, int]]:
    """Gold rows joined with their predictions on (note_id, question_id); why the other gold rows went unmatched."""
    labels = _typed(labels, "labels")
    answers = _typed(answers, "predictions")
    _refuse_duplicates(labels, "labels")
    _refuse_duplicates(answers, "predictions")
    asked = pa.array([q.id for q in job.questions])
    in_notes = pc.is_in(labels["note_id"], value_set=pc.unique(answers["note_id"]))
    known = pc.is_in(labels["question_id"], value_set=asked)
    kept = labels.filter(pc.and_(in_notes, known))
    columns = ["note_id", "question_id", "status", "value_bool", "value_num", "unit", "value_date", "value_text"]
    predicted = answers.select([c for c in columns if c in answers.column_names])
    predicted = predicted.rename_columns([c if c in ("note_id", "question_id") else f"pred_{c}" for c in predicted.column_names])
    gold = kept.select([c for c in (*LABEL_COLUMNS, "unit", "value_date", "value_text") if c in kept.column_names])
    matched = gold.join(predicted, ["note_id", "question_id"], join_type="inner")
    matched = matched.sort_by([("question_id", "ascending"), ("note_id", "ascending")])
    unmatched = {
        "note not in predictions": int(pc.sum(pc.invert(in_notes)).as_py() or 0),
        "question not in the job": int(pc.sum(pc.and_(in_notes, pc.invert(known))).as_py() or 0),
        "no prediction for the question": kept.num_rows - matched.num_rows,
    }
    return matched, unmatched


_TYPES = {"note_id": pa.string(), "question_id": pa.string(), "status": pa.string(), "value_bool": pa.bool_(),
          "value_num": pa.float64(), "unit": pa.string(), "value_date": pa.date32(), "value_text": pa.string()}


def _typed(table: pa.Table, what: str) -> pa.Table:
    """The columns eval reads, in their answers/ types (ids written as integers, all-null columns)."""
    for name, kind in _TYPES.items():
        if name in table.column_names and table.schema.field(name).type != kind:
            try:
                column = pc.cast(table[name], kind)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise InputError(f"{what}: column {name} has type {table.schema.field(name).type}; expected {kind}") from None
            table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def _refuse_duplicates(table: pa.Table, what: str) -> None:
    counts = table.group_by(["note_id", "question_id"]).aggregate([([], "count_all")])
    dupes = counts.filter(pc.greater(counts["count_all"], 1))
    if dupes.num_rows:
        first = dupes.slice(0, 1).to_pylist()[0]
        raise EngineError(f"{what}: {dupes.num_rows} (note_id, question_id) pair(s) appear more than once, e.g. "
                          f"({first['note_id']}, {first['question_id']}); keep one row per pair")


# --- per-unit counts -------------------------------------------------------------------------------------------
def yes_no_counts(gold: list[bool | None], status: list[str | None], value: list[bool | None], absent: str) -> dict[str, np.ndarray]:
    """Per note: pos/neg (gold class), tp/tn (correct on that class), pred_pos (predicted yes), error."""
    gold_class = [_yes_no_class("answered" if g is not None else "not_in_note", g, absent) for g in gold]
    pred_class = [_yes_no_class(s, v, absent) for s, v in zip(status, value, strict=True)]
    g, p = np.array(gold_class, dtype=object), np.array(pred_class, dtype=object)
    pos = g == "yes"
    return {"n": np.ones(len(g)), "pos": pos * 1.0, "neg": ~pos * 1.0, "tp": (pos & (p == "yes")) * 1.0,
            "tn": (~pos & (p == g)) * 1.0, "pred_pos": (p == "yes") * 1.0, "error": (p == "error") * 1.0}


def _yes_no_class(status: str | None, value: bool | None, absent: str) -> str:
    if status == "answered" and value is not None:
        return "yes" if value else "no"
    if status == "not_in_note":
        return "no" if absent == "no" else "not_in_note"
    return "error"


def numeric_counts(question: QuestionSpec, gold: list[tuple], predicted: list[tuple]) -> dict[str, np.ndarray]:
    """Per note: correct, gold_nin, pred_nin, both_nin, error. gold: (value, unit); predicted: (status, value, unit)."""
    correct, gold_nin, statuses = [], [], []
    for (g_value, g_unit), (status, p_value, p_unit) in zip(gold, predicted, strict=True):
        g_absent = g_value is None or (isinstance(g_value, float) and math.isnan(g_value))
        g_canonical = None
        if not g_absent:
            g_canonical, problem = to_canonical(g_value, g_unit, question)
            if problem:
                raise EngineError(f"labels: {problem}; fix the label or add the unit to the job's units")
        p_canonical = to_canonical(p_value, p_unit, question)[0] if status == "answered" else None
        correct.append((g_absent and status == "not_in_note") or (g_canonical is not None and p_canonical is not None
                       and abs(p_canonical - g_canonical) <= question.tolerance + 1e-9 * max(1.0, abs(g_canonical))))
        gold_nin.append(g_absent)
        statuses.append(status)
    return _value_counts(correct, gold_nin, statuses)


def _value_counts(correct: list[bool], gold_nin: list[bool], statuses: list[str]) -> dict[str, np.ndarray]:
    """numeric_counts' and date_counts' arrays from per-note correctness, gold "not in note" and predicted status."""
    gold_nin = np.array(gold_nin, dtype=bool)
    pred_nin = np.array([s == "not_in_note" for s in statuses], dtype=bool)
    error = np.array([s not in ("answered", "not_in_note") for s in statuses], dtype=float)
    return {"n": np.ones(len(correct)), "correct": np.array(correct, dtype=float), "gold_nin": gold_nin * 1.0,
            "pred_nin": pred_nin * 1.0, "both_nin": (gold_nin & pred_nin) * 1.0, "error": error}


def date_counts(question: QuestionSpec, gold: list, predicted: list[tuple]) -> dict[str, np.ndarray]:
    """Per note, as numeric_counts: gold a date or None; predicted (status, date)."""
    correct, gold_nin, statuses = [], [], []
    for g, (status, p) in zip(gold, predicted, strict=True):
        correct.append((g is None and status == "not_in_note")
                       or (g is not None and status == "answered" and p is not None
                           and abs((p - g).days) <= question.tolerance))
        gold_nin.append(g is None)
        statuses.append(status)
    return _value_counts(correct, gold_nin, statuses)


def categorical_counts(question: QuestionSpec, gold: list[str | None], predicted: list[tuple]) -> dict[str, np.ndarray]:
    """Per note: correct, error, and per choice c `gold:c`, `pred:c`, `tp:c` (one-vs-rest). A gold label that is
    not one of the question's choices is refused."""
    unknown = sorted({g for g in gold if g is not None and g not in question.choices})
    if unknown:
        raise EngineError(f"labels: {question.id}: {', '.join(map(repr, unknown))} not among the choices "
                          f"({', '.join(question.choices)}); fix the label or the job's choices")
    said = [p if s == "answered" else None for s, p in predicted]
    statuses = [s for s, _ in predicted]
    counts = {"n": np.ones(len(gold)),
              "correct": np.array([(g is None and s == "not_in_note") or (g is not None and g == p)
                                   for g, p, s in zip(gold, said, statuses, strict=True)], dtype=float),
              "error": np.array([s not in ("answered", "not_in_note") for s in statuses], dtype=float)}
    for c in question.choices:
        g = np.array([x == c for x in gold])
        p = np.array([x == c for x in said])
        counts[f"gold:{c}"], counts[f"pred:{c}"], counts[f"tp:{c}"] = g * 1.0, p * 1.0, (g & p) * 1.0
    return counts


def categorical_metrics(question: QuestionSpec) -> list:
    """accuracy, F1 of each choice, macro-F1 over the choices present in gold or prediction."""
    def f1(c):
        return lambda s: ratio(2 * np.asarray(s[f"tp:{c}"]), np.asarray(s[f"gold:{c}"]) + np.asarray(s[f"pred:{c}"]))

    def macro(s):
        per = np.stack([np.asarray(f1(c)(s), dtype=float) for c in question.choices])
        defined = ~np.isnan(per)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(defined.any(axis=0), np.nansum(per, axis=0) / np.maximum(defined.sum(axis=0), 1), np.nan)

    return ([("accuracy", "n", lambda s: ratio(s["correct"], s["n"])), ("macro_f1", "n", macro)]
            + [(f"f1:{c}", f"gold:{c}", f1(c)) for c in question.choices])


def criterion_counts(gold: list[str | None], predicted: list[str | None]) -> dict[str, np.ndarray]:
    """Per patient: agree (same state), and met-vs-not counts for balanced accuracy."""
    g, p = np.array(gold, dtype=object), np.array(predicted, dtype=object)
    pos, pred_pos = g == "met", p == "met"
    return {"n": np.ones(len(g)), "agree": (g == p) * 1.0, "pos": pos * 1.0, "neg": ~pos * 1.0,
            "tp": (pos & pred_pos) * 1.0, "tn": (~pos & ~pred_pos) * 1.0, "pred_pos": pred_pos * 1.0}


# --- metrics over summed counts (scalars or one value per bootstrap draw) --------------------------------------
def ratio(numerator, denominator):
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def balanced_accuracy(s: dict) -> np.ndarray:
    """Mean of sensitivity and specificity; NaN (undefined) when the gold labels hold one class only."""
    return (ratio(s["tp"], s["pos"]) + ratio(s["tn"], s["neg"])) / 2


def f1_yes(s: dict) -> np.ndarray:
    return ratio(2 * np.asarray(s["tp"]), np.asarray(s["pos"]) + np.asarray(s["pred_pos"]))


METRICS = {  # kind -> (metric name, counts key of its denominator, function of summed counts)
    "yes_no": [("balanced_accuracy", "n", balanced_accuracy), ("f1_yes", "n", f1_yes)],
    "numeric": [("accuracy", "n", lambda s: ratio(s["correct"], s["n"])),
                ("not_in_note_precision", "pred_nin", lambda s: ratio(s["both_nin"], s["pred_nin"])),
                ("not_in_note_recall", "gold_nin", lambda s: ratio(s["both_nin"], s["gold_nin"]))],
    "date": [("accuracy", "n", lambda s: ratio(s["correct"], s["n"])),
             ("not_in_note_precision", "pred_nin", lambda s: ratio(s["both_nin"], s["pred_nin"])),
             ("not_in_note_recall", "gold_nin", lambda s: ratio(s["both_nin"], s["gold_nin"]))],
    "criterion": [("agreement", "n", lambda s: ratio(s["agree"], s["n"])),
                  ("balanced_accuracy", "n", balanced_accuracy)],
}


# --- bootstrap -------------------------------------------------------------------------------------------------
def bootstrap_sums(counts: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """(draws, K) sums of the (units, K) count matrix over units resampled with replacement."""
    units = counts.shape[0]
    if units == 0:
        return np.zeros((draws, counts.shape[1]))
    rng = np.random.default_rng(seed)
    chunk = max(1, _CELLS_PER_CHUNK // units)
    parts = []
    for start in range(0, draws, chunk):
        weights = rng.multinomial(units, np.full(units, 1.0 / units), size=min(chunk, draws - start))
        parts.append(weights @ counts)
    return np.concatenate(parts)


def interval(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [(1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100])
    return float(low), float(high)


def _score(items: list[_Item], draws: int, seed: int) -> tuple[list[dict], dict[str, dict[str, dict]]]:
    """Rows of EVAL_SCHEMA for the items (all on the same units), and per metric and item: value, draws, sums."""
    if not items:
        return [], {}
    keys = [(i, k) for i, item in enumerate(items) for k in item.counts]
    matrix = np.column_stack([items[i].counts[k] for i, k in keys])
    point, sampled = matrix.sum(axis=0), bootstrap_sums(matrix, draws, seed)
    rows, scored = [], {}
    for i, item in enumerate(items):
        columns = [j for j, (owner, _) in enumerate(keys) if owner == i]
        total = {keys[j][1]: point[j] for j in columns}
        boot = {keys[j][1]: sampled[:, j] for j in columns}
        for name, denominator, metric in item.metrics or METRICS[item.kind]:
            value, per_draw = float(metric(total)), metric(boot)
            scored.setdefault(name, {})[item.id] = {"value": value, "draws": per_draw, "total": total, "boot": boot}
            low, high = interval(per_draw)
            rows.append({"scope": item.scope, "id": item.id, "kind": item.kind, "metric": name,
                         "n": int(total[denominator]), "value": value, "ci_low": low, "ci_high": high,
                         "errors": item.errors, "detail": item.detail})
    return rows, scored


def _mean_row(kind: str, metric: str, per_item: dict, units: int, what: str) -> list[dict]:
    """Overall row: the mean of a metric over items (undefined items left out), CI from the same draws."""
    if not per_item:
        return []
    points = np.array([v["value"] for v in per_item.values()])
    per_draw = np.stack([v["draws"] for v in per_item.values()])
    defined = ~np.isnan(per_draw)
    with np.errstate(invalid="ignore", divide="ignore"):
        draw_means = np.where(defined.any(axis=0), np.nansum(per_draw, axis=0) / np.maximum(defined.sum(axis=0), 1), np.nan)
    value = float(np.nanmean(points)) if not np.isnan(points).all() else math.nan
    low, high = interval(draw_means)
    return [{"scope": "overall", "id": kind, "kind": kind, "metric": metric, "n": units, "value": value,
             "ci_low": low, "ci_high": high, "errors": None,
             "detail": f"mean over {int((~np.isnan(points)).sum())} of {len(points)} {what}"}]


def _pooled_f1_row(per_item: dict, units: int) -> list[dict]:
    """Overall micro-F1 (yes): TP, FP and FN pooled over all yes/no questions, per draw too."""
    if not per_item:
        return []
    total = {k: sum(v["total"][k] for v in per_item.values()) for k in ("tp", "pos", "pred_pos")}
    boot = {k: sum(v["boot"][k] for v in per_item.values()) for k in ("tp", "pos", "pred_pos")}
    low, high = interval(f1_yes(boot))
    return [{"scope": "overall", "id": "yes_no", "kind": "yes_no", "metric": "micro_f1_yes", "n": units,
             "value": float(f1_yes(total)), "ci_low": low, "ci_high": high, "errors": None,
             "detail": f"TP, FP, FN pooled over {len(per_item)} questions"}]


# --- the evaluation --------------------------------------------------------------------------------------------
def evaluate(job: JobSpec, answers: pa.Table, labels: pa.Table, criteria_labels: pa.Table | None = None,
             draws: int = DRAWS, seed: int = SEED) -> Evaluation:
    """Score predictions (answers/ rows) against gold labels (long format), and criteria if their labels are given."""
    matched, unmatched = match_labels(answers, labels, job)
    notes = pc.unique(matched["note_id"]) if matched.num_rows else pa.array([], pa.string())
    items = question_items(job, matched, notes)
    rows, scored = _score(items, draws, seed)
    yes_no = {k: v for k, v in scored.get("balanced_accuracy", {}).items() if job.question(k).type == "yes_no"}
    overall = _mean_row("yes_no", "mean_balanced_accuracy", yes_no, len(notes), "yes/no questions")
    overall += _pooled_f1_row(scored.get("f1_yes", {}), len(notes))
    for kind, what in (("numeric", "numeric questions"), ("date", "date questions"), ("categorical", "categorical questions")):
        accuracy = {k: v for k, v in scored.get("accuracy", {}).items() if job.question(k).type == kind}
        overall += _mean_row(kind, "mean_accuracy", accuracy, len(notes), what)
    evaluation = Evaluation(table=pa.table({}), labels=labels.num_rows, matched=matched.num_rows, notes=len(notes),
                            unmatched=unmatched, draws=draws, seed=seed)
    if criteria_labels is not None:
        items, evaluation.patients, evaluation.unmatched_patients = criterion_items(job, answers, criteria_labels)
        criterion_rows, scored = _score(items, draws, seed)
        rows += criterion_rows
        overall += _mean_row("criterion", "mean_agreement", scored.get("agreement", {}), evaluation.patients, "criteria")
        overall += _mean_row("criterion", "mean_balanced_accuracy", scored.get("balanced_accuracy", {}),
                             evaluation.patients, "criteria")
    evaluation.table = pa.Table.from_pylist(rows + overall, schema=EVAL_SCHEMA)
    return evaluation


def question_items(job: JobSpec, matched: pa.Table, notes: pa.Array) -> list[_Item]:
    """One item per question that has matched labels, its count columns laid out over `notes`."""
    items = []
    for question in job.questions:
        rows = matched.filter(pc.equal(matched["question_id"], question.id))
        if rows.num_rows == 0:
            continue
        at = pc.index_in(rows["note_id"], value_set=notes).to_numpy()
        column = rows.column
        status = column("pred_status").to_pylist()
        metrics = None
        if question.type == "yes_no":
            counts = yes_no_counts(column("value_bool").to_pylist(), status, column("pred_value_bool").to_pylist(), question.absent)
            detail = f"gold yes {int(counts['pos'].sum())}, no {int(counts['neg'].sum())}"
        elif question.type == "date":
            gold = _column_or_nulls(rows, "value_date")
            counts = date_counts(question, gold, list(zip(status, _column_or_nulls(rows, "pred_value_date"))))
            detail = (f"gold date {int(rows.num_rows - counts['gold_nin'].sum())}, not in note {int(counts['gold_nin'].sum())}; "
                      f"tolerance {question.tolerance:g} days")
        elif question.type == "categorical":
            gold = _column_or_nulls(rows, "value_text")
            counts = categorical_counts(question, gold, list(zip(status, _column_or_nulls(rows, "pred_value_text"))))
            metrics = categorical_metrics(question)
            detail = "gold " + ", ".join(f"{c} {int(counts[f'gold:{c}'].sum())}" for c in question.choices)
        else:
            gold_units = column("unit").to_pylist() if "unit" in rows.column_names else [None] * rows.num_rows
            counts = numeric_counts(question, list(zip(column("value_num").to_pylist(), gold_units)),
                                    list(zip(status, column("pred_value_num").to_pylist(), column("pred_unit").to_pylist())))
            detail = (f"gold value {int(rows.num_rows - counts['gold_nin'].sum())}, not in note {int(counts['gold_nin'].sum())}; "
                      f"tolerance {question.tolerance:g} {question.unit}")
        spread = {}
        for key, values in counts.items():
            spread[key] = np.zeros(len(notes))
            spread[key][at] = values
        items.append(_Item("question", question.id, question.type, spread, int(counts["error"].sum()), detail, metrics))
    return items


def _column_or_nulls(rows: pa.Table, name: str) -> list:
    return rows[name].to_pylist() if name in rows.column_names else [None] * rows.num_rows


def criterion_items(job: JobSpec, answers: pa.Table, criteria_labels: pa.Table) -> tuple[list[_Item], int, int]:
    """Criteria after roll-up and rules on the predictions, against gold states; (items, patients, unmatched)."""
    from engine.cohort.rules import screen

    id_column = next((c for c in PATIENT_ID_COLUMNS if c in criteria_labels.column_names), None)
    if id_column is None:
        raise InputError(f"criteria labels need a patient_id or subject_id column; they have: {', '.join(criteria_labels.column_names)}")
    shared = [c for c in job.criteria if c.id in criteria_labels.column_names]
    if not shared:
        raise InputError(f"criteria labels have no column named after a criterion of the job ({', '.join(c.id for c in job.criteria)})")
    try:
        patients, _ = screen(answers, job)
    except ValueError as exc:  # a predictions table without the columns roll-up needs
        raise InputError(f"predictions: {exc}") from None
    predicted = {pid: i for i, pid in enumerate(patients["patient_id"].to_pylist())}
    gold_ids = [str(v) for v in criteria_labels[id_column].to_pylist()]
    keep = [i for i, pid in enumerate(gold_ids) if pid in predicted]
    at = [predicted[gold_ids[i]] for i in keep]
    items = []
    for criterion in shared:
        gold = [criteria_labels[criterion.id][i].as_py() for i in keep]
        states = patients[criterion.id].take(pa.array(at, pa.int64())).to_pylist()
        counts = criterion_counts(gold, states)
        items.append(_Item("criterion", criterion.id, "criterion", counts, None,
                           f"gold met {int(counts['pos'].sum())}, not met {int(counts['neg'].sum())}"))
    return items, len(keep), len(gold_ids) - len(keep)


# --- output ----------------------------------------------------------------------------------------------------
METRIC_NAMES = {
    "balanced_accuracy": "balanced accuracy", "f1_yes": "F1 (yes)", "accuracy": "accuracy",
    "not_in_note_precision": "not-in-note precision", "not_in_note_recall": "not-in-note recall",
    "agreement": "agreement", "mean_balanced_accuracy": "mean balanced accuracy", "micro_f1_yes": "micro-F1 (yes)",
    "mean_accuracy": "mean accuracy", "mean_agreement": "mean agreement", "macro_f1": "macro-F1",
}


def fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def fmt_interval(low, high) -> str:
    return "-" if any(v is None or math.isnan(v) for v in (low, high)) else f"{low:.3f}-{high:.3f}"


KIND_NAMES = {"yes_no": "yes/no", "numeric": "numeric", "date": "date", "categorical": "categorical", "criterion": "criteria"}


def metric_name(metric: str) -> str:
    return f"F1 ({metric[3:]})" if metric.startswith("f1:") else METRIC_NAMES.get(metric, metric)


def overall_line(evaluation: Evaluation) -> str:
    """One line: each kind's overall metrics with their 95% CIs."""
    groups: dict[str, list[str]] = {}
    for r in evaluation.table.to_pylist():
        if r["scope"] == "overall":
            groups.setdefault(KIND_NAMES[r["kind"]], []).append(
                f"{METRIC_NAMES[r['metric']]} {fmt(r['value'])} [{fmt_interval(r['ci_low'], r['ci_high'])}]")
    return "Overall: " + ("; ".join(f"{kind}: {', '.join(parts)}" for kind, parts in groups.items()) or "nothing matched")


def matching_line(evaluation: Evaluation) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in evaluation.unmatched.items() if v)
    unmatched = evaluation.labels - evaluation.matched
    line = (f"{evaluation.matched} of {evaluation.labels} labels matched on {evaluation.notes} notes; "
            f"{unmatched} unmatched" + (f" ({reasons})" if reasons else ""))
    if evaluation.patients is not None:
        line += f"; criteria on {evaluation.patients} patients ({evaluation.unmatched_patients} labelled patients not in the predictions)"
    return line


def to_markdown(evaluation: Evaluation, job: JobSpec, predictions: str = "", labels: str = "") -> str:
    """eval.md: one table in the study's Table 4 layout (question, n, metric, value, 95% CI), then definitions."""
    lines = [f"# Evaluation: {job.name}", ""]
    if predictions or labels:
        lines += [f"Predictions: `{predictions}`; labels: `{labels}`.", ""]
    lines += [matching_line(evaluation) + ".",
              f"95% CI: percentile bootstrap, {evaluation.draws} draws resampling notes (patients for criteria), seed {evaluation.seed}.",
              "", f"**{overall_line(evaluation)}**", "",
              "| Question / criterion | Type | n | Metric | Value | 95% CI | Errors |", "|---|---|---:|---|---:|---|---:|"]
    for r in evaluation.table.to_pylist():
        lines.append(f"| {r['id'] if r['scope'] != 'overall' else '**overall**'} | {r['kind']} | {r['n']} | "
                     f"{metric_name(r['metric'])} | {fmt(r['value'])} | "
                     f"{fmt_interval(r['ci_low'], r['ci_high'])} | {'' if r['errors'] is None else r['errors']} |")
    lines += ["", "Definitions:", ""] + [f"- **{METRIC_NAMES.get(k, k.replace('_', ' '))}**: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def evaluate_run(job: JobSpec, predictions: str, labels: str, criteria_labels: str | None = None, output: str | None = None,
                 draws: int = DRAWS, seed: int = SEED) -> tuple[Evaluation, pa.Table, str]:
    """`engine eval`: read predictions and labels, score, write eval.md and eval.parquet; (evaluation, answers, folder)."""
    from engine.store.answers import read_answers
    from engine.store.layout import OutputStore

    answers = read_answers(predictions, job.output.storage_options)
    gold = read_parquet(labels, job.input.storage_options, LABEL_COLUMNS, "labels")
    criteria = read_parquet(criteria_labels, job.input.storage_options, (), "criteria labels") if criteria_labels else None
    evaluation = evaluate(job, answers, gold, criteria, draws=draws, seed=seed)
    evaluation.predictions_folder = output_folder(predictions)
    target = output or evaluation.predictions_folder
    write_evaluation(evaluation, OutputStore(target, job.output.storage_options), to_markdown(evaluation, job, predictions, labels))
    return evaluation, answers, target


def write_evaluation(evaluation: Evaluation, store, markdown: str) -> None:
    """eval.parquet (the summary in its metadata) and eval.md into an OutputStore."""
    table = evaluation.table.replace_schema_metadata({METADATA_KEY: json.dumps(evaluation.summary).encode()})
    store.write_table(EVAL_PARQUET, table)
    store.write_text(EVAL_MARKDOWN, markdown)


def read_evaluation(uri: str, storage_options: dict | None = None) -> tuple[pa.Table, dict] | None:
    """eval.parquet under an output folder and its summary, or None when no eval has run there."""
    fs, root = filesystem(uri, storage_options)
    path = f"{root.rstrip('/')}/{EVAL_PARQUET}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    metadata = (table.schema.metadata or {}).get(METADATA_KEY)
    return table, (json.loads(metadata) if metadata else {})

"""Recent-stroke and recent-bleeding criteria before and after time in the screen (run on demand; lexical: no model,
no Ray; seconds per set).

One set of cue answers per labelled set (extraction mode lexical, in process: the note-level answers of the questions
both jobs ask are the same), screened twice: with the job of before (--before, e.g. the job file of the commit
before issue 20: `git show 2c27dd6:jobs/apixaban.yaml > /tmp/before.yaml`) and with the shipped job (windows around
each patient's index date, stroke_date and bleeding_date). Printed per set:
  * note level: balanced accuracy of recent_stroke and recent_serious_bleeding against the gold (unchanged by windows,
    which act after the notes are answered: a check that the cues did not change);
  * patient level: agreement of exc_recent_stroke and exc_bleeding_risk with criterion labels: the set's own
    (--criteria, e.g. data/sample_expected.parquet), and, for every set, two labels derived here in plain Python from the
    note-level gold: "any note" (a documented stroke or bleed in any of the patient's notes: the criterion as the
    job of before read it) and "in window" (only notes at most 30 days / 6 calendar months before the patient's
    latest note, the index date: the trial's "within"). The held-out sets' notes and labels are not opened by hand:
    the figures are computed, not read.

    .venv/bin/python benchmarks/temporal.py --before /tmp/before.yaml
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SETS = [f"{ROOT}/data/sample_notes.parquet:{ROOT}/data/sample_gold.parquet:{ROOT}/data/sample_expected.parquet",
                f"{ROOT}/data/heldout/notes.parquet:{ROOT}/data/heldout/gold.parquet",
                f"{ROOT}/data/heldout_b/notes.parquet:{ROOT}/data/heldout_b/gold.parquet"]
QUESTIONS = ("recent_stroke", "recent_serious_bleeding")
CRITERIA = {"exc_recent_stroke": ("recent_stroke",), "exc_bleeding_risk": ("bleeding_tendency", "recent_serious_bleeding")}
WINDOWS = {"recent_stroke": lambda day: day - dt.timedelta(days=30), "recent_serious_bleeding": lambda day: _months_before(day, 6)}


def _months_before(day: dt.date, months: int) -> dt.date:
    month = day.month - months
    year, month = day.year + (month - 1) // 12, (month - 1) % 12 + 1
    for dom in range(day.day, 27, -1):
        try:
            return dt.date(year, month, dom)
        except ValueError:
            continue
    return dt.date(year, month, 28)


def derived_labels(notes, gold, job) -> dict[str, dict[str, dict[str, str]]]:
    """Per label kind ("any note", "in window"), per patient, the criteria's gold state from the note-level gold."""
    patient_col, note_col = job.input.patient_id, job.input.note_id
    when = {r[note_col]: (str(r[patient_col]), r.get(job.input.charttime)) for r in notes.to_pylist()}
    yes: dict[tuple[str, str], bool] = {}
    for r in gold.to_pylist():
        yes[(r["note_id"], r["question_id"])] = bool(r["value_bool"])
    latest: dict[str, dt.date] = {}
    for pid, time in when.values():
        if time is not None:
            latest[pid] = max(latest.get(pid, time.date()), time.date())
    out = {"any note": {}, "in window": {}}
    for kind in out:
        facts: dict[str, dict[str, bool]] = {}
        for note, (pid, time) in when.items():
            for q in {q for qs in CRITERIA.values() for q in qs}:
                counted = kind == "any note" or q not in WINDOWS or time is None or pid not in latest or \
                    WINDOWS[q](latest[pid]) <= time.date() <= latest[pid]
                facts.setdefault(pid, {}).setdefault(q, False)
                facts[pid][q] |= counted and yes.get((note, q), False)
        out[kind] = {pid: {c: "met" if any(f[q] for q in qs) else "not_met" for c, qs in CRITERIA.items()}
                     for pid, f in facts.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(ROOT / "jobs" / "apixaban.yaml"))
    parser.add_argument("--before", required=True, help="the job file of before (no windows, no date questions)")
    parser.add_argument("--set", action="append", help="NOTES.parquet:GOLD.parquet[:CRITERIA.parquet] (repeatable)")
    args = parser.parse_args()

    from engine.cohort.rules import screen
    from engine.job import load_job
    from engine.reporting.evaluate import evaluate
    from engine.tools.inprocess import lexical_answers

    after_job, before_job = load_job(args.job), load_job(args.before)
    for item in args.set or DEFAULT_SETS:
        parts = item.split(":")
        notes_path, gold_path, criteria_path = parts[0], parts[1], parts[2] if len(parts) > 2 else None
        if not Path(notes_path).exists():
            print(f"skip {notes_path}: not found")
            continue
        scoped = after_job.model_copy(update={"input": after_job.input.model_copy(update={"uri": notes_path, "limit": None})})
        before = before_job.model_copy(update={"input": before_job.input.model_copy(update={"uri": notes_path, "limit": None})})
        answers = lexical_answers(scoped)
        gold = pq.read_table(gold_path)
        notes = pq.read_table(notes_path)
        print(f"\n== {notes_path}: {notes.num_rows} notes")
        rows = {(r["id"], r["metric"]): r for r in evaluate(scoped, answers, gold, draws=200).table.to_pylist()}
        for q in QUESTIONS:
            r = rows.get((q, "balanced_accuracy"))
            if r:
                print(f"  note level {q}: balanced accuracy {r['value']:.3f} [{r['ci_low']:.3f}-{r['ci_high']:.3f}] (n {r['n']}; {r['detail']})")
        screened = {"before": screen(answers.filter(_asked(answers, before)), before)[0], "after": screen(answers, scoped)[0]}
        labels = derived_labels(notes, gold, scoped)
        if criteria_path:
            table = pq.read_table(criteria_path)
            id_col = "subject_id" if "subject_id" in table.column_names else "patient_id"
            labels = {"set's own": {str(r[id_col]): r for r in table.to_pylist()}, **labels}
        for kind, truth in labels.items():
            for criterion in CRITERIA:
                cells = []
                for leg, patients in screened.items():
                    got = dict(zip(patients["patient_id"].to_pylist(), patients[criterion].to_pylist()))
                    shared = [p for p in truth if p in got]
                    agree = sum(got[p] == truth[p][criterion] for p in shared)
                    cells.append(f"{leg} {agree}/{len(shared)} = {agree / max(len(shared), 1):.3f}")
                met = sum(v[criterion] == "met" for v in truth.values())
                print(f"  {criterion} vs {kind} labels ({met} met): " + "; ".join(cells))


def _asked(answers, job):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(answers["question_id"], value_set=pa.array([q.id for q in job.questions]))


if __name__ == "__main__":
    main()

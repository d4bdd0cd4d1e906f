"""Cost of the date cues per note (run on demand; no model, no Ray; about a minute on 2 cores).

Three figures, each the best of --repeats passes over the same notes, in one process:
  1. the candidate stage (cue mentions, medspaCy context, cue answers) for all of the job's questions, against the same
     job without its date questions: what the date questions add per note;
  2. engine.stages.dates.find_dates alone over the text around the date questions' mentions (the date reading itself);
  3. for comparison, dateparser's search_dates over the same text, when dateparser is importable (it is not a
     dependency: `pip install --target /tmp/dp dateparser` and `--dateparser-path /tmp/dp`), with how many phrases each
     found and what dateparser took for a date that the engine's patterns do not.

    .venv/bin/python benchmarks/date_cues.py                          # bundled notes and 2,000 generated ones
    .venv/bin/python benchmarks/date_cues.py --notes my_notes.parquet --dateparser-path /tmp/dp
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(ROOT / "jobs" / "apixaban.yaml"))
    parser.add_argument("--notes", default=str(ROOT / "data" / "sample_notes.parquet"))
    parser.add_argument("--generated", type=int, default=2000, help="also this many generated notes (0: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dateparser-path", default=None, help="a folder holding dateparser (pip install --target)")
    args = parser.parse_args()

    from engine.job import load_job
    from engine.plan import make_plan
    from engine.stages.candidates import DATE_CHARS, assess_note
    from engine.stages.context import near
    from engine.stages.context import contexts
    from engine.stages.cues import find_mentions
    from engine.stages.dates import find_dates
    from engine.tools.synthetic import make_extract

    job = load_job(args.job)
    plain = job.model_copy(update={"questions": [q for q in job.questions if q.type != "date"]})
    with_dates, without = make_plan(job), make_plan(plain)
    dated_questions = [q for q in with_dates.questions if q.spec.type == "date"]
    table = pq.read_table(args.notes, columns=["text", "charttime"])
    notes = list(zip(table["text"].to_pylist(), table["charttime"].to_pylist()))
    if args.generated:
        extract = next(make_extract(args.generated, seed=3, notes_per_file=args.generated))
        notes += list(zip(extract["text"].to_pylist(), extract["charttime"].to_pylist()))
    n = len(notes)
    print(f"{n} notes ({args.notes} and {args.generated} generated), mean {sum(len(t) for t, _ in notes) / n:,.0f} "
          f"characters; date questions: {', '.join(q.id for q in dated_questions)}; best of {args.repeats}")

    def stage(plan):
        return lambda: [assess_note(text, plan.questions, plan, when) for text, when in notes]

    full, base = best(stage(with_dates), args.repeats), best(stage(without), args.repeats)
    print(f"candidate stage, all {len(job.questions)} questions: {full / n * 1e3:.3f} ms/note; without the date "
          f"questions ({len(plain.questions)}): {base / n * 1e3:.3f} ms/note; the date questions add "
          f"{(full - base) / n * 1e3:.3f} ms/note ({(full - base) / base:+.1%})")

    # the text around the date questions' mentions that count, as the cues read it
    spans = []
    rules, sentences = tuple(job.extraction.context_rules), job.extraction.sentences
    for text, when in notes:
        for q in dated_questions:
            found = find_mentions(text, q.spec)
            if not found:
                continue
            context = contexts(text, [(m.start, m.end) for m in found], rules, sentences)
            for m, c in zip(found, context):
                spans.append((text, when, *near(text, m.start, m.end, c, DATE_CHARS)))
    reading = best(lambda: [find_dates(text, when, lo, hi, note=text) for text, when, lo, hi in spans], args.repeats)
    ours = [find_dates(text, when, lo, hi, note=text) for text, when, lo, hi in spans]
    print(f"find_dates over {len(spans)} mention windows ({len(spans) / n:.2f} per note): {reading / n * 1e6:.1f} us/note, "
          f"{reading / max(len(spans), 1) * 1e6:.1f} us/window; {sum(len(f) for f in ours)} phrases found, "
          f"{sum(p.resolved for f in ours for p in f)} resolved")

    if args.dateparser_path:
        sys.path.insert(0, args.dateparser_path)
    try:
        from dateparser.search import search_dates
    except ImportError:
        print("dateparser: not importable; pass --dateparser-path to compare")
        return
    settings = lambda when: {"RELATIVE_BASE": when or dt.datetime(2000, 1, 1), "PREFER_DATES_FROM": "past"}  # noqa: E731
    search_dates("warm up 2 weeks ago", languages=["en"], settings=settings(None))

    def run_dateparser():
        return [search_dates(text[lo:hi], languages=["en"], settings=settings(when)) or [] for text, when, lo, hi in spans]

    theirs_seconds = best(run_dateparser, max(1, args.repeats - 2))
    theirs = run_dateparser()
    found_theirs = sum(len(f) for f in theirs)
    only_theirs = sorted({phrase for f, mine in zip(theirs, ours) for phrase, _ in f
                          if not any(phrase.strip() in p.written or p.written in phrase for p in mine)})
    print(f"dateparser search_dates over the same windows: {theirs_seconds / n * 1e3:.3f} ms/note "
          f"({theirs_seconds / max(reading, 1e-9):.0f}x find_dates); {found_theirs} phrases found; "
          f"phrases only dateparser took for dates ({len(only_theirs)}): {only_theirs[:12]}")


if __name__ == "__main__":
    main()

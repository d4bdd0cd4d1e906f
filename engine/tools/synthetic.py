"""Synthetic MIMIC-IV-Note-like discharge summaries with gold answers, for the apixaban (ARISTOTLE) job.

`make_sample` builds a small deterministic cohort: notes, per-(note, question) gold answers and the
per-patient cohort decision; `make_extract` streams many notes fast (no gold) for benchmarks;
`python -m engine.tools.synthetic --out data` writes the bundled `data/sample_*.parquet` files.

How gold stays right: every note is rendered from a `NotePlan` (which conditions it documents, which
distractor sentences it carries, which lab values it reports). Gold comes from the plan, never from
parsing the text; each distractor names the questions it must NOT make true, and `check_plan` refuses a
plan where a distractor contradicts a documented fact. Text that is neither a positive statement nor a
distractor (exam, medications, filler course) never names a condition of the 15 yes/no questions.

The wording is data: `synthetic_phrases.yaml` next to this file. The questions (ids, types, roll-ups, units and
their factors, caps) are read from the job file (`jobs/apixaban.yaml`, or `--job`), so gold cannot drift from it.
The cohort decision (`expected`) is computed here in plain Python with Kleene logic, independently of the
engine's SQL: its criteria and limits are this module's own on purpose, and only cross-checked by the tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from engine.job import JobSpec, load_job

HERE = Path(__file__).resolve().parent
DEFAULT_JOB = HERE.parents[1] / "jobs" / "apixaban.yaml"
PHRASES_FILE = HERE / "synthetic_phrases.yaml"

# ---------------------------------------------------------------------------------------------------
# The cohort decision's own criteria, (id, kind, unknown:) in job order, and the limits decide() applies.
# Deliberately NOT read from the job: decide() is a second implementation of the trial logic that the engine's
# rules are checked against (tests/e2e/test_rules_on_gold.py, test_expected_agrees_with_the_engine_rules), so
# reading them from the job would check the job against itself. tests/unit/test_synthetic.py cross-checks
# CRITERIA with jobs/apixaban.yaml.
# ---------------------------------------------------------------------------------------------------
AST_ULN = {"F": 32, "M": 40}
BILIRUBIN_ULN = 1.2
CRITERIA = (
    ("inc_af", "inclusion", "needs_review"), ("inc_risk_factor", "inclusion", "needs_review"),
    ("exc_valvular_stenosis", "exclusion", "needs_review"), ("exc_recent_stroke", "exclusion", "needs_review"),
    ("exc_bleeding_risk", "exclusion", "needs_review"), ("exc_creatinine", "exclusion", "not_met"),
    ("exc_hemoglobin", "exclusion", "not_met"), ("exc_platelets", "exclusion", "not_met"),
    ("exc_ast", "exclusion", "not_met"), ("exc_bilirubin", "exclusion", "not_met"),
    ("exc_cannot_consent", "exclusion", "needs_review"),
)

NOTE_SCHEMA = pa.schema([
    ("note_id", pa.string()), ("subject_id", pa.int64()), ("hadm_id", pa.int64()), ("note_type", pa.string()),
    ("charttime", pa.timestamp("us")), ("text", pa.string()), ("sex", pa.string()), ("age", pa.int64()),
])
GOLD_SCHEMA = pa.schema([
    ("note_id", pa.string()), ("question_id", pa.string()), ("value_bool", pa.bool_()),
    ("value_num", pa.float64()), ("unit", pa.string()),
])
EXPECTED_SCHEMA = pa.schema([("subject_id", pa.string())] + [(c[0], pa.string()) for c in CRITERIA]
                            + [("status", pa.string()), ("reasons", pa.string())])

# ---------------------------------------------------------------------------------------------------
# Phrase tables (synthetic_phrases.yaml; what each table means is written there).
# ---------------------------------------------------------------------------------------------------
PHRASES = yaml.safe_load(PHRASES_FILE.read_text(encoding="utf-8"))

POSITIVE = PHRASES["positive"]               # question id -> {long, short, course} wordings
HF_BY_EF = PHRASES["heart_failure_by_ef"]    # reduced | preserved -> {long, short}
MEDS_FOR = PHRASES["meds_for"]
NEUTRAL_MEDS = PHRASES["neutral_meds"]
NEUTRAL_PMH = PHRASES["neutral_pmh"]
# key -> (category, section, questions it must leave false, texts)
DISTRACTORS = {key: (d["category"], d["section"], tuple(d["questions"]), d["texts"])
               for key, d in PHRASES["distractors"].items()}
# A distractor that only makes sense when the note documents another fact.
DISTRACTOR_NEEDS = {key: d["needs"] for key, d in PHRASES["distractors"].items() if "needs" in d}
RANDOM_DISTRACTORS = tuple(PHRASES["random_distractors"])
LAB_NAMES = {qid: spec["names"] for qid, spec in PHRASES["labs"].items()}
COMPLAINTS = PHRASES["complaints"]           # key -> {chief, hpi, diagnosis, course, fact?}
NEUTRAL_COMPLAINTS = tuple(PHRASES["neutral_complaints"])
COMPLAINT_FACT = {key: c["fact"] for key, c in COMPLAINTS.items() if "fact" in c}
NEUTRAL_COURSE = PHRASES["neutral_course"]
SOCIAL = PHRASES["social"]
FAMILY = PHRASES["family"]
STUDIES = PHRASES["studies"]
PROGRESS = PHRASES["progress"]
HEADERS = PHRASES["headers"]
BLANK_TEXT = PHRASES["blank_text"]
SEX_WORDS = PHRASES["sex_words"]
CONDITION = PHRASES["condition"]

# Which facts are chronic history (PMH, HPI one-liner, secondary diagnoses) rather than this admission's events.
CHRONIC = ("atrial_fibrillation", "heart_failure", "hypertension", "diabetes", "prior_stroke_tia", "depression",
           "schizophrenia", "bipolar_disorder", "bleeding_tendency", "peptic_ulcer", "valvular_stenosis_surgery",
           "cannot_make_decisions")
PSYCH_EXTRAS = ("depression", "bipolar_disorder", "schizophrenia", "peptic_ulcer")
# Benign lab ranges (canonical units) and the panels labs come in.
BENIGN = {"platelets_min": (150, 380), "bilirubin_max": (0.3, 1.1), "ast_max": (14, 36), "creatinine_max": (0.6, 1.3),
          "hemoglobin_min": (10.4, 14.6), "glucose_max": (78, 165)}
PANELS = {"cbc": ("hemoglobin_min", "platelets_min"), "chem": ("creatinine_max", "glucose_max"),
          "lft": ("ast_max", "bilirubin_max")}

# ---------------------------------------------------------------------------------------------------
# The job's questions: set by use_job() from the job file (jobs/apixaban.yaml unless told otherwise).
# ---------------------------------------------------------------------------------------------------
YES_NO: tuple[str, ...] = ()
NUMERIC: tuple[str, ...] = ()
QUESTION_IDS: tuple[str, ...] = ()             # job order: one gold row per note and question, in this order
ROLLUP: dict[str, Callable] = {}               # numeric question -> min or max
UNIT: dict[str, str] = {}                      # numeric question -> its canonical unit
FACTORS: dict[str, dict[str, float]] = {}      # numeric question -> unit key -> factor to the canonical unit
CAPS: dict[str, float] = {}                    # numeric question -> cap (values above it count as it)
LAB_UNITS: dict[str, dict[str, tuple]] = {}    # lab -> unit key -> (multiplier from canonical, decimals, spellings)


def use_job(job: JobSpec | str | Path = DEFAULT_JOB) -> None:
    """Read the questions from a job (or its file): ids and types, roll-ups, canonical units, unit factors and caps.

    Raises ValueError where the generator does not fit the job: a question id the phrase tables or this module
    name that is not a question of the job (of that type), a lab unit the tables spell that the job does not
    accept, a numeric roll-up other than min or max.
    """
    global YES_NO, NUMERIC, QUESTION_IDS, ROLLUP, UNIT, FACTORS, CAPS, LAB_UNITS
    path = job.name if isinstance(job, JobSpec) else job
    job = job if isinstance(job, JobSpec) else load_job(job)
    yes_no = tuple(q.id for q in job.questions if q.type == "yes_no")
    numeric = {q.id: q for q in job.questions if q.type == "numeric"}
    named_yes_no = {*POSITIVE, *MEDS_FOR, *CHRONIC, *PSYCH_EXTRAS, *COMPLAINT_FACT.values(), *DISTRACTOR_NEEDS.values(),
                    *(q for d in DISTRACTORS.values() for q in d[2])}
    named_numeric = {*LAB_NAMES, *BENIGN, *(q for p in PANELS.values() for q in p), "lvef_min", "chads2_max"}
    problems = [f"{q} is not a yes/no question of the job" for q in sorted(named_yes_no - set(yes_no))]
    problems += [f"{q} is not a numeric question of the job" for q in sorted(named_numeric - set(numeric))]
    problems += [f"{q.id}: roll-up {q.effective_rollup!r} (the generator writes min or max series)"
                 for q in numeric.values() if q.effective_rollup not in ("min", "max")]
    lab_units = {}
    for qid, spec in PHRASES["labs"].items():
        if qid not in numeric:
            continue
        q = numeric[qid]
        problems += [f"{qid}: unit {u!r} is not one of the job's units" for u in spec["units"] if u not in q.units]
        if q.unit not in spec["units"]:
            problems.append(f"{qid}: the phrase tables do not spell the canonical unit {q.unit!r}")
        lab_units[qid] = {u: (1 / factor, spec["units"][u]["decimals"], spec["units"][u]["spellings"])
                          for u, factor in q.units.items() if u in spec["units"]}
    if problems:
        raise ValueError(f"{path}: the synthetic-note generator does not fit this job: " + "; ".join(problems))
    # gold is written for the yes/no and numeric questions; date and categorical questions are left unlabelled here
    # (tests/unit/test_temporal.py writes dated notes with their gold dates by hand)
    YES_NO, NUMERIC = yes_no, tuple(numeric)
    QUESTION_IDS = tuple(q.id for q in job.questions if q.type in ("yes_no", "numeric"))
    ROLLUP = {q.id: {"min": min, "max": max}[q.effective_rollup] for q in numeric.values()}
    UNIT = {q.id: q.unit for q in numeric.values()}
    FACTORS = {q.id: dict(q.units) for q in numeric.values()}
    CAPS = {q.id: q.cap for q in numeric.values() if q.cap is not None}
    LAB_UNITS = lab_units


def _require_job() -> None:
    """The generator's questions, read from the shipped job on first use when use_job() was not called."""
    if QUESTION_IDS:
        return
    if not DEFAULT_JOB.exists():
        raise ValueError(f"the synthetic-note generator reads its questions from a job: call use_job(job) first "
                         f"({DEFAULT_JOB} is not here: the package runs outside its checkout)")
    use_job(DEFAULT_JOB)


if DEFAULT_JOB.exists():
    use_job()


# ---------------------------------------------------------------------------------------------------
# Plans: what a note documents (gold comes from these) and who it is about.
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lab:
    """One lab in one note: its unit key (as in the job), the spelling used, and the values as written."""
    qid: str
    unit: str
    values: tuple[str, ...]
    spelling: str = ""


@dataclass
class NotePlan:
    """What one note documents; gold is derived from this, the text is rendered from it."""
    pos: list[str] = field(default_factory=list)
    neg: list[str] = field(default_factory=list)
    labs: dict[str, Lab] = field(default_factory=dict)
    complaint: str = ""
    form: str = "full"          # full | long | short | blank
    lab_style: str = "mimic"    # mimic | table | inline
    odd: bool = False           # odd characters, tabs, CRLF line endings
    pick: dict[str, int] = field(default_factory=dict)  # question id -> index of the long wording to use
    gap: int | None = None      # days after the patient's previous note (None: random)

    def __post_init__(self) -> None:  # own copies: archetypes pass one list to several notes
        self.pos, self.neg, self.labs, self.pick = list(self.pos), list(self.neg), dict(self.labs), dict(self.pick)


@dataclass
class Patient:
    subject_id: int
    sex: str
    age: int
    notes: list[NotePlan]
    intent: tuple[str, str]     # (status, reasons) the archetype means to produce; checked against `expected`


# ---------------------------------------------------------------------------------------------------
# Lab values
# ---------------------------------------------------------------------------------------------------
def _num(text: str) -> float:
    """The number a written value stands for ('98,000' -> 98000; '55-60' and '>55' -> 55)."""
    return float(re.search(r"\d[\d,]*(?:\.\d+)?", text).group(0).replace(",", ""))


def _fmt(qid: str, unit: str, canonical: float) -> str:
    mult, dec, _ = LAB_UNITS[qid][unit]
    value = round(canonical * mult, dec)
    return f"{value:,.0f}" if mult == 1000 else f"{value:.{dec}f}"


def lab(rng: random.Random, qid: str, extreme: float | None = None, unit: str | None = None, n: int = 1) -> Lab:
    """A series of n values whose extreme (min or max, per the question) is `extreme` (canonical unit)."""
    units = list(LAB_UNITS[qid])
    unit = unit or (UNIT[qid] if rng.random() < 0.6 else rng.choice(units))
    lo, hi = BENIGN[qid]
    if extreme is None:
        extreme = rng.uniform(lo, hi) if qid != "platelets_min" else rng.randint(lo, hi)
    worst = _fmt(qid, unit, extreme)
    others = []
    for _ in range(n - 1):
        factor = rng.uniform(1.03, 1.2) if ROLLUP[qid] is min else rng.uniform(0.7, 0.97)
        other = extreme * factor
        others.append(_fmt(qid, unit, round(other) if qid == "platelets_min" else other))
    values = others[:]
    values.insert(rng.randint(0, len(others)), worst)
    return Lab(qid, unit, tuple(values), rng.choice(LAB_UNITS[qid][unit][2]))


def panel(rng: random.Random, n: int, *groups: str, canonical: bool = False, **extremes: float) -> dict[str, Lab]:
    """Labs of the given panels (cbc, chem, lft) with benign values unless `extremes` names one."""
    out = {}
    for g in groups:
        for qid in PANELS[g]:
            unit = UNIT[qid] if canonical else None
            out[qid] = lab(rng, qid, extremes.get(qid), unit, n)
    return out


def fixed(qid: str, unit: str, *values: str, spelling: str | None = None) -> Lab:
    """A lab with exactly these written values (boundary cases, hand-picked units)."""
    return Lab(qid, unit, tuple(values), LAB_UNITS[qid][unit][2][0] if spelling is None else spelling)


def echo(*values: str) -> Lab:
    return Lab("lvef_min", UNIT["lvef_min"], tuple(values))


def chads2(*values: int) -> Lab:
    return Lab("chads2_max", UNIT["chads2_max"], tuple(str(v) for v in values))


def chads2_score(pos: list[str], age: int) -> int:
    return sum(q in pos for q in ("heart_failure", "hypertension", "diabetes")) + (age >= 75) \
        + 2 * ("prior_stroke_tia" in pos)


# ---------------------------------------------------------------------------------------------------
# Gold and the cohort decision
# ---------------------------------------------------------------------------------------------------
def note_gold(plan: NotePlan) -> dict[str, tuple]:
    """question id -> (value_bool, value_num, unit) for one note."""
    gold = {q: (q in plan.pos, None, None) for q in YES_NO}
    for q in NUMERIC:
        item = plan.labs.get(q)
        if item is None or not item.values:
            gold[q] = (None, None, None)
            continue
        value = ROLLUP[q](_num(v) for v in item.values)
        if q in CAPS:
            value = min(value, CAPS[q])
        gold[q] = (None, value, item.unit)
    return gold


def _any(*values):
    """Kleene OR over True/False/None."""
    return True if any(v is True for v in values) else (None if any(v is None for v in values) else False)


def _cmp(value, test):
    return None if value is None else bool(test(value))


# The time windows of the time-bound exclusions, in days before the patient's index date (the latest note's day).
# Written here on purpose rather than read from the job (see CRITERIA): 30 days, and 6 calendar months.
WINDOW_DAYS = {"recent_stroke": lambda index: index - dt.timedelta(days=30),
               "recent_serious_bleeding": lambda index: _months_before(index, 6)}


def _months_before(day: dt.date, months: int) -> dt.date:
    month = day.month - months
    year = day.year + (month - 1) // 12
    month = (month - 1) % 12 + 1
    for dom in range(day.day, 27, -1):  # 31 August - 6 months: the last day of February
        try:
            return dt.date(year, month, dom)
        except ValueError:
            continue
    return dt.date(year, month, min(day.day, 28))


def decide(sex: str, age: int, golds: list[dict[str, tuple]], dates: list[dt.date] | None = None) -> dict[str, str]:
    """The patient's criterion states, status and reasons from per-note gold (roll-up: any / min / max). With the
    notes' `dates`, the time-bound questions (WINDOW_DAYS) count only the notes of their window before the latest."""
    facts = {q: any(g[q][0] for g in golds) for q in YES_NO}
    if dates:
        index = max(dates)
        for q, start in WINDOW_DAYS.items():
            facts[q] = any(g[q][0] for g, day in zip(golds, dates) if start(index) <= day <= index)
    for q in NUMERIC:
        known = [g[q][1] * FACTORS[q][g[q][2]] for g in golds if g[q][1] is not None]
        value = ROLLUP[q](known) if known else None
        facts[q] = min(value, CAPS[q]) if value is not None and q in CAPS else value
    f = facts
    raw = {
        "inc_af": f["atrial_fibrillation"],
        "inc_risk_factor": _any(age >= 75, f["prior_stroke_tia"], f["heart_failure"], _cmp(f["lvef_min"], lambda v: v <= 40),
                                f["diabetes"], f["hypertension"]),
        "exc_valvular_stenosis": f["valvular_stenosis_surgery"],
        "exc_recent_stroke": f["recent_stroke"],
        "exc_bleeding_risk": _any(f["bleeding_tendency"], f["recent_serious_bleeding"]),
        "exc_creatinine": _cmp(f["creatinine_max"], lambda v: v > 2.5),
        "exc_hemoglobin": _cmp(f["hemoglobin_min"], lambda v: v < 9),
        "exc_platelets": _cmp(f["platelets_min"], lambda v: v <= 100),
        "exc_ast": _cmp(f["ast_max"], lambda v: v > 2 * AST_ULN[sex]),
        "exc_bilirubin": _cmp(f["bilirubin_max"], lambda v: v >= 1.5 * BILIRUBIN_ULN),
        "exc_cannot_consent": f["cannot_make_decisions"],
    }
    states = {c: {True: "met", False: "not_met", None: "unknown"}[raw[c]] for c, _, _ in CRITERIA}
    excluding, review = [], []
    for cid, kind, unknown in CRITERIA:
        decided = unknown if states[cid] == "unknown" else states[cid]
        if decided == ("met" if kind == "exclusion" else "not_met"):
            excluding.append(cid)
        if states[cid] == "unknown" and unknown == "needs_review":
            review.append(cid)
    status = "excluded" if excluding else ("needs_review" if review else "eligible")
    reasons = excluding if excluding else review
    return {**states, "status": status, "reasons": ",".join(reasons)}




# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    """What rendering one note needs besides the plan."""
    rng: random.Random
    sex: str
    age: int
    phrases: dict[str, dict[str, str]] = field(default_factory=dict)
    neutral_pmh: list[str] = field(default_factory=list)  # the note's unrelated history (HPI names the first two)


def _for_sex(items: list[str], sex: str) -> list[str]:
    """Drop prostate-related items from a woman's note."""
    return items if sex == "M" else [i for i in items if not re.search(r"BPH|Tamsulosin|Finasteride", i)]


def _context(plan: NotePlan, sex: str, age: int, rng: random.Random) -> _Ctx:
    ctx = _Ctx(rng, sex, age)
    ctx.phrases = _phrases(plan, rng)
    ctx.neutral_pmh = rng.sample(_for_sex(NEUTRAL_PMH, sex), rng.randint(2, 4))
    return ctx


def _phrases(plan: NotePlan, rng: random.Random) -> dict[str, dict[str, str]]:
    """Pick one long/short/course wording per documented fact (HF wording follows the LVEF)."""
    out = {}
    ef = plan.labs.get("lvef_min")
    ef_kind = None if ef is None else ("reduced" if min(_num(v) for v in ef.values) <= 40 else
                                      "preserved" if min(_num(v) for v in ef.values) >= 55 else None)
    for q in plan.pos:
        spec = HF_BY_EF[ef_kind] if q == "heart_failure" and ef_kind else POSITIVE[q]
        longs, shorts = spec["long"], spec["short"]
        i = _pick(plan, q, len(longs), rng)
        out[q] = {"long": longs[i], "short": rng.choice(shorts), "course": rng.choice(POSITIVE[q].get("course", [""]))}
    return out


def _pick(plan: NotePlan, q: str, n: int, rng: random.Random) -> int:
    forced = plan.pick.get(q)
    return forced % n if forced is not None else rng.randrange(n)


def _distractor(plan: NotePlan, section: str, rng: random.Random) -> list[str]:
    return [rng.choice(DISTRACTORS[k][3]) for k in plan.neg if DISTRACTORS[k][1] == section]


def _unit_suffix(spelling: str, sep: str = " ") -> str:
    if not spelling:
        return ""
    return spelling if spelling[0] in "/%" else sep + spelling


def _inline(item: Lab, rng: random.Random, sep: str = " ") -> str:
    """'Cr 1.4', 'Hb 95 g/L', 'PLT 120,000 -> 98,000/mm3', 'SCr 1.2 mg/dL on admission, 1.9 mg/dL at discharge'."""
    name = rng.choice(LAB_NAMES[item.qid])
    if item.qid == "glucose_max" and item.unit == "mg/dL" and rng.random() < 0.3:
        name = "FSBG"
    u = _unit_suffix(item.spelling)
    vs = item.values
    if len(vs) == 1:
        return f"{name}{sep}{vs[0]}{u}"
    if len(vs) == 2 and rng.random() < 0.5:
        return f"{name} {vs[0]}{u} on admission, {vs[1]}{u} at discharge"
    return rng.choice([f"{name} trended {' -> '.join(vs)}{u}", f"{name}: {', '.join(vs)}{u} (serial)"])


def _flag(qid: str, text: str) -> str:
    v = _num(text)
    low = {"hemoglobin_min": 12, "platelets_min": 150}
    high = {"creatinine_max": 1.1, "glucose_max": 100, "ast_max": 40, "bilirubin_max": 1.5}
    return "*" if v < low.get(qid, -1) or v > high.get(qid, 1e9) else ""


def _mimic_lines(labs: dict[str, Lab], rng: random.Random) -> list[str]:
    """MIMIC-style lab lines ('___ 08:15AM BLOOD WBC-7.2 ... Hgb-10.1* Hct-31 Plt Ct-145'), one block per day."""
    n = max((len(v.values) for v in labs.values()), default=0)
    titles = {1: ["ADMISSION LABS:"], 2: ["ADMISSION LABS:", "DISCHARGE LABS:"],
              3: ["ADMISSION LABS:", "PERTINENT LABS:", "DISCHARGE LABS:"]}[n] if n else []
    out = []
    for i, title in enumerate(titles):
        time = f"{rng.randint(1, 11):02d}:{rng.randint(0, 59):02d}{rng.choice(['AM', 'PM'])}"
        got = {q: l.values[i] for q, l in labs.items() if i < len(l.values)}
        out.append(title)
        if "hemoglobin_min" in got or "platelets_min" in got:
            cbc = [f"WBC-{rng.uniform(4, 13):.1f}", f"RBC-{rng.uniform(3, 5):.2f}"]
            if "hemoglobin_min" in got:
                h = got["hemoglobin_min"]
                cbc += [f"Hgb-{h}{_flag('hemoglobin_min', h)}", f"Hct-{_num(h) * 3:.1f}"]
            cbc += [f"MCV-{rng.randint(82, 99)}", f"RDW-{rng.uniform(12, 16):.1f}"]
            if "platelets_min" in got:
                p = got["platelets_min"]
                cbc.append(f"Plt Ct-{p}{_flag('platelets_min', p)}")
            out.append(f"___ {time} BLOOD " + " ".join(cbc))
        if "creatinine_max" in got or "glucose_max" in got:
            chem = [f"Glucose-{got['glucose_max']}{_flag('glucose_max', got['glucose_max'])}"] if "glucose_max" in got else []
            chem.append(f"UreaN-{rng.randint(8, 40)}")
            if "creatinine_max" in got:
                chem.append(f"Creat-{got['creatinine_max']}{_flag('creatinine_max', got['creatinine_max'])}")
            chem += [f"Na-{rng.randint(133, 144)}", f"K-{rng.uniform(3.5, 5.1):.1f}", f"Cl-{rng.randint(96, 108)}",
                     f"HCO3-{rng.randint(20, 29)}"]
            out.append(f"___ {time} BLOOD " + " ".join(chem))
        if "ast_max" in got or "bilirubin_max" in got:
            lft = [f"ALT-{rng.randint(10, 45)}"]
            if "ast_max" in got:
                lft.append(f"AST-{got['ast_max']}{_flag('ast_max', got['ast_max'])}")
            lft.append(f"AlkPhos-{rng.randint(40, 130)}")
            if "bilirubin_max" in got:
                b = got["bilirubin_max"]
                lft += [f"TotBili-{b}{_flag('bilirubin_max', b)}", f"DirBili-{max(0.1, _num(b) * 0.3):.1f}"]
            out.append(f"___ {time} BLOOD " + " ".join(lft))
    return out


def _table(labs: dict[str, Lab], rng: random.Random, tabs: bool = False) -> list[str]:
    """A small lab table over several days, pipe- or whitespace-separated."""
    days = rng.choice(PHRASES["lab_table_days"])
    rows = []
    for q, item in labs.items():
        name = rng.choice(LAB_NAMES[q][:2])
        label = f"{name} ({item.spelling})" if item.spelling else name
        rows.append([label] + list(item.values) + [""] * (3 - len(item.values)))
    if tabs:
        return ["\t".join(["Lab"] + days)] + ["\t".join(r) for r in rows]
    if rng.random() < 0.5:
        return ["| Lab | " + " | ".join(days) + " |", "|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    return [f"{'Lab':<16}" + "".join(f"{d:<9}" for d in days)] + [f"{r[0]:<16}" + "".join(f"{c:<9}" for c in r[1:]) for r in rows]


def _echo_text(item: Lab, rng: random.Random) -> str:
    vs = item.values
    desc = ("moderate global hypokinesis" if _num(vs[-1]) <= 40 else
            "normal biventricular systolic function" if _num(vs[-1]) >= 55 else "mild global hypokinesis")
    if len(vs) == 1:
        return rng.choice([f"TTE (___): LVEF {vs[0]}%, {desc}.", f"Echo ___: EF {vs[0]}%; {desc}."])
    return f"Prior TTE (___) with LVEF {vs[0]}%; repeat TTE this admission: EF {vs[-1]}%, {desc}."


def _chads2_text(item: Lab) -> str:
    vs = item.values
    if len(vs) == 1:
        return f"CHADS2 score {vs[0]}."
    return f"CHADS2 score {vs[0]} at last clinic visit, now {vs[-1]}."


def _vasc(pos: list[str], sex: str, age: int) -> int:
    return (sum(q in pos for q in ("heart_failure", "hypertension", "diabetes")) + 2 * (age >= 75) + (65 <= age < 75)
            + 2 * ("prior_stroke_tia" in pos) + (sex == "F"))


def _results(plan: NotePlan, ctx: _Ctx) -> tuple[str, list[str]]:
    """The results section and the inline lab phrases that go to the hospital course instead."""
    rng = ctx.rng
    labs = {q: l for q, l in plan.labs.items() if q not in ("lvef_min", "chads2_max")}
    lines, inline = [], []
    if plan.lab_style == "table" and labs:
        lines = _table(labs, rng, tabs=plan.odd)
    elif plan.lab_style == "mimic":
        canonical = {q: l for q, l in labs.items() if l.unit == UNIT[q]}
        lines = _mimic_lines(canonical, rng)
        inline = [_inline(l, rng) for q, l in labs.items() if q not in canonical]
    else:
        inline = [_inline(l, rng, "\u00a0" if plan.odd else " ") for l in labs.values()]
    if "lvef_min" in plan.labs:
        lines.append(_echo_text(plan.labs["lvef_min"], rng))
    if plan.form == "long":
        lines += ["", "IMAGING AND MICROBIOLOGY:"] + STUDIES
    lines += _distractor(plan, "results", rng)
    if "col_vasc" in plan.neg:
        lines.append(DISTRACTORS["col_vasc"][3][0].format(score=_vasc(plan.pos, ctx.sex, ctx.age)))
    if not lines:
        lines = ["Notable labs as per hospital course." if inline else "None on file."]
    return "\n".join(lines), inline


def _hpi(plan: NotePlan, ctx: _Ctx) -> str:
    rng = ctx.rng
    who = rng.choice([f"{ctx.age} y/o", "___ y/o", f"{ctx.age} year old", "___ year old"])
    facts = [ctx.phrases[q]["short"] for q in plan.pos if q in CHRONIC or q == "af_ablation"]
    facts += ctx.neutral_pmh[:2]
    rng.shuffle(facts)
    hx = ", ".join(facts[:-1]) + " and " + facts[-1]
    complaint = COMPLAINTS[plan.complaint]["hpi"]
    text = f"{rng.choice(PHRASES['hpi_subject'])} is a {who} {rng.choice(SEX_WORDS[ctx.sex])} " \
           f"with h/o {hx} who presents with {complaint}."
    extra = []
    if "recent_serious_bleeding" in plan.pos and plan.complaint != "gib":
        extra.append(f"Of note: {ctx.phrases['recent_serious_bleeding']['long']}.")
    extra += _distractor(plan, "hpi", rng)
    extra.append(rng.choice(PHRASES["ed_course"]))
    return " ".join([text] + extra)


def _pmh(plan: NotePlan, ctx: _Ctx) -> str:
    rng = ctx.rng
    items = [ctx.phrases[q]["long"] for q in plan.pos if q in CHRONIC or q == "af_ablation"]
    items += ctx.neutral_pmh
    rng.shuffle(items)
    style = rng.randrange(4)
    body = (", ".join(items) if style == 0 else
            "\n".join(f"{i + 1}. {t}" for i, t in enumerate(items)) if style == 1 else
            "\n".join(f"- {t}" for t in items) if style == 2 else "\n".join(f"# {t}" for t in items))
    return "\n".join([body] + _distractor(plan, "pmh", rng))


def _exam(plan: NotePlan, ctx: _Ctx) -> str:
    rng = ctx.rng
    rhythm = "irregularly irregular, no m/r/g" if "atrial_fibrillation" in plan.pos else "RRR, no m/r/g"
    if "valvular_stenosis_surgery" in plan.pos:
        rhythm = rhythm.replace("no m/r/g", "low-pitched diastolic rumble at the apex")
    neuro = ("oriented to self only, follows simple commands" if "cannot_make_decisions" in plan.pos
             else "alert, expressive aphasia, R arm drift, strength 4-/5 RUE" if plan.complaint == "stroke"
             else "A&Ox3, CN II-XII intact, moving all extremities")
    weight = f"{rng.randint(55, 105)} kg" + (" (±1 kg from dry weight)" if plan.odd else "")
    return (f"VS: T {rng.uniform(97.5, 99.8):.1f} BP {rng.randint(100, 160)}/{rng.randint(55, 95)} HR {rng.randint(58, 110)} "
            f"RR {rng.randint(12, 22)} O2 {rng.randint(92, 100)}% RA  Wt {weight}\n"
            "GENERAL: NAD, comfortable\nHEENT: MMM, EOMI, sclera anicteric\nNECK: no JVD\n"
            f"CV: {rhythm}\nLUNGS: CTAB, no wheezes\nABD: soft, NT/ND, +BS\nEXT: warm, no edema\nNEURO: {neuro}")


def _course(plan: NotePlan, ctx: _Ctx, inline: list[str]) -> str:
    rng = ctx.rng
    who = rng.choice(PHRASES["course_subject"])
    dx = COMPLAINTS[plan.complaint]["diagnosis"]
    paras = [f"{who} is a ___ y/o with the above history admitted with {dx[0].lower() + dx[1:]}.",
             COMPLAINTS[plan.complaint]["course"]]
    for q in plan.pos:
        para = ctx.phrases[q]["course"] if q != COMPLAINT_FACT.get(plan.complaint) else ""
        if q == "atrial_fibrillation":
            para = para or "#AF: rate controlled."
            if "af_ablation" in plan.pos:
                para += f" {ctx.phrases['af_ablation']['long']}."
            if "chads2_max" in plan.labs:
                para += " " + _chads2_text(plan.labs["chads2_max"])
        if para:
            paras.append(para)
    paras += _distractor(plan, "course", rng)
    if inline:
        paras.append(rng.choice(PHRASES["lab_intro"]) + "; ".join(inline) + ".")
    neutral = _for_sex(NEUTRAL_COURSE, ctx.sex)
    paras += neutral if plan.form == "long" else rng.sample(neutral, rng.randint(0, 2))
    return "\n\n".join(paras)


def _meds(plan: NotePlan, ctx: _Ctx, discharge: bool) -> str:
    rng = ctx.rng
    meds = [m for q in plan.pos for m in MEDS_FOR.get(q, [])]
    neutral = _for_sex(NEUTRAL_MEDS, ctx.sex)
    meds += neutral if plan.form == "long" else rng.sample(neutral, rng.randint(3, 7))
    lines = []
    for i, m in enumerate(meds):
        lines.append(f"{i + 1}. {m}")
        if discharge and plan.form == "long":
            lines.append(f"   RX *{m.lower()}  Disp #*{rng.choice([30, 60, 90])} Refills:*{rng.randint(0, 3)}")
    head = "" if discharge else "The Preadmission Medication list is accurate and complete.\n"
    return head + "\n".join(lines)


def _dx(plan: NotePlan, ctx: _Ctx) -> str:
    rng = ctx.rng
    secondary = [ctx.phrases[q]["long"] for q in plan.pos if q in CHRONIC and q != COMPLAINT_FACT.get(plan.complaint)]
    if "recent_stroke" in plan.pos and plan.complaint != "stroke":
        secondary.append(ctx.phrases["recent_stroke"]["long"])
    rng.shuffle(secondary)
    primary = COMPLAINTS[plan.complaint]["diagnosis"]
    if plan.complaint == "stroke":
        primary = ctx.phrases["recent_stroke"]["long"]
    return f"PRIMARY:\n{primary}\n\nSECONDARY:\n" + ("\n".join(secondary) if secondary else "none")


def _condition(plan: NotePlan) -> str:
    return CONDITION["confused" if "cannot_make_decisions" in plan.pos else "clear"]


def _instructions(plan: NotePlan, ctx: _Ctx) -> str:
    reason = COMPLAINTS[plan.complaint]["diagnosis"].lower()
    parts = [f"Dear {'Mr.' if ctx.sex == 'M' else 'Ms.'} ___,", "It was a pleasure taking care of you at ___.",
             f"WHY WERE YOU ADMITTED?\n- You were admitted for {reason}.",
             "WHAT SHOULD YOU DO WHEN YOU GO HOME?\n- Take your medicines as prescribed.\n- Keep your follow-up appointments."]
    if plan.odd:
        parts.append("- Call your doctor for a temperature ≥ 101.5 F or a weight gain ≥ 3 lbs in a day.")
    if plan.form == "long":
        parts += ["WHAT HAPPENED IN THE HOSPITAL?\n- You were treated with medicines through the IV and then by mouth.\n"
                  "- Physical therapy worked with you every day to help you get stronger.\n- Your medicines were reviewed "
                  "by the pharmacist and your care team; please see the list below for any changes.",
                  "Please bring this paperwork and all of your pill bottles to your next appointment. If you have "
                  "questions about your medicines, call the number on the bottle or your primary care office."]
    parts.append("We wish you the best!\nYour ___ Care Team")
    return "\n\n".join(parts)


def _header(ctx: _Ctx, plan: NotePlan) -> str:
    sex = f"Sex:\u00a0\u00a0 {ctx.sex}" if plan.odd else f"Sex:   {ctx.sex}"
    service = ctx.rng.choice(PHRASES["services"])
    allergies = ctx.rng.choice(PHRASES["allergies"])
    return (f"Name:  ___                     Unit No:   ___\n \nAdmission Date:  ___              Discharge Date:   ___\n \n"
            f"Date of Birth:  ___             {sex}\n \nService: {service}\n \nAllergies: \n{allergies}\n \nAttending: ___.")


def _sections(plan: NotePlan, ctx: _Ctx) -> list[tuple[str, str]]:
    """(section key, body) in note order; the header block has key ''."""
    rng = ctx.rng
    results, inline = _results(plan, ctx)
    social = rng.choice(SOCIAL) + (" Enjoys gardening \U0001F33B and walks daily." if plan.odd else "")
    family = "\n".join([rng.choice(FAMILY)] + _distractor(plan, "family", rng))
    exam = _exam(plan, ctx)
    if plan.form == "long":
        exam += "\n \nDISCHARGE EXAM:\n" + _exam(plan, ctx)
    return [("", _header(ctx, plan)), ("cc", COMPLAINTS[plan.complaint]["chief"]),
            ("proc", "Left hip hemiarthroplasty" if plan.complaint == "hip" else "None"),
            ("hpi", _hpi(plan, ctx)), ("pmh", _pmh(plan, ctx)), ("social", social), ("family", family),
            ("exam", exam), ("results", results), ("course", _course(plan, ctx, inline)),
            ("meds_adm", _meds(plan, ctx, False)), ("meds_dc", _meds(plan, ctx, True)),
            ("dispo", rng.choice(PHRASES["dispositions"])), ("dx", _dx(plan, ctx)),
            ("condition", _condition(plan)), ("instructions", _instructions(plan, ctx)), ("followup", "___")]


def _join(sections: list[tuple[str, str]], rng: random.Random) -> str:
    return "\n \n".join(body if not key else f"{rng.choice(HEADERS[key])}\n{body}" for key, body in sections)


def _short(plan: NotePlan, ctx: _Ctx) -> str:
    """One or two lines: a clinic-style or transfer stub."""
    rng = ctx.rng
    facts = [ctx.phrases[q]["short"] for q in plan.pos]
    labs = [_inline(l, rng) for q, l in plan.labs.items() if q not in ("lvef_min", "chads2_max")]
    if not facts and not labs:
        return rng.choice(PHRASES["short_stubs"])
    first = f"{ctx.age}{ctx.sex} w/ {', '.join(facts)}." if facts else f"{ctx.age}{ctx.sex}, seen for follow-up."
    second = (("Labs: " + ", ".join(labs) + ". ") if labs else "") + rng.choice(PHRASES["short_endings"])
    return " ".join([first] + _distractor(plan, "course", rng) + _distractor(plan, "hpi", rng)) + "\n" + second


def render(plan: NotePlan, sex: str, age: int, rng: random.Random) -> str:
    """The note text for a plan (deterministic given rng's state)."""
    if plan.form == "blank":
        return BLANK_TEXT
    ctx = _context(plan, sex, age, rng)
    if plan.form == "short":
        return _short(plan, ctx)
    text = _join(_sections(plan, ctx), rng)
    if plan.form == "long":
        days = []
        while len(text) + sum(len(d) + 1 for d in days) < 12_500:
            days.append(f"HD{len(days) + 1}: {rng.choice(PROGRESS)}")
        text += "\n \nDaily progress:\n" + "\n".join(days)
    return text.replace("\n", "\r\n") if plan.odd else text


# ---------------------------------------------------------------------------------------------------
# Patient archetypes: each fixes the facts that decide the cohort status; wording and values vary by rng.
# An archetype takes (rng, k) where k is the how-many-th patient of that archetype, and returns
# (sex, age, notes, (intended status, intended reasons)).
# ---------------------------------------------------------------------------------------------------
def _sex(rng: random.Random) -> str:
    return rng.choice("FM")


def _old(rng: random.Random) -> int:
    return rng.randint(75, 89)


def _young(rng: random.Random) -> int:
    return rng.randint(48, 72)


def _any_age(rng: random.Random) -> int:
    return rng.randint(58, 89)


def _neutral(rng: random.Random) -> str:
    return rng.choice(NEUTRAL_COMPLAINTS)


def _dm_glucose(rng: random.Random) -> float:
    return rng.uniform(190, 320)


def a_classic(rng, k):
    """Eligible: AF with hypertension and diabetes; CHADS2 and CHA2DS2-VASc stated, HbA1c reported."""
    sex, age = _sex(rng), _any_age(rng)
    pos = ["atrial_fibrillation", "hypertension", "diabetes"]
    labs = panel(rng, 2, "cbc", "chem", "lft", canonical=k % 2 == 0, glucose_max=_dm_glucose(rng))
    score = chads2_score(pos, age)
    labs["chads2_max"] = chads2(score) if k % 2 == 0 else chads2(score - 1, score)
    note = NotePlan(pos, ["col_a1c", "col_vasc"], labs, _neutral(rng), lab_style=["mimic", "table"][k % 2])
    return sex, age, [note], ("eligible", "")


def a_elderly_lone_af(rng, k):
    """Eligible on age alone: AF, explicit negations of the other risk factors, normal LVEF."""
    sex, age = _sex(rng), _old(rng)
    labs = panel(rng, 1, "cbc", "chem")
    labs["lvef_min"] = echo(rng.choice([">55", "55-60", "60-65", "60"]))
    note = NotePlan(["atrial_fibrillation"], ["neg_htn_dm", "neg_stroke"], labs, _neutral(rng), lab_style="inline")
    return sex, age, [note], ("eligible", "")


def a_hfref_rollup(rng, k):
    """Eligible: AF with HFrEF over two admissions; creatinine peaks in the older note, hemoglobin nadir in the newer."""
    sex, age = _sex(rng), _young(rng)
    pos = ["atrial_fibrillation", "heart_failure"]
    old = panel(rng, 3, "cbc", "chem", canonical=True, creatinine_max=rng.uniform(1.9, 2.3), hemoglobin_min=rng.uniform(10.5, 12))
    old["lvef_min"] = echo(rng.choice(["40", "35"]))
    new = panel(rng, 3, "cbc", "chem", canonical=True, creatinine_max=rng.uniform(1.1, 1.4), hemoglobin_min=rng.uniform(9.2, 9.8))
    new["lvef_min"] = echo("35", rng.choice(["30", "25"]))
    new["chads2_max"] = chads2(chads2_score(pos, age))
    return sex, age, [NotePlan(pos, [], old, "chf", lab_style="mimic"),
                      NotePlan(pos, ["neg_bleed_dx"], new, _neutral(rng), lab_style="table")], ("eligible", "")


def a_creatinine_umol(rng, k):
    """Excluded on creatinine, reported in umol/L in the older note and mg/dL in the newer one."""
    sex, age = _sex(rng), _any_age(rng)
    pos = ["atrial_fibrillation", "hypertension"]
    peak = rng.randint(265, 330)
    old = panel(rng, 1, "cbc")
    old["creatinine_max"] = fixed("creatinine_max", "umol/L", str(peak - rng.randint(20, 60)), str(peak),
                                  spelling=rng.choice(["µmol/L", "umol/L"]))
    new = panel(rng, 2, "cbc", "lft")
    new["creatinine_max"] = lab(rng, "creatinine_max", rng.uniform(1.4, 1.8), "mg/dL", 2)
    return sex, age, [NotePlan(pos, [], old, _neutral(rng), lab_style="inline"),
                      NotePlan(pos, ["col_crcl"], new, _neutral(rng), lab_style="mimic")], ("excluded", "exc_creatinine")


def a_hemoglobin(rng, k):
    """Excluded on hemoglobin: three admissions, three units, the nadir in the newest note."""
    sex, age = _sex(rng), _any_age(rng)
    n1 = panel(rng, 2, "cbc", "chem", canonical=True, hemoglobin_min=rng.uniform(11.4, 12.6), glucose_max=_dm_glucose(rng))
    n2 = panel(rng, 1, "chem", glucose_max=_dm_glucose(rng))
    n2["hemoglobin_min"] = lab(rng, "hemoglobin_min", rng.uniform(9.8, 11), "g/L", 2)
    n3 = panel(rng, 3, "cbc", "chem", canonical=True, glucose_max=_dm_glucose(rng))
    n3["hemoglobin_min"] = lab(rng, "hemoglobin_min", rng.uniform(7.6, 8.6), ["g/dL", "mmol/L"][k % 2], 3)
    pos = ["atrial_fibrillation", "diabetes"]
    return sex, age, [NotePlan(pos, [], n1, _neutral(rng)),
                      NotePlan(pos + ["hypertension"], [], n2, _neutral(rng), lab_style="inline"),
                      NotePlan(pos + ["hypertension"], ["neg_bleed_dx", "neg_bleeding"], n3, _neutral(rng),
                               lab_style=["table", "inline"][k % 2])], ("excluded", "exc_hemoglobin")


def a_platelets(rng, k):
    """Excluded on platelets (k even: /mm3 or 10^9/L); k odd: platelets exactly 100 plus three more reasons."""
    sex, age = _sex(rng), _any_age(rng)
    if k % 2 == 0:
        labs = panel(rng, 1, "chem", "lft")
        labs["platelets_min"] = lab(rng, "platelets_min", rng.randint(62, 92), rng.choice(["/mm3", "10^9/L", "/uL"]), 2)
        labs["hemoglobin_min"] = lab(rng, "hemoglobin_min", rng.uniform(10.5, 12.5), "g/dL", 2)
        note = NotePlan(["atrial_fibrillation", "hypertension"], ["neg_bleed_dx"], labs, _neutral(rng), lab_style="inline")
        return sex, age, [note], ("excluded", "exc_platelets")
    old = panel(rng, 2, "lft", canonical=True)
    old["platelets_min"] = fixed("platelets_min", "10^3/uL", "132", "100")
    old["creatinine_max"] = fixed("creatinine_max", "mg/dL", f"{rng.uniform(3.1, 3.6):.1f}", "2.4")
    old["hemoglobin_min"] = fixed("hemoglobin_min", "g/dL", "10.8", "10.1")
    new = panel(rng, 2, "cbc", "chem", canonical=True, hemoglobin_min=rng.uniform(8.1, 8.7), glucose_max=_dm_glucose(rng))
    pos = ["atrial_fibrillation", "diabetes"]
    reasons = "exc_bleeding_risk,exc_creatinine,exc_hemoglobin,exc_platelets"
    return sex, age, [NotePlan(pos, [], old, _neutral(rng)),
                      NotePlan(pos + ["bleeding_tendency"], [], new, _neutral(rng), lab_style="table")], ("excluded", reasons)


def a_ast(rng, k):
    """Excluded on AST above twice the sex-specific upper limit; a long note."""
    sex, age = _sex(rng), _any_age(rng)
    pos = ["atrial_fibrillation", "hypertension"]
    labs = panel(rng, 3, "cbc", "chem", canonical=True)
    labs["ast_max"] = lab(rng, "ast_max", 2 * AST_ULN[sex] + rng.randint(15, 300), ["U/L", "IU/L"][k % 2], 3)
    labs["bilirubin_max"] = lab(rng, "bilirubin_max", rng.uniform(0.6, 1.3), "mg/dL", 3)
    note = NotePlan(pos, ["col_vasc"], labs, "liver", form="long", lab_style=["mimic", "inline"][k % 2])
    return sex, age, [note], ("excluded", "exc_ast")


def a_bilirubin(rng, k):
    """Excluded on total bilirubin (umol/L inline, or mg/dL in MIMIC lines with a direct bilirubin beside it)."""
    sex, age = _sex(rng), _old(rng)
    labs = panel(rng, 2, "cbc", "chem")
    if k % 2 == 0:
        labs["bilirubin_max"] = lab(rng, "bilirubin_max", rng.randint(32, 45) * 0.05848, "umol/L", 2)
        style = "inline"
    else:
        labs = panel(rng, 2, "cbc", "chem", canonical=True)
        labs["bilirubin_max"] = lab(rng, "bilirubin_max", rng.uniform(2.1, 3.4), "mg/dL", 2)
        labs["ast_max"] = lab(rng, "ast_max", rng.randint(20, 38), "U/L", 2)
        style = "mimic"
    note = NotePlan(["atrial_fibrillation", "hypertension"], [], labs, "liver", lab_style=style)
    return sex, age, [note], ("excluded", "exc_bilirubin")


def a_recent_bleed(rng, k):
    """Excluded: a diverticular bleed this admission, then the next note refers back to it (six weeks ago)."""
    sex, age = _sex(rng), _any_age(rng)
    pos = ["atrial_fibrillation", "hypertension", "heart_failure", "recent_serious_bleeding"]
    old = panel(rng, 3, "cbc", "chem", canonical=True, hemoglobin_min=rng.uniform(9.3, 10))
    new = panel(rng, 1, "cbc", "chem")
    return sex, age, [NotePlan(pos, [], old, "gib", lab_style="mimic"),
                      NotePlan(pos, ["neg_bleed_dx"], new, _neutral(rng), pick={"recent_serious_bleeding": 1}, gap=42)], \
        ("excluded", "exc_bleeding_risk")


def a_recent_stroke(rng, k):
    """Excluded: acute ischemic stroke this admission with newly found AF; a long note (Acute Stroke Team = AST)."""
    sex, age = _sex(rng), _any_age(rng)
    labs = panel(rng, 2, "cbc", "chem", "lft", canonical=k % 2 == 1)
    note = NotePlan(["atrial_fibrillation", "hypertension", "recent_stroke"], [], labs, "stroke", form="long",
                    lab_style=["inline", "mimic"][k % 2])
    return sex, age, [note], ("excluded", "exc_recent_stroke")


def a_mitral_stenosis(rng, k):
    """Excluded: severe mitral stenosis awaiting surgery; odd characters, tabs and CRLF line endings."""
    sex, age = _sex(rng), _any_age(rng)
    labs = {"creatinine_max": lab(rng, "creatinine_max", rng.uniform(0.8, 1.2), "umol/L", 3),
            "hemoglobin_min": lab(rng, "hemoglobin_min", rng.uniform(11, 13), "g/L", 3),
            "platelets_min": lab(rng, "platelets_min", rng.randint(160, 300), "10^9/L", 3),
            "lvef_min": echo("≥55")}
    pos = ["atrial_fibrillation", "valvular_stenosis_surgery", "hypertension"]
    note = NotePlan(pos, ["neg_dm"], labs, "ms", lab_style=["table", "inline"][k % 2], odd=True,
                    pick={"valvular_stenosis_surgery": k % 2})
    return sex, age, [note], ("excluded", "exc_valvular_stenosis")


def a_dementia(rng, k):
    """Excluded: dementia documented in the newer note only."""
    sex, age = _sex(rng), _old(rng)
    pos = ["atrial_fibrillation", "hypertension"]
    return sex, age, [NotePlan(pos, [], panel(rng, 1, "cbc", "chem"), _neutral(rng)),
                      NotePlan(pos + ["cannot_make_decisions"], ["neg_depression"], panel(rng, 2, "cbc", "chem", "lft"),
                               "uti", lab_style="table")], ("excluded", "exc_cannot_consent")


def a_reversible_af(rng, k):
    """Excluded: AF only in the setting of a reversible cause (sepsis or thyrotoxicosis), hypertension."""
    sex, age = _sex(rng), _any_age(rng)
    cause, complaint = [("af_sepsis", "sepsis"), ("af_thyroid", "thyroid")][k % 2]
    return sex, age, [NotePlan(["hypertension"], ["neg_af"], panel(rng, 1, "cbc", "chem"), _neutral(rng), lab_style="inline"),
                      NotePlan(["hypertension"], [cause, "fh_af"], panel(rng, 2, "cbc", "chem", "lft"), complaint)], \
        ("excluded", "inc_af")


def a_no_af(rng, k):
    """Excluded: no AF (negated on telemetry, or alcohol-related and resolved); family history distractors."""
    sex, age = _sex(rng), _any_age(rng)
    neg = [["neg_af", "fh_bipolar", "fh_stroke", "ro_pe"], ["af_alcohol", "fh_schizo", "fh_depression", "ro_hf"]][k % 2]
    labs = panel(rng, 2, "cbc", "chem", glucose_max=_dm_glucose(rng))
    note = NotePlan(["hypertension", "diabetes"], neg, labs, "pneumonia", lab_style="mimic")
    return sex, age, [note], ("excluded", "inc_af")


def a_needs_review(rng, k):
    """Needs review: AF, under 75, no documented risk factor and no LVEF anywhere (risk factor unknown)."""
    sex, age = _sex(rng), _young(rng)
    notes = [NotePlan(["atrial_fibrillation"], ["neg_htn_dm", "neg_stroke", "neg_hf"], panel(rng, 2, "cbc", "chem"),
                      _neutral(rng), lab_style="mimic")]
    if k == 0:
        notes.append(NotePlan(form="blank"))
    return sex, age, notes, ("needs_review", "inc_risk_factor")


def a_needs_review_short(rng, k):
    """Needs review: a full note and a one-line follow-up note; the Acute Stroke Team (AST) collision."""
    sex, age = _sex(rng), _young(rng)
    first = NotePlan(["atrial_fibrillation"], ["col_stroke_team", "neg_stroke"], panel(rng, 1, "cbc", "chem", "lft"),
                     "syncope", lab_style="inline")
    second = NotePlan(["atrial_fibrillation"], [], {"hemoglobin_min": lab(rng, "hemoglobin_min", None, "g/dL")}, form="short")
    return sex, age, [first, second], ("needs_review", "inc_risk_factor")


def a_lone_af_normal_ef(rng, k):
    """Excluded: lone AF under 75 with a normal LVEF (no risk factor); ablation only hypothetical or declined."""
    sex, age = _sex(rng), _young(rng)
    labs = panel(rng, 1, "cbc", "chem")
    labs["lvef_min"] = echo(rng.choice([">55", "60-65", "55-60", "60"]))
    neg = [["hyp_ablation", "neg_htn_dm", "ro_stroke"], ["declined_ablation", "neg_htn_dm", "col_stroke_team"]][k % 2]
    return sex, age, [NotePlan(["atrial_fibrillation"], neg, labs, _neutral(rng))], ("excluded", "inc_risk_factor")


def a_ablation(rng, k):
    """Eligible: AF with prior TIA/stroke; ablation first only considered, then scheduled; depression."""
    sex, age = _sex(rng), _young(rng)
    pos = ["atrial_fibrillation", "prior_stroke_tia", "depression"]
    old = NotePlan(pos, ["hyp_ablation", "fh_bipolar"], panel(rng, 1, "cbc", "chem"), _neutral(rng))
    new_labs = panel(rng, 2, "cbc", "chem", "lft")
    new_labs["chads2_max"] = chads2(chads2_score(pos, age))
    new = NotePlan(pos + ["af_ablation"], ["fh_schizo"], new_labs, _neutral(rng), lab_style="table")
    return sex, age, [old, new], ("eligible", "")


def a_boundaries(rng, k):
    """Eligible at the edges: Cr 2.5, Hgb 9.0, platelets 101, AST exactly 2x ULN, bilirubin 1.7."""
    sex, age = "FM"[k % 2], _any_age(rng)
    labs = {"creatinine_max": fixed("creatinine_max", "mg/dL", "2.1", "2.5"),
            "hemoglobin_min": fixed("hemoglobin_min", "g/dL", "9.6", "9.0"),
            "platelets_min": fixed("platelets_min", "10^3/uL", "118", "101"),
            "ast_max": fixed("ast_max", "U/L", "41", str(2 * AST_ULN[sex])),
            "bilirubin_max": fixed("bilirubin_max", "mg/dL", "1.2", "1.7"),
            "glucose_max": lab(rng, "glucose_max", None, "mg/dL", 2)}
    note = NotePlan(["atrial_fibrillation", "hypertension"], ["minor_epistaxis"], labs, _neutral(rng),
                    lab_style="table", odd=k % 2 == 1)
    return sex, age, [note], ("eligible", "")


def a_cross_note(rng, k):
    """Eligible only across notes: AF in the first note, hypertension only in a short later note."""
    sex, age = _sex(rng), _young(rng)
    first = NotePlan(["atrial_fibrillation", "schizophrenia"], [], panel(rng, 1, "cbc", "chem"),
                     _neutral(rng))
    stub = NotePlan(form="short")
    later = NotePlan(["hypertension"], [], {"glucose_max": lab(rng, "glucose_max", None, "mg/dL")}, form="short")
    return sex, age, [first, stub, later], ("eligible", "")


ARCHETYPES = (a_classic, a_elderly_lone_af, a_hfref_rollup, a_creatinine_umol, a_hemoglobin, a_platelets, a_ast,
              a_bilirubin, a_recent_bleed, a_recent_stroke, a_mitral_stenosis, a_dementia, a_reversible_af, a_no_af,
              a_needs_review, a_needs_review_short, a_lone_af_normal_ef, a_ablation, a_boundaries, a_cross_note)


def _compatible(key: str, pos: list[str]) -> bool:
    need = DISTRACTOR_NEEDS.get(key)
    return not any(q in pos for q in DISTRACTORS[key][2]) and (need is None or need in pos)


def _decorate(rng: random.Random, notes: list[NotePlan]) -> None:
    """Add a patient-level psychiatric/PUD history and a few random distractors to the full notes."""
    full = [n for n in notes if n.form in ("full", "long")]
    extra = rng.choice((None,) * 4 + PSYCH_EXTRAS)
    taken = {q for n in notes for q in n.pos}
    if extra and not ({"depression", "bipolar_disorder", "schizophrenia"} & taken and extra != "peptic_ulcer") \
            and all(extra not in DISTRACTORS[k][2] for n in notes for k in n.neg):
        for n in full:
            n.pos.append(extra)
    for n in full:
        for key in rng.sample(RANDOM_DISTRACTORS, rng.randint(0, 2)):
            if key not in n.neg and _compatible(key, n.pos):
                n.neg.append(key)


def check_plan(plan: NotePlan) -> None:
    """Refuse a plan whose distractors contradict its facts, or whose facts do not hang together."""
    for key in plan.neg:
        if not _compatible(key, plan.pos):
            raise ValueError(f"distractor {key!r} conflicts with the note's facts {plan.pos}")
    if "af_ablation" in plan.pos and "atrial_fibrillation" not in plan.pos:
        raise ValueError("an AF ablation note must document AF")
    if "chads2_max" in plan.labs and "atrial_fibrillation" not in plan.pos:
        raise ValueError("a CHADS2 score belongs in an AF note")
    ef = plan.labs.get("lvef_min")
    if ef and min(_num(v) for v in ef.values) < 55 and "heart_failure" not in plan.pos:
        raise ValueError("a reduced LVEF must come with documented heart failure")
    if plan.complaint in COMPLAINT_FACT and COMPLAINT_FACT[plan.complaint] not in plan.pos:
        raise ValueError(f"complaint {plan.complaint!r} documents {COMPLAINT_FACT[plan.complaint]}")
    if "recent_stroke" in plan.pos and plan.complaint != "stroke" and plan.form != "short":
        raise ValueError("a recent stroke is the reason for admission in these notes")
    if plan.form in ("full", "long") and plan.complaint not in COMPLAINTS:
        raise ValueError(f"unknown complaint {plan.complaint!r}")


def build_patients(n_patients: int, rng: random.Random) -> list[Patient]:
    """Patients cycling through ARCHETYPES (so 40 patients give every archetype twice), in shuffled order."""
    patients = []
    for i in range(n_patients):
        sex, age, notes, intent = ARCHETYPES[i % len(ARCHETYPES)](rng, i // len(ARCHETYPES))
        _decorate(rng, notes)
        for plan in notes:
            check_plan(plan)
        patients.append(Patient(0, sex, age, notes, intent))
    rng.shuffle(patients)
    subject = 10_000_000
    for p in patients:
        subject += rng.randint(3, 900)
        p.subject_id = subject
    return patients


def _note_times(rng: random.Random, plans: list[NotePlan]) -> list[dt.datetime]:
    t = dt.datetime(2110 + rng.randint(0, 70), 1, 1) + dt.timedelta(days=rng.randint(0, 364))
    out = []
    for plan in plans:
        if out:
            t += dt.timedelta(days=plan.gap if plan.gap is not None else rng.randint(45, 500))
        out.append(t.replace(hour=rng.randint(9, 19), minute=rng.randint(0, 59), second=0))
    return out


def make_sample(n_patients: int = 40, seed: int = 7) -> dict[str, pa.Table]:
    """notes, gold (one row per note x question) and expected (one row per patient) tables; deterministic."""
    _require_job()
    rng = random.Random(seed)
    notes, gold, expected = {f.name: [] for f in NOTE_SCHEMA}, {f.name: [] for f in GOLD_SCHEMA}, []
    hadm = 20_000_000
    for p in build_patients(n_patients, rng):
        seq = rng.randint(2, 25)
        golds, dates = [], []
        for plan, when in zip(p.notes, _note_times(rng, p.notes)):
            hadm += rng.randint(100, 90_000)
            note_id = f"{p.subject_id}-DS-{seq}"
            seq += rng.randint(1, 6)
            row = dict(note_id=note_id, subject_id=p.subject_id, hadm_id=hadm, note_type="DS", charttime=when,
                       text=render(plan, p.sex, p.age, rng), sex=p.sex, age=p.age)
            for k, v in row.items():
                notes[k].append(v)
            g = note_gold(plan)
            golds.append(g)
            dates.append(when.date())
            for q in QUESTION_IDS:
                for k, v in zip(("note_id", "question_id", "value_bool", "value_num", "unit"), (note_id, q, *g[q])):
                    gold[k].append(v)
        decision = decide(p.sex, p.age, golds, dates)
        if (decision["status"], decision["reasons"]) != p.intent:
            raise RuntimeError(f"patient {p.subject_id}: archetype meant {p.intent}, facts give "
                                 f"{(decision['status'], decision['reasons'])}")
        expected.append({"subject_id": str(p.subject_id), **decision})
    expected.sort(key=lambda r: r["subject_id"])
    return {
        "notes": pa.Table.from_pydict(notes, NOTE_SCHEMA).sort_by([("subject_id", "ascending"), ("charttime", "ascending")]),
        "gold": pa.Table.from_pydict(gold, GOLD_SCHEMA),
        "expected": pa.Table.from_pylist(expected, EXPECTED_SCHEMA),
    }


# ---------------------------------------------------------------------------------------------------
# Many notes, fast (benchmarks): pre-rendered section pools, assembled column-wise with pyarrow.
# ---------------------------------------------------------------------------------------------------
EXTRACT_SECTIONS = ("cc", "hpi", "pmh", "exam", "results", "course", "meds_dc", "dx")
POOL_PATIENTS = 240
POOL_MIN_GROUP = 8


@dataclass
class _Pools:
    """Pre-rendered 'Header:\nbody' fragments per section, grouped by (sex, complaint) so a note stays on topic.

    Group g owns rows offsets[g] .. offsets[g] + sizes[g] of every section's array; row i of every section
    comes from the same pool note.
    """
    sections: dict[str, pa.Array]
    sizes: np.ndarray     # rows per group
    offsets: np.ndarray   # first row of each group
    male: np.ndarray      # 1 where the group's notes are about a man

    @property
    def cumulative(self):
        return self.offsets + self.sizes


def _pools(seed: int) -> _Pools:
    rng = random.Random(seed)
    groups: dict[tuple[str, str], list[tuple[int, dict[str, str]]]] = {}
    for p in build_patients(POOL_PATIENTS, rng):
        for plan in (n for n in p.notes if n.form == "full"):
            ctx = _context(plan, p.sex, p.age, rng)
            parts = {key: f"{rng.choice(HEADERS[key])}\n{body}" for key, body in _sections(plan, ctx) if key in EXTRACT_SECTIONS}
            groups.setdefault((p.sex, plan.complaint), []).append((p.age, parts))
    keys = [k for k in sorted(groups) if len(groups[k]) >= POOL_MIN_GROUP]
    sizes = np.array([len(groups[k]) for k in keys], dtype=np.int64)
    rows = [row for k in keys for row in groups[k]]
    return _Pools(
        sections={s: pa.array([parts[s] for _, parts in rows], pa.string()) for s in EXTRACT_SECTIONS},
        sizes=sizes, offsets=np.concatenate([[0], np.cumsum(sizes)[:-1]]),
        male=np.array([k[0] == "M" for k in keys], dtype=np.int64))


def make_extract(n_notes: int, seed: int = 0, notes_per_file: int = 100_000) -> Iterator[pa.Table]:
    """Yield tables (NOTE_SCHEMA) of up to `notes_per_file` synthetic notes, `n_notes` in all; no gold.

    Each note is the MIMIC header plus one pre-rendered fragment per section, each drawn independently from
    the notes of one (sex, complaint) group, so notes stay on topic yet differ after the first sections
    (cross-note prefix sharing stays about as small as in real notes). Two notes per patient, with the same
    sex and age (the age in the text may differ: fragments are shared). About 2.4k characters per note;
    1M notes take seconds (pyarrow `take` and element-wise joins, no per-note Python).
    """
    _require_job()
    pools = _pools(seed)
    gen = np.random.default_rng(seed)
    headers = pa.array([f"Name:  ___                     Unit No:   ___\n \nAdmission Date:  ___              "
                        f"Discharge Date:   ___\n \nDate of Birth:  ___             Sex:   {sex}\n \nService: MEDICINE\n \n"
                        "Allergies: \nNo Known Allergies / Adverse Drug Reactions\n \nAttending: ___." for sex in "FM"])
    base = np.datetime64("2110-01-01T00:00:00", "us")
    for start in range(0, n_notes, notes_per_file):
        n = min(notes_per_file, n_notes - start)
        row = np.arange(start, start + n, dtype=np.int64)
        subject = 10_000_000 + row // 2  # two notes per patient; a patient's group, age and dates hang on its id
        mixed = (subject * 0x9E3779B1 + seed * 0x85EBCA6B) % (1 << 32)
        group = np.searchsorted(pools.cumulative, mixed % pools.cumulative[-1], side="right")  # weighted by size
        male = pools.male[group]
        parts = [headers.take(pa.array(male))]
        for s in EXTRACT_SECTIONS:
            pick = pools.offsets[group] + (gen.random(n) * pools.sizes[group]).astype(np.int64)
            parts.append(pools.sections[s].take(pa.array(pick)))
        note_id = pc.binary_join_element_wise(pa.array(subject).cast(pa.string()), pa.array(row % 2 + 1).cast(pa.string()), "-DS-")
        seconds = (subject * 0xC2B2AE3D + seed * 97) % (70 * 365 * 86_400) + (row % 2) * gen.integers(30 * 86_400, 400 * 86_400, n)
        yield pa.Table.from_arrays([
            note_id, pa.array(subject), pa.array(30_000_000 + row), pa.array(np.full(n, "DS", dtype=object), pa.string()),
            pa.array(base + (seconds * 1_000_000).astype("timedelta64[us]")), pc.binary_join_element_wise(*parts, "\n \n"),
            pa.array(np.where(male == 1, "M", "F").astype(object), pa.string()), pa.array(40 + (mixed >> 4) % 51),
        ], schema=NOTE_SCHEMA)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def write_sample(out: Path, n_patients: int = 40, seed: int = 7) -> dict[str, Path]:
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, table in make_sample(n_patients, seed).items():
        paths[name] = out / f"sample_{name}.parquet"
        pq.write_table(table, paths[name], compression="zstd")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.tools.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", help="folder for sample_notes/gold/expected.parquet (default: data)")
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--job", default=str(DEFAULT_JOB),
                        help="job file whose questions, units and caps the gold follows (default: jobs/apixaban.yaml)")
    args = parser.parse_args(argv)
    use_job(args.job)
    for name, path in write_sample(Path(args.out), args.patients, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()

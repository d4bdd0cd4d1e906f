"""Units of numeric answers: spelling variants onto a job's unit keys, and conversion to the canonical unit.

Pure functions, no I/O. A model writes units the way notes do ("K/uL", "x10^9/L", "µmol/l", "mcmol/L");
rules compare numbers in one canonical unit per question, so every value goes through `to_canonical`.
A unit the question does not list is never guessed at: the value becomes unknown, with a reason.
"""

from __future__ import annotations

import math
import re

import numpy as np

from engine.job import QuestionSpec

# Applied in order to a case-folded, whitespace-free spelling. Each rewrite is an exact identity
# (µ = u = mc = micro; 1 mm³ = 1 µL; K/thou = 10^3), so no conversion factor is hidden here.
_REWRITES: tuple[tuple[str, str], ...] = (
    ("\u00b5", "u"),  # micro sign
    ("\u03bc", "u"),  # Greek small mu
    ("\u00d7", "x"),  # multiplication sign
    ("**", "^"),
    ("micro", "u"),
    ("mcmol", "umol"),
    ("mcl", "ul"),
    ("mcg", "ug"),
    ("cumm", "mm3"),
    ("mm^3", "mm3"),
    ("/cmm", "/mm3"),
    ("mm3", "ul"),
    ("percent", "%"),
    ("pct", "%"),
    ("per", "/"),
    ("cells/", "/"),
    ("liter", "l"),
    ("litre", "l"),
    ("units/", "u/"),
    ("unit/", "u/"),
    ("gm/", "g/"),
)
# Powers of ten: "x10^9", "x 10e9", "10*9", "10^9" all become "10^9"; K/k/thou/thousand become "10^3".
_SUPERSCRIPTS = str.maketrans("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079", "0123456789")
_SUPERSCRIPT_RUN = re.compile("[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+")
_POWER = re.compile(r"^x?10(?:\^|e|\*)(\d+)")
_THOUSAND = re.compile(r"^(?:thousands?|thou|k)(?=/)")
_POINTS = re.compile(r"^(?:points?|pts?)$")


def normalise_unit(text: str | None) -> str:
    """Return a comparable spelling of a unit: case-folded, no whitespace, micro as 'u', powers as '10^N'.

    Two spellings of the same unit give the same string, so a job key and a note's spelling match when
    `normalise_unit(a) == normalise_unit(b)`. None or blank gives '' (meaning: the canonical unit).
    """
    if text is None:
        return ""
    unit = re.sub(r"\s+", "", text).casefold()
    unit = _SUPERSCRIPT_RUN.sub(lambda m: "^" + m.group(0).translate(_SUPERSCRIPTS), unit)
    for old, new in _REWRITES:
        unit = unit.replace(old, new)
    unit = _POWER.sub(lambda m: f"10^{m.group(1)}", unit)
    unit = _THOUSAND.sub("10^3", unit)
    if _POINTS.match(unit):
        return "points"
    return unit


def match_unit(unit: str | None, question: QuestionSpec) -> str | None:
    """Return the question's unit key that `unit` spells (a missing unit is the canonical one), else None.

    An exact case-insensitive match wins over a match after normalisation, so a job may list two keys
    that normalise alike with their own factors and still get the one it wrote.
    """
    if unit is None or not unit.strip():
        return question.unit
    folded = unit.strip().casefold()
    for key in question.units:
        if key.casefold() == folded:
            return key
    wanted = normalise_unit(unit)
    for key in question.units:
        if normalise_unit(key) == wanted:
            return key
    return None


def conversion_factor(unit: str | None, question: QuestionSpec) -> float | None:
    """The factor that turns a value in `unit` into the question's canonical unit; None if not accepted."""
    key = match_unit(unit, question)
    return None if key is None else float(question.units[key])


def to_canonical(value: float | None, unit: str | None, question: QuestionSpec) -> tuple[float | None, str | None]:
    """Convert `value` in `unit` to the question's canonical unit and apply its cap.

    Returns (number, None) on success, or (None, reason) when the value is missing or not finite, or the
    unit is not one the question accepts (the reason names the unit and the accepted ones).
    """
    if question.type != "numeric":
        raise ValueError(f"question {question.id!r} is {question.type}, not numeric: it has no units")
    if value is None or not math.isfinite(value):
        return None, f"{question.id}: no finite value ({value!r})"
    factor = conversion_factor(unit, question)
    if factor is None:
        accepted = ", ".join(question.units)
        return None, f"{question.id}: unit {unit!r} is not accepted (accepted: {accepted})"
    converted = value * factor
    if question.cap is not None:
        converted = min(converted, question.cap)
    return converted, None


def unit_factors(spellings: list[str | None], question: QuestionSpec, cache: dict | None = None) -> np.ndarray:
    """conversion_factor for each unit spelling as an array, NaN where the question does not accept it. `cache`
    (keyed by question id and spelling) keeps the work per distinct spelling across calls."""
    cache = {} if cache is None else cache
    for unit in spellings:
        if (question.id, unit) not in cache:
            cache[(question.id, unit)] = conversion_factor(unit, question)
    return np.array([np.nan if cache[(question.id, u)] is None else cache[(question.id, u)] for u in spellings], dtype=float)


def to_canonical_array(values: np.ndarray, factors: np.ndarray, question: QuestionSpec) -> np.ndarray:
    """to_canonical over arrays: values times their unit's factor, capped; NaN stays NaN (a unit not accepted, no
    value). canonical_sql is the same arithmetic for the roll-up's SQL."""
    with np.errstate(invalid="ignore", over="ignore"):
        converted = values * factors
        if question.cap is not None:
            converted = np.where(converted > question.cap, question.cap, converted)
    return converted


def canonical_sql(value: str, factor: str, cap: str) -> str:
    """to_canonical as a SQL expression over columns (the roll-up's DuckDB query): `value` times its unit's `factor`
    (from conversion_factor, NULL where the unit is not accepted), capped at `cap` where that is not NULL."""
    return f"CASE WHEN {cap} IS NOT NULL AND {value} * {factor} > {cap} THEN {cap} ELSE {value} * {factor} END"

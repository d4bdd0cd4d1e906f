"""Cues: find where a note mentions what a question asks about, and read lab values with their units.

Pure functions over text (no model, no NLP pipeline). Terms match on word boundaries without regard to case,
abbreviations only in their exact case, and a match inside one of the question's `not_terms` does not count
("AST" in "Acute Stroke Team (AST)", "Cr" in "CrCl"). Lab values are read left to right after the lab name:
MIMIC lines ("Creat-1.9*"), tables ("| Cr | 1.2 | 2.6 |"), prose ("Cr 1.2, peaked at 2.6 mg/dL"), stopping at
the first word that is not a unit or a connecting word, so the next lab's value is never taken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from engine.job import QuestionSpec
from engine.cohort.units import match_unit

# Words that may stand between a lab name and its values, or between two values of one lab.
CONNECTING_WORDS = frozenset("""
    of was were is are at to from rose fell peaked peak peaking up down trended trending improved increased
    decreased elevated high low then and with a an the on admission adm discharge d/c baseline nadir max min
    maximum minimum value values level levels count ct serum total blood plasma initial initially last
    repeat subsequently now today this evening morning overnight by which stable range ranging score visit clinic
    prior previously
    current currently x estimated est calculated measured
""".split())
_NUMBER = re.compile(
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+(?:\.\d+)?|\.\d+)"
)
_COMPARISON = re.compile(r"(?<![-=])[<>\u2264\u2265]=?\s*$")  # not the arrow in '8 -> 6'
_WORD = re.compile(r"[A-Za-z\u00b5\u03bc/%^0-9.\u00b3\u00d7*]+")
_SKIP = re.compile(r"[\s:=#|,;()\[\]\-\u2013<>\u2264\u2265\u2192~*']+")
_UNIT = re.compile(r"\s*\*?\s*(?:x\s?)?([A-Za-z\u00b5\u03bc%/^0-9\u00b3\u00d7.]+)")
_DATE_OR_TIME = re.compile(r"\d{1,4}[/:]\d{1,2}")
MAX_VALUES_PER_MENTION = 12


@dataclass(frozen=True, slots=True)
class Match:
    """A cue in the note: [start, end) character span of the term."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class LabValue:
    """One value read after a lab name: as written, its number, the question's unit key, the span in the note."""

    written: str
    number: float
    unit: str | None  # the question's unit key; None: a unit was written that the question does not accept
    unit_written: bool
    start: int
    end: int


def term_pattern(question: QuestionSpec) -> re.Pattern | None:
    """One regex for all of a question's terms and abbreviations (longest first), or None without cues."""
    cues = question.cues
    if cues is None or not (cues.terms or cues.abbreviations):
        return None
    return _compile(tuple(cues.terms), tuple(cues.abbreviations))


@lru_cache(maxsize=512)
def _compile(terms: tuple[str, ...], abbreviations: tuple[str, ...]) -> re.Pattern:
    def alternation(words, flags):
        body = "|".join(phrase_pattern(w) for w in sorted(set(words), key=len, reverse=True))
        return f"(?{flags}:(?<![A-Za-z0-9]){'(?:' + body + ')'}(?![A-Za-z]))" if body else None

    parts = [p for p in (alternation(terms, "i"), alternation(abbreviations, "-i")) if p]
    return re.compile("|".join(parts))


def phrase_pattern(word: str) -> str:
    """A term as a regex: its words in order, any run of spaces or a hyphen between them."""
    pieces = re.split(r"[\s\-]+", word.strip())
    return r"[\s\-]*".join(re.escape(p) for p in pieces if p)


def find_mentions(text: str, question: QuestionSpec) -> list[Match]:
    """Every mention of the question's cues, minus those that overlap a `not_terms` phrase."""
    pattern = term_pattern(question)
    if pattern is None or not text:
        return []
    blocked = _blocked_spans(text, question)
    found = []
    for m in pattern.finditer(text):
        if not any(m.start() < b_end and b_start < m.end() for b_start, b_end in blocked):
            found.append(Match(m.start(), m.end()))
    return found


def _blocked_spans(text: str, question: QuestionSpec) -> list[tuple[int, int]]:
    not_terms = question.cues.not_terms if question.cues else []
    if not not_terms:
        return []
    pattern = _compile(tuple(not_terms), ())
    return [(m.start(), m.end()) for m in pattern.finditer(text)]


def read_values(text: str, mention: Match, question: QuestionSpec) -> list[LabValue]:
    """The values written after a lab name, on its line, within the question's `value_chars`."""
    limit = question.cues.value_chars if question.cues else 40
    line_end = text.find("\n", mention.end)
    stop = min(len(text), mention.end + limit, line_end if line_end >= 0 else len(text))
    values: list[LabValue] = []
    pos, header_unit = mention.end, None
    while pos < stop and len(values) < MAX_VALUES_PER_MENTION:
        skip = _SKIP.match(text, pos)
        if skip:
            pos = skip.end()
            continue
        word = _WORD.match(text, pos)
        unit = _accepted_unit(word.group(), question) if word else None
        if unit is not None:  # a unit before the values: 'PLT (K/uL) | 328 | 385', 'Cr (umol/L) 69 87'
            header_unit, pos = unit, word.end()
            continue
        number = _NUMBER.match(text, pos)
        if number and not _is_date_or_time(text, pos):
            value, pos = _value_at(text, number, question)
            if value is not None:
                values.append(value if value.unit_written or header_unit is None else _with_unit(value, header_unit))
            continue
        if word is None or word.group().lower().rstrip(".") not in CONNECTING_WORDS:
            break
        pos = word.end()
    return _units_carried_back(values) or read_column(text, mention, question)


_CELL_SEPARATOR = re.compile(r"\t|\|")
_RULE_LINE = re.compile(r"^[\s|:\-+=]*$")


def read_column(text: str, mention: Match, question: QuestionSpec) -> list[LabValue]:
    """A lab name in a table's header row ('| Date | Plt (K/uL) | Cr (mg/dL) |'): the values in its column below,
    down to the first blank line, with the unit of the header cell."""
    line_start = text.rfind("\n", 0, mention.start) + 1
    line_end = text.find("\n", mention.end)
    line_end = len(text) if line_end < 0 else line_end
    header = text[line_start:line_end]
    if len(_CELL_SEPARATOR.findall(header)) < 2:
        return []
    offset = mention.start - line_start
    column = len(_CELL_SEPARATOR.findall(header[:offset]))
    cell = _CELL_SEPARATOR.split(header)[column]
    unit = next((u for u in (_accepted_unit(w, question) for w in _WORD.findall(cell)) if u), None)
    values, pos = [], line_end + 1
    while pos < len(text) and len(values) < MAX_VALUES_PER_MENTION:
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        row = text[pos:end]
        if not row.strip() or len(_CELL_SEPARATOR.findall(row)) < 2:
            break
        if not _RULE_LINE.match(row):
            values += _cell_value(text, pos, row, column, unit, question)
        pos = end + 1
    return values


def _cell_value(text: str, row_start: int, row: str, column: int, unit: str | None, question: QuestionSpec) -> list[LabValue]:
    cells = _CELL_SEPARATOR.split(row)
    if column >= len(cells):
        return []
    cell_start = row_start + sum(len(c) + 1 for c in cells[:column])
    stripped = cells[column].lstrip()
    number = _NUMBER.match(text, cell_start + len(cells[column]) - len(stripped))
    if not stripped or number is None:
        return []
    value, _ = _value_at(text, number, question)
    if value is None:
        return []
    return [value if value.unit_written or unit is None else _with_unit(value, unit)]


def _accepted_unit(token: str, question: QuestionSpec) -> str | None:
    token = token.rstrip(".,;*")
    if not token or token.replace(".", "").replace(",", "").isdigit():
        return None
    return match_unit(token, question)


def _with_unit(value: LabValue, unit: str | None) -> LabValue:
    return LabValue(value.written, value.number, unit, True, value.start, value.end)


def _units_carried_back(values: list[LabValue]) -> list[LabValue]:
    """'Hb 5.3, 5.5, 5.7 mmol/L': a unit written after a series is the unit of the series before it."""
    carried, out = None, []
    for value in reversed(values):
        if value.unit_written:
            carried = value.unit
            out.append(value)
        else:
            out.append(_with_unit(value, carried) if carried is not None else value)
    return out[::-1]


def _is_date_or_time(text: str, pos: int) -> bool:
    return _DATE_OR_TIME.match(text, pos) is not None


def _value_at(text: str, number: re.Match, question: QuestionSpec) -> tuple[LabValue | None, int]:
    """The value starting at `number`, with the unit written after it (if any). A range ('30-35%') is read as
    its two values, so the question's highest or lowest picks the right end."""
    written = number.group("num")
    end = number.end()
    compared = _COMPARISON.search(text, max(0, number.start() - 3), number.start())
    if compared and not (question.cues and question.cues.comparisons):
        return None, end  # 'transfuse for Hgb < 7', 'plt >50': a threshold, not a result
    unit_match = _UNIT.match(text, end)
    unit_key, unit_written = question.unit, False
    candidate = unit_match.group(1).rstrip(".,;") if unit_match else ""
    if candidate:
        key = match_unit(candidate, question) if not candidate.replace(".", "").isdigit() else None
        if key is not None:
            unit_key, unit_written, end = key, True, unit_match.start(1) + len(candidate)
        elif _looks_like_unit(candidate):
            unit_key, unit_written, end = None, True, unit_match.start(1) + len(candidate)
    number_value = float(written.replace(",", ""))
    return LabValue(text[number.start("num"):end], number_value, unit_key, unit_written, number.start("num"), end), end


def _looks_like_unit(token: str) -> bool:
    """A unit the question does not accept ('mL/min' after CrCl, '%' after an A1c): the value is not this lab's."""
    lowered = token.lower()
    return "/" in lowered or lowered in ("%", "mmhg", "ml", "kg", "mg", "units", "u", "g", "mm", "cm", "s", "sec")

"""Dates in a note's text: absolute ("2026-03-02", "3/2/2026", "March 2, 2026", "March 2026", "in 2019") and relative
to the note ("2 weeks ago", "yesterday", "last March", "on POD 3"), each resolved against the note's charttime.

Pure functions over text: regular expressions and calendar arithmetic (python-dateutil's relativedelta, which pandas
already brings), no model. A phrase names a period, `first`..`last` (a day: both the same; "March 2026": the month;
"in 2019": the year); the answer's date is its first day (`value`; "last week": 7 days before the note). A relative phrase needs the note's charttime; without one it is
found but not resolved (`first` None), as is "POD 3" in a note that names no operation date. Written dates that are
not calendar dates (2/30/2026) are not dates.

Chosen over dateparser by measurement (benchmarks/date_cues.py): dateparser's `search_dates` over the text around
the mentions costs milliseconds per note and reads "2 weeks" or "March" without "ago"/"last" as dates, where this
module's patterns cost microseconds and read only what a note writes as a date.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from dateutil.relativedelta import relativedelta

MONTHS = {name: i + 1 for i, names in enumerate((
    ("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"), ("may",), ("june", "jun"),
    ("july", "jul"), ("august", "aug"), ("september", "sep", "sept"), ("october", "oct"), ("november", "nov"),
    ("december", "dec"))) for name in names}
NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "a couple of": 2, "a few": 3,
                "several": 3}
UNITS = {"day": "days", "week": "weeks", "wk": "weeks", "month": "months", "mo": "months", "year": "years",
         "yr": "years"}
EARLIEST_YEAR, LATEST_YEAR = 1900, 2300

_MONTH = r"(?P<month>" + "|".join(sorted(MONTHS, key=len, reverse=True)) + r")\.?"
_COUNT = r"(?P<count>\d{1,3}|" + "|".join(sorted(map(re.escape, NUMBER_WORDS), key=len, reverse=True)) + ")"
_UNIT = r"(?P<unit>days?|weeks?|wks?|months?|mos?|years?|yrs?)"
_B = r"(?<![A-Za-z0-9/\-.])"  # a date starts at a word boundary (not inside 1/2/3 or v2.0)
_E = r"(?![A-Za-z0-9/]|-\d)"
PATTERNS = [  # (kind, regex); tried in this order, and an earlier match wins where two overlap
    ("iso", rf"{_B}(?P<year>\d{{4}})-(?P<mon>\d{{1,2}})-(?P<day>\d{{1,2}}){_E}"),
    ("mdy", rf"{_B}(?P<mon>\d{{1,2}})/(?P<day>\d{{1,2}})/(?P<year>\d{{4}}|\d{{2}}){_E}"),
    ("month_day_year", rf"{_B}{_MONTH}\s+(?P<day>\d{{1,2}})(?:st|nd|rd|th)?(?:,?\s+(?P<year>\d{{4}}))?{_E}"),
    ("day_month_year", rf"{_B}(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}(?:,?\s+(?P<year>\d{{4}}))?{_E}"),
    ("month_year", rf"{_B}{_MONTH},?\s+(?P<year>\d{{4}}){_E}"),
    ("ago", rf"{_B}{_COUNT}\s+{_UNIT}\s+(?:ago|prior|earlier|before\s+(?:admission|presentation))\b"),
    ("last_month_name", rf"\b(?P<which>last|this\s+past|past|in|this)\s+{_MONTH}(?![A-Za-z])"),
    ("last_unit", r"\b(?P<which>last|past|previous)\s+(?P<unit>week|month|year)\b"),
    ("day_word", r"\b(?P<word>today|yesterday|this\s+morning|this\s+evening|tonight|last\s+night|overnight)\b"),
    ("pod", r"\b(?:POD|post-?op(?:erative)?\s+day)\s*#?\s*(?P<pod>\d{1,2})\b"),
    ("md", rf"\b(?:on|since|from|dated|of)\s+(?P<mon>\d{{1,2}})/(?P<day>\d{{1,2}}){_E}"),
    ("year", rf"\b(?:in|since|from|of)\s+(?P<year>(?:19|20|21|22)\d{{2}}){_E}"),
]
COMPILED = [(kind, re.compile(pattern, re.I)) for kind, pattern in PATTERNS]
_OPERATION = re.compile(r"\b(?:s/p|status\s+post|underwent|surgery|operation|procedure|operated|OR)\b", re.I)
OPERATION_CHARS = 60  # an operation's date stands this close after its word ("underwent CABG on 3/2/2026")


@dataclass(frozen=True, slots=True)
class DatePhrase:
    """A date as written in the note ([start, end)), and the period it names; first None: found, not resolved."""

    start: int
    end: int
    written: str
    kind: str
    first: dt.date | None
    last: dt.date | None
    value: dt.date | None = None  # the answer's date: `first`, except "last week" (7 days before the note)

    @property
    def resolved(self) -> bool:
        return self.first is not None


def find_dates(text: str, charttime: dt.datetime | dt.date | None, start: int = 0, end: int | None = None,
               note: str | None = None) -> list[DatePhrase]:
    """Every date phrase in text[start:end], in text order, resolved against `charttime` (the note's time).
    `note`: the whole note, where "POD n" looks for its operation date (default: `text`)."""
    end = len(text) if end is None else end
    day = _as_date(charttime)
    found: list[DatePhrase] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern in COMPILED:
        for m in pattern.finditer(text, start, end):
            if any(m.start() < b and a < m.end() for a, b in taken):
                continue
            period = _resolve(kind, m, day, note if note is not None else text)
            if period is False:  # not a calendar date (13/45/2026): not a date at all
                continue
            first, last, value = (period + (period[0],))[:3] if period else (None, None, None)
            found.append(DatePhrase(m.start(), m.end(), m.group(0), kind, first, last, value))
            taken.append((m.start(), m.end()))
    return sorted(found, key=lambda p: p.start)


def resolve_phrase(phrase: str, charttime: dt.datetime | dt.date | None, note: str | None = None) -> DatePhrase | None:
    """The one date a short phrase names ("2 weeks ago", "3/2/2026"), or None when it holds no date."""
    found = find_dates(phrase, charttime, note=note if note is not None else phrase)
    return found[0] if found else None


def _as_date(value) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return None


def _day(year: int, month: int, day: int):
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


def _full_year(written: str) -> int:
    year = int(written)
    return year + (2000 if year < 50 else 1900) if len(written) == 2 else year


def _month_period(year: int, month: int) -> tuple[dt.date, dt.date]:
    first = dt.date(year, month, 1)
    return first, first + relativedelta(months=1, days=-1)


def _recent(candidate: dt.date, day: dt.date | None, years_back: int = 1) -> dt.date:
    """A date written without its year: the latest such date not after the note's day."""
    if day is not None and candidate > day:
        return candidate - relativedelta(years=years_back)
    return candidate


def _resolve(kind: str, m: re.Match, day: dt.date | None, note: str):
    """(first, last) of the period the match names; None when it needs a charttime (or operation date) it lacks;
    False when what is written is no calendar date."""
    g = m.groupdict()
    if kind in ("iso", "mdy"):
        date = _day(_full_year(g["year"]), int(g["mon"]), int(g["day"]))
        return (date, date) if date and EARLIEST_YEAR <= date.year <= LATEST_YEAR else False
    if kind in ("month_day_year", "day_month_year"):
        month = MONTHS[g["month"].lower()]
        if g.get("year"):
            date = _day(int(g["year"]), month, int(g["day"]))
            return (date, date) if date else False
        if day is None:
            return None
        date = _day(day.year, month, int(g["day"])) or _day(day.year - 1, month, int(g["day"]))
        if date is None:
            return False
        date = _recent(date, day)
        return date, date
    if kind == "month_year":
        return _month_period(int(g["year"]), MONTHS[g["month"].lower()])
    if kind == "year":
        year = int(g["year"])
        return dt.date(year, 1, 1), dt.date(year, 12, 31)
    if kind == "md":
        month, dom = int(g["mon"]), int(g["day"])
        if not (1 <= month <= 12 and 1 <= dom <= 31):
            return False
        if day is None:
            return None
        date = _day(day.year, month, dom) or _day(day.year - 1, month, dom)
        if date is None:
            return False
        date = _recent(date, day)
        return date, date
    if day is None:
        return None
    if kind == "ago":
        count = g["count"].lower()
        n = int(count) if count.isdigit() else NUMBER_WORDS[re.sub(r"\s+", " ", count)]
        unit = UNITS[g["unit"].lower().rstrip("s")]
        date = day - relativedelta(**{unit: n})
        return date, date
    if kind == "last_month_name":
        month = MONTHS[g["month"].lower()]
        which = re.sub(r"\s+", " ", g["which"].lower())
        if g["month"] == "may" and which in ("in", "this"):  # "this may be", "in may help": the verb
            return False
        year = day.year if month < day.month or (month == day.month and which in ("in", "this")) else day.year - 1
        return _month_period(year, month)
    if kind == "last_unit":
        unit = g["unit"].lower()
        if unit == "week":
            return day - relativedelta(days=13), day - relativedelta(days=1), day - relativedelta(days=7)
        if unit == "month":
            return _month_period(*_shift_month(day, -1))
        return dt.date(day.year - 1, 1, 1), dt.date(day.year - 1, 12, 31)
    if kind == "day_word":
        word = re.sub(r"\s+", " ", g["word"].lower())
        date = day - relativedelta(days=1) if word in ("yesterday", "last night") else day
        return date, date
    if kind == "pod":
        operation = operation_date(note, day)
        if operation is None:
            return None
        date = operation + relativedelta(days=int(g["pod"]))
        return date, date
    return None


def _shift_month(day: dt.date, months: int) -> tuple[int, int]:
    shifted = day + relativedelta(months=months)
    return shifted.year, shifted.month


def operation_date(note: str, day: dt.date | None) -> dt.date | None:
    """The date of the note's operation, for "POD n": the first resolved date that follows an operation word
    (s/p, underwent, surgery, operation, procedure) within OPERATION_CHARS on its line."""
    for word in _OPERATION.finditer(note):
        line_end = note.find("\n", word.end())
        stop = min(word.end() + OPERATION_CHARS, len(note) if line_end < 0 else line_end)
        for phrase in find_dates(note, day, word.end(), stop, note=""):
            if phrase.resolved and phrase.kind != "pod":
                return phrase.value
    return None

"""engine.stages.dates: date phrases found in text and resolved against the note's time. Every expected date below
is worked out by hand from the calendar, not by the module."""

from __future__ import annotations

import datetime as dt

import pytest

from engine.stages.dates import find_dates, resolve_phrase

D = dt.date
NOTE = dt.datetime(2026, 3, 10, 14, 5)


def one(text: str, charttime=NOTE):
    found = find_dates(text, charttime)
    assert len(found) == 1, (text, found)
    return found[0]


@pytest.mark.parametrize("text, written, day", [
    ("acute stroke on 2026-03-02", "2026-03-02", D(2026, 3, 2)),
    ("CVA 3/2/2026, left MCA", "3/2/2026", D(2026, 3, 2)),
    ("CVA 03/02/26", "03/02/26", D(2026, 3, 2)),
    ("GI bleed on March 2, 2026", "March 2, 2026", D(2026, 3, 2)),
    ("GI bleed on 2 March 2026", "2 March 2026", D(2026, 3, 2)),
    ("stroke Sept. 14th, 2025", "Sept. 14th, 2025", D(2025, 9, 14)),
])
def test_absolute_dates(text, written, day):
    phrase = one(text)
    assert (phrase.written, phrase.value, phrase.first, phrase.last) == (written, day, day, day)


@pytest.mark.parametrize("text, day", [
    ("GI bleed 2 weeks ago", D(2026, 2, 24)),
    ("stroke three days ago", D(2026, 3, 7)),
    ("hematoma 1 month ago", D(2026, 2, 10)),
    ("bleed 6 weeks prior", D(2026, 1, 27)),
    ("fell yesterday", D(2026, 3, 9)),
    ("seizure this morning", D(2026, 3, 10)),
    ("stroke on 3/2", D(2026, 3, 2)),
    ("bleed Mar 2", D(2026, 3, 2)),
])
def test_relative_dates_count_from_the_note(text, day):
    assert one(text).value == day


def test_relative_dates_across_month_and_year_ends():
    assert one("stroke 1 month ago", dt.datetime(2026, 3, 31)).value == D(2026, 2, 28)  # no 31 February
    assert one("stroke 1 month ago", dt.datetime(2024, 3, 31)).value == D(2024, 2, 29)  # leap year
    assert one("bleed 2 weeks ago", dt.datetime(2026, 1, 5)).value == D(2025, 12, 22)
    assert one("bleed 3 days ago", dt.datetime(2026, 1, 1, 8)).value == D(2025, 12, 29)
    assert one("seen Dec 28", dt.datetime(2026, 1, 5)).value == D(2025, 12, 28)  # no year: the latest Dec 28 before
    assert one("stroke on 12/30", dt.datetime(2026, 1, 2)).value == D(2025, 12, 30)
    assert one("hemorrhage 1 year ago", dt.datetime(2024, 2, 29)).value == D(2023, 2, 28)
    assert one("fell yesterday", dt.datetime(2026, 3, 1)).value == D(2026, 2, 28)


def test_month_names_without_a_year_name_the_latest_such_month():
    last = one("stroke last March")  # a note of March 2026: last March is March 2025
    assert (last.first, last.last, last.value) == (D(2025, 3, 1), D(2025, 3, 31), D(2025, 3, 1))
    assert one("stroke last March", dt.datetime(2026, 5, 4)).first == D(2026, 3, 1)
    assert one("stroke in December", dt.datetime(2026, 1, 15)).first == D(2025, 12, 1)
    assert one("stroke in March").first == D(2026, 3, 1)  # this month
    month = one("stroke in March 2024")
    assert (month.first, month.last) == (D(2024, 3, 1), D(2024, 3, 31))
    year = one("CVA in 2019")
    assert (year.first, year.last) == (D(2019, 1, 1), D(2019, 12, 31))


def test_last_week_last_month_last_year():
    assert one("bleed last month").first == D(2026, 2, 1) and one("bleed last month").last == D(2026, 2, 28)
    week = one("bleed last week")
    assert week.value == D(2026, 3, 3) and week.first <= week.value <= week.last
    assert one("bleed last year", dt.datetime(2026, 1, 3)).first == D(2025, 1, 1)


def test_post_operative_days_count_from_the_operation_date_in_the_note():
    note = "Underwent CABG on 1/30/2026.\nCourse: on POD 3 he had a GI bleed."
    pod = [p for p in find_dates(note, NOTE) if p.kind == "pod"]
    assert pod[0].value == D(2026, 2, 2)  # across the month end
    unresolved = one("on POD 3 he had a GI bleed")  # no operation date written: found, not resolved
    assert unresolved.kind == "pod" and not unresolved.resolved


def test_without_a_charttime_relative_dates_are_found_but_not_resolved_and_absolute_ones_are():
    assert not one("GI bleed 2 weeks ago", None).resolved
    assert not one("stroke last March", None).resolved
    assert one("stroke on 2026-03-02", None).value == D(2026, 3, 2)


@pytest.mark.parametrize("text", [
    "BP 120/80", "2/30/2026", "13/45/2026", "take 1/2 tab", "this may be due to", "Hb 12.1", "v2.0 protocol",
    "for 2 weeks", "every March", "Cr 1.2 -> 2.6",
])
def test_things_that_are_not_dates(text):
    assert [p for p in find_dates(text, NOTE) if p.resolved] == []


def test_resolve_phrase_reads_one_phrase():
    assert resolve_phrase("2 weeks ago", NOTE).value == D(2026, 2, 24)
    assert resolve_phrase("no date here", NOTE) is None


def test_several_dates_in_text_order_within_a_span():
    text = "Stroke 3/2/2026; prior CVA in 2019; GI bleed 2 weeks ago."
    found = find_dates(text, NOTE)
    assert [p.written for p in found] == ["3/2/2026", "in 2019", "2 weeks ago"]
    assert [p.written for p in find_dates(text, NOTE, 17, 34)] == ["in 2019"]

"""Choices: read which of a categorical question's declared answers a note gives, near the question's cue mentions.

A choice is found by its own words or a declared synonym (`synonyms:` in the job), matched like cue terms: on word
boundaries without regard to case, except short all-capital spellings (I, II, IV, AF), which match only in that case.
The cue answer is the choice written nearest each mention that counts (paroxysmal in "paroxysmal atrial
fibrillation"); where the mentions give different choices the question's roll-up picks one (max and min follow the
order of `choices`; latest: the last written) and the pair is left to the model in hybrid mode.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from engine.job import QuestionSpec
from engine.stages.context import near, quote_around
from engine.stages.cues import phrase_pattern

CHOICE_CHARS = 60  # a choice is read this far either side of a mention, within its sentence and line


def _exact_case(word: str) -> bool:
    return len(word) <= 4 and word.isupper()


@lru_cache(maxsize=256)
def _choice_pattern(words: tuple[str, ...]) -> re.Pattern:
    folded = [w for w in words if not _exact_case(w)]
    exact = [w for w in words if _exact_case(w)]
    parts = []
    for group, flags in ((folded, "i"), (exact, "-i")):
        if group:
            body = "|".join(phrase_pattern(w) for w in sorted(set(group), key=len, reverse=True))
            parts.append(f"(?{flags}:(?<![A-Za-z0-9])(?:{body})(?![A-Za-z0-9]))")
    return re.compile("|".join(parts))


def choice_words(spec: QuestionSpec, choice: str) -> tuple[str, ...]:
    """A choice's own words and its declared synonyms."""
    return (choice, *spec.synonyms.get(choice, ()))


def find_choices(text: str, spec: QuestionSpec, start: int = 0, end: int | None = None) -> list[tuple[int, int, str]]:
    """(start, end, choice) of every choice written in text[start:end], in text order."""
    end = len(text) if end is None else end
    found = []
    for choice in spec.choices:
        for m in _choice_pattern(choice_words(spec, choice)).finditer(text, start, end):
            found.append((m.start(), m.end(), choice))
    found.sort()
    kept, last_end = [], -1  # overlapping spellings ("persistent" in "long-standing persistent"): the first, longest
    for item in sorted(found, key=lambda f: (f[0], -(f[1] - f[0]))):
        if item[0] >= last_end:
            kept.append(item)
            last_end = item[1]
    return kept


def choice_in(quote: str, spec: QuestionSpec, choice: str) -> bool:
    """Whether a quote writes this choice (its words or a synonym)."""
    return _choice_pattern(choice_words(spec, choice)).search(quote) is not None


def categorical_answer(text: str, spec: QuestionSpec, mentions: list, evidence_chars: int) -> tuple[str, bool]:
    """The cue answer of a categorical question (the answer schema's JSON) and whether it is unambiguous."""
    picked = []
    for mention in (m for m in mentions if m.counts):
        lo, hi = near(text, mention.match.start, mention.match.end, mention.context, CHOICE_CHARS)
        found = find_choices(text, spec, lo, hi)
        if found:
            nearest = min(found, key=lambda f: min(abs(f[0] - mention.match.end), abs(mention.match.start - f[1])))
            picked.append((nearest, mention))
    if not picked:
        return json.dumps({"evidence": "", "choice": None}), True
    order = {choice: i for i, choice in enumerate(spec.choices)}
    how = spec.effective_rollup
    if how in ("max", "min"):
        pick = (max if how == "max" else min)(picked, key=lambda item: order[item[0][2]])
    else:
        pick = max(picked, key=lambda item: item[0][0])
    (start, end, choice), mention = pick
    evidence = quote_around(text, min(start, mention.match.start), max(end, mention.match.end), mention.context, evidence_chars)
    if not choice_in(evidence, spec, choice):
        evidence = quote_around(text, start, end, mention.context, evidence_chars)
    return json.dumps({"evidence": evidence, "choice": choice}), len({item[0][2] for item in picked}) == 1

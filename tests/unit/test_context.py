"""medspaCy ConText and sections on real medspaCy (installed over its spaCy pin, see scripts/install.sh)."""

from __future__ import annotations

import logging
import re

from engine.stages.context import contexts
from engine.job import ContextRuleSpec

NOTE = """Past Medical History:
- Paroxysmal a-fib on warfarin
- No history of diabetes.
Family History:
Sister with bipolar disorder.
Brief Hospital Course:
Denies chest pain, no AF on telemetry. If afib recurs, consider ablation. Transient AF in the setting of sepsis, resolved.
Dyspnea initially concerning for CHF, but BNP normal; CHF ruled out.
"""
RULES = (ContextRuleSpec(phrase="in the setting of", flag="resolved"),
         ContextRuleSpec(phrase="concerning for", flag="uncertain", direction="forward"),
         ContextRuleSpec(phrase="ruled out", flag="negated"))


def flags_of(words: str, rules=RULES) -> list[tuple[str, list[str]]]:
    spans = [(m.start(), m.end()) for m in re.finditer(words, NOTE)]
    return [(NOTE[s:e], sorted(c.flags)) for (s, e), c in zip(spans, contexts(NOTE, spans, rules))]


def test_negation_family_hypothetical_and_job_rules():
    assert flags_of(r"a-fib|\bAF\b|afib") == [("a-fib", ["historical"]), ("AF", ["negated"]), ("afib", ["hypothetical"]), ("AF", ["resolved"])]
    assert flags_of("diabetes") == [("diabetes", ["historical", "negated"])]  # in the Past Medical History
    assert flags_of("bipolar disorder") == [("bipolar disorder", ["family"])]


def test_a_job_rule_is_kept_beside_a_medspacy_rule_for_the_same_words():
    # medspaCy has 'ruled out' forward; the job's backward rule must still negate "CHF ruled out"
    assert flags_of("CHF") == [("CHF", ["uncertain"]), ("CHF", ["negated"])]
    assert flags_of("CHF", rules=()) == [("CHF", ["uncertain"]), ("CHF", [])]  # medspaCy's own 'concerning for'; no backward rule


def test_a_wrapped_line_is_one_sentence_and_a_family_section_ends_at_its_paragraph():
    text = "Past Medical History:\nObesity. No history of\ndiabetes or hypertension.\n\nFamily History:\nFather with CVA.\n\nLabs: Cr 1.2"
    spans = [(text.index(w), text.index(w) + len(w)) for w in ("diabetes", "CVA", "Cr")]
    found = contexts(text, spans)
    assert "negated" in found[0].flags
    assert "family" in found[1].flags and "family" not in found[2].flags


def test_sentence_and_section_of_each_mention():
    start = NOTE.index("no AF")
    (context,) = contexts(NOTE, [(start + 3, start + 5)])
    assert NOTE[context.sentence_start:context.sentence_end].strip() == "Denies chest pain, no AF on telemetry."
    assert context.section == "hospital_course"


def test_no_note_text_reaches_the_logs(caplog, capfd):
    caplog.set_level(logging.DEBUG)
    secret = "Zyxwvut presents with afib"
    contexts(secret, [(secret.index("afib"), len(secret))])
    captured = capfd.readouterr()
    assert "Zyxwvut" not in caplog.text + captured.out + captured.err

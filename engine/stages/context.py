"""Clinical context of cue mentions with medspaCy: sentences (PyRuSH), sections and ConText flags.

The cue regexes (engine.stages.cues) find the spans; sentences come from line and punctuation rules (or PyRuSH, as
the job says); medspaCy says whether each is negated ("no AF on telemetry"),
a family member's ("Mother had a stroke"), hypothetical ("if AF recurs"), historical, uncertain, or
resolved (the job's own ConText rules, e.g. "AF in the setting of sepsis, resolved"). A mention in a
Family History section is a family mention whatever its sentence says.

Why medspaCy: it is the maintained clinical ConText/sectionizer implementation and runs offline with no model
download. It declares spaCy < 3.8 on Python 3.11, whose thinc is built against numpy 1 and cannot load beside
vLLM (numpy 2); scripts/install.sh installs it and PyRuSH over that pin with spaCy 3.8 (measured to import and
flag correctly; tests/unit/test_context.py keeps it so). PyRuSH logs every token at DEBUG through loguru: that
is note text in the logs, so its logger is disabled here before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from engine.job import ContextRuleSpec

CONTEXT_CATEGORIES = {  # medspaCy ConText category -> engine flag
    "NEGATED_EXISTENCE": "negated",
    "FAMILY": "family",
    "HYPOTHETICAL": "hypothetical",
    "HISTORICAL": "historical",
    "POSSIBLE_EXISTENCE": "uncertain",
    "RESOLVED": "resolved",
}
ENGINE_CATEGORIES = {flag: category for category, flag in CONTEXT_CATEGORIES.items()}
FAMILY_SECTIONS = {"family_history"}
HISTORY_SECTIONS = {"past_medical_history", "past_surgical_history"}  # "CVA 2015" in the PMH is not this admission
SPAN_GROUP = "engine_cues"
SPAN_READERS = ("medspacy_sectionizer", "medspacy_context")
_DIRECTIONS = {"forward": "FORWARD", "backward": "BACKWARD", "bidirectional": "BIDIRECTIONAL"}


@dataclass(frozen=True, slots=True)
class Context:
    """What medspaCy says about one mention: its flags, sentence span and section."""

    flags: frozenset[str]
    sentence_start: int
    sentence_end: int
    section: str | None


def _quiet_logs() -> None:
    import warnings

    from loguru import logger

    warnings.filterwarnings("ignore", message=r"\[W036\]")  # a ConText/sectionizer matcher with no rules of a kind
    for name in ("PyRuSH", "PyFastNER", "quicksectx"):
        logger.disable(name)


SENTENCE_END = frozenset({".", "!", "?", ";"})


def _line_sentences(doc):
    """Sentence starts at line breaks and after . ! ? ; (PyRuSH is 10x slower: measured 0.29 s per 4,200-char note,
    90% of it in its rules; ConText only needs the sentence around each mention). The doc is rebuilt with its
    sentence starts in one go: setting them token by token re-checks the whole doc each time."""
    from spacy.tokens import Doc

    words = [token.text for token in doc]
    spaces = [bool(token.whitespace_) for token in doc]
    starts = [True] + [words[i - 1] in SENTENCE_END or (_line_break_before(doc, i) and not words[i][:1].islower())
                       for i in range(1, len(words))]
    return Doc(doc.vocab, words=words, spaces=spaces, sent_starts=starts[: len(words)])


def _line_break_before(doc, index: int) -> bool:
    """A line break just before token `index`. A line that goes on in lower case ('No history of\ndiabetes') is a
    wrapped sentence, not a new one (the caller checks the case)."""
    previous = doc[index - 1]
    return "\n" in previous.text or "\n" in previous.whitespace_


@lru_cache(maxsize=8)
def clinical_pipeline(rules: tuple[ContextRuleSpec, ...] = (), sentences: str = "lines"):
    """medspaCy's tokenizer, sentences (line/punctuation rules, or PyRuSH), the sectionizer and ConText over our
    span group; loaded once per process."""
    _quiet_logs()
    import medspacy
    from medspacy.context import ConTextRule
    from spacy.language import Language

    if sentences == "pyrush":
        nlp = medspacy.load(medspacy_enable=["medspacy_tokenizer", "medspacy_pyrush"])
    else:
        if "engine_line_sentences" not in Language.factories:
            Language.component("engine_line_sentences", func=_line_sentences)
        nlp = medspacy.load(medspacy_enable=["medspacy_tokenizer"])
        nlp.add_pipe("engine_line_sentences")
    nlp.add_pipe("medspacy_sectionizer", config={"input_span_type": "group", "span_group_name": SPAN_GROUP})
    context = nlp.add_pipe("medspacy_context", config={"input_span_type": "group", "span_group_name": SPAN_GROUP})
    extra = [_rule(nlp, ConTextRule, r) for r in rules]
    if extra:
        context.add(extra)
    return nlp


def _rule(nlp, rule_class, rule: ContextRuleSpec):
    """A token pattern under a literal of its own: medspaCy keys rules by literal, so a phrase it already has
    ('ruled out', forward) would otherwise hide the job's rule for the same words in another direction."""
    pattern = [{"LOWER": token.lower_} for token in nlp.make_doc(rule.phrase) if not token.is_space]
    literal = f"{rule.phrase} (engine {rule.flag} {rule.direction})"
    return rule_class(literal, ENGINE_CATEGORIES[rule.flag], direction=_DIRECTIONS[rule.direction], pattern=pattern)


def contexts(text: str, spans: list[tuple[int, int]], rules: tuple[ContextRuleSpec, ...] = (),
             sentences: str = "lines") -> list[Context]:
    """One Context per (start, end) character span, in the order given. Overlapping spans are fine."""
    if not spans:
        return []
    nlp = clinical_pipeline(rules, sentences)
    doc = nlp.make_doc(text)
    order: list[int] = []
    for name, component in nlp.pipeline:
        if name in SPAN_READERS and SPAN_GROUP not in doc.spans:  # the sentence step may rebuild the doc
            doc.spans[SPAN_GROUP], order = _span_group(doc, spans)
        doc = component(doc)
    found: list[Context | None] = [None] * len(spans)
    for index, span in zip(order, doc.spans[SPAN_GROUP]):
        found[index] = _context_of(span)
    return [c if c is not None else Context(frozenset(), s, e, None) for c, (s, e) in zip(found, spans)]


def _span_group(doc, spans: list[tuple[int, int]]) -> tuple[list, list[int]]:
    group, order = [], []
    for index, (start, end) in enumerate(spans):
        span = doc.char_span(start, end, label="CUE", alignment_mode="expand")
        if span is not None:
            group.append(span)
            order.append(index)
    return group, order


def _near_title(span) -> bool:
    """In the section's first paragraph: a sectionizer that misses the next header ('Course:') would otherwise
    make the rest of the note, labs included, a family history."""
    title = span._.section_title
    if title is None:
        return True
    return "\n\n" not in span.doc.text[title.end_char:span.start_char].replace(" ", "").replace("\t", "")


def _context_of(span) -> Context:
    flags = {CONTEXT_CATEGORIES[m.category] for m in span._.modifiers if m.category in CONTEXT_CATEGORIES}
    section = span._.section_category
    if section in FAMILY_SECTIONS and _near_title(span):
        flags.add("family")
    if section in HISTORY_SECTIONS:
        flags.add("historical")
    sentence = span.sent
    return Context(frozenset(flags), sentence.start_char, sentence.end_char, section)


def near(text: str, start: int, end: int, context: Context, width: int) -> tuple[int, int]:
    """The span around a mention [start, end) where its date or choice is read: its sentence, on its line, within
    `width` characters either side."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    left = context.sentence_start if context.sentence_start <= start and context.sentence_end > start else line_start
    right = context.sentence_end if context.sentence_end >= end else line_end
    return max(line_start, left, start - width), min(line_end, right, end + width)


def quote_around(text: str, start: int, end: int, context: Context, limit: int) -> str:
    """A verbatim quote on one line holding [start, end): the sentence, cut to `limit` characters around it."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    left = max(line_start, context.sentence_start if context.sentence_start <= start else line_start)
    right = min(line_end, context.sentence_end if context.sentence_end >= end else line_end)
    if right - left > limit:
        room = max(limit - (end - start), 0)
        left = max(left, start - room // 2)
        right = min(right, left + limit)
        left = max(left, right - limit)
    return text[left:right].strip()

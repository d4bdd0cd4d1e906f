"""Ground: find each evidence quote in its note, exactly or by fuzzy alignment (rapidfuzz), and keep the span.

Quotes cannot hold a newline (the grammar forbids escapes), so a quote across a line break, a CRLF or a
non-breaking space is written with a plain space: alignment runs on a folded copy of the note (whitespace runs
-> one space, case folded character by character) with a map back to the original offsets.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
from rapidfuzz import fuzz
from engine.stages import require_columns

REQUIRED_COLUMNS = ("evidence", "text")  # what this stage reads

FUZZY_MIN_SCORE = 90.0
GROUNDING_COLUMNS = {"evidence_start": pa.int32(), "evidence_end": pa.int32(), "grounding": pa.string()}
_WHITESPACE = re.compile(r"\s+")


def fold(text: str) -> tuple[str, list[int]]:
    """(folded text, original offset of each folded character); folding never changes length per character."""
    chars, offsets = [], []
    for match in re.finditer(r"\s+|\S", text):
        piece = match.group()
        if piece[0].isspace():
            chars.append(" ")
        else:
            lower = piece.lower()
            chars.append(lower if len(lower) == 1 else piece)
        offsets.append(match.start())
    return "".join(chars), offsets


def locate(evidence: str | None, text: str) -> tuple[int | None, int | None, str | None]:
    """(start, end, status) of a quote in the note: exact, fuzzy or not_found; (None, None, None) without a quote."""
    if not evidence:
        return None, None, None
    start = text.find(evidence)
    if start >= 0:
        return start, start + len(evidence), "exact"
    quote, _ = fold(_WHITESPACE.sub(" ", evidence.strip()))
    if len(quote) < 3:
        return None, None, "not_found"
    folded, offsets = fold(text)
    span = _original_span(folded.find(quote), len(quote), offsets, text)
    if span:
        return (*span, "exact" if text[span[0]:span[1]] == evidence else "fuzzy")
    alignment = fuzz.partial_ratio_alignment(quote, folded, score_cutoff=FUZZY_MIN_SCORE)
    if alignment is None:
        return None, None, "not_found"
    span = _original_span(alignment.dest_start, alignment.dest_end - alignment.dest_start, offsets, text)
    return (*span, "fuzzy") if span else (None, None, "not_found")


def _original_span(start: int, length: int, offsets: list[int], text: str) -> tuple[int, int] | None:
    if start < 0 or length <= 0:
        return None
    last = start + length - 1
    end = offsets[last + 1] if last + 1 < len(offsets) else len(text)
    while end > offsets[last] + 1 and text[end - 1].isspace():  # a folded space stands for a whole whitespace run
        end -= 1
    return offsets[start], end


def ground_evidence(batch: pa.Table, keep_text: bool = False) -> pa.Table:
    """Only rows with a quote are looked at; the note text is read through its dictionary (once per note).
    The text column is dropped unless `keep_text` (verify reads it next)."""
    require_columns(batch, "ground", REQUIRED_COLUMNS)
    n = batch.num_rows
    starts, ends, statuses = [None] * n, [None] * n, [None] * n
    evidence = batch["evidence"].combine_chunks()
    quoted = pc.indices_nonzero(pc.fill_null(pc.greater(pc.utf8_length(evidence), 0), False)).to_pylist()
    if quoted:
        text_of = text_lookup(batch["text"].combine_chunks())
        quotes = evidence.take(pa.array(quoted)).to_pylist()
        for row, quote in zip(quoted, quotes):
            starts[row], ends[row], statuses[row] = locate(quote, text_of(row))
    for name, values in zip(GROUNDING_COLUMNS, (starts, ends, statuses)):
        batch = batch.append_column(name, pa.array(values, GROUNDING_COLUMNS[name]))
    return batch if keep_text else batch.drop_columns(["text"])


def text_lookup(text: pa.Array):
    """Row -> note text of a (possibly dictionary-encoded) text column."""
    if pa.types.is_dictionary(text.type):
        indices, dictionary = text.indices, text.dictionary
        return lambda row: dictionary[indices[row].as_py()].as_py()
    return lambda row: text[row].as_py()

"""Ground: find each evidence quote in its note, exactly or by fuzzy alignment (rapidfuzz), and keep the span."""

from __future__ import annotations

import re

import pyarrow as pa
from rapidfuzz import fuzz

FUZZY_MIN_SCORE = 90.0
GROUNDING_COLUMNS = {"evidence_start": pa.int32(), "evidence_end": pa.int32(), "grounding": pa.string()}


def locate(evidence: str | None, text: str) -> tuple[int | None, int | None, str | None]:
    """(start, end, status) of a quote in the note: exact, fuzzy or not_found; (None, None, None) without a quote."""
    if not evidence:
        return None, None, None
    start = text.find(evidence)
    if start >= 0:
        return start, start + len(evidence), "exact"
    folded = re.sub(r"\s+", " ", evidence.strip())
    if len(folded) < 3:
        return None, None, "not_found"
    alignment = fuzz.partial_ratio_alignment(folded.lower(), text.lower(), score_cutoff=FUZZY_MIN_SCORE)
    if alignment is None:
        return None, None, "not_found"
    return alignment.dest_start, alignment.dest_end, "fuzzy"


def ground_evidence(batch: pa.Table) -> pa.Table:
    texts = batch["text"].to_pylist()
    found = [locate(evidence, text) for evidence, text in zip(batch["evidence"].to_pylist(), texts)]
    for position, (name, dtype) in enumerate(GROUNDING_COLUMNS.items()):
        batch = batch.append_column(name, pa.array([row[position] for row in found], dtype))
    return batch.drop_columns(["text"])

"""engine.stages.ground: each evidence quote is found in its note, exactly or fuzzily, with its character span."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from engine.stages.ground import GROUNDING_COLUMNS, ground_evidence, locate

NOTE = (
    "Discharge Summary\r\nPt is a 78 yo woman with atrial fibrillation on warfarin.\r\n"
    "Labs: Creatinine 1.4 mg/dL, Hgb 8.9 g/dL.\r\nEF 35%. Denies chest pain."
)


def overlaps(span: tuple, start: int, end: int) -> bool:
    return span[0] is not None and span[0] < end and start < span[1]


def odd_note(length: int = 20_000, seed: int = 7) -> str:
    """A long note full of characters that trip offset arithmetic: µ, ≥, NBSP, emoji, CRLF, tabs, accents."""
    rng = random.Random(seed)
    pieces = ["Vanc trough 15 \u00b5g/mL", "INR \u2265 2.0", "BP\u00a0140/90", "pt smiling \U0001F600", "\r\n",
              "\t", "caf\u00e9 au lait", "K+ 4.1", "\u00bd tab", "no AF", "\u2014 see above \u2014", "  "]
    out = []
    while sum(len(p) for p in out) < length:
        out.append(rng.choice(pieces))
        out.append(" ")
    return "".join(out)[:length]


# --- exact ------------------------------------------------------------------------------------------------

def test_exact_match_gives_the_span():
    quote = "Creatinine 1.4 mg/dL"
    start = NOTE.index(quote)
    assert locate(quote, NOTE) == (start, start + len(quote), "exact")


def test_exact_match_takes_the_first_occurrence():
    note = "EF 35%. later: EF 35%."
    assert locate("EF 35%", note) == (0, 6, "exact")


@pytest.mark.parametrize("evidence", [None, ""])
def test_no_evidence_gives_no_span_and_no_status(evidence):
    assert locate(evidence, NOTE) == (None, None, None)


# --- fuzzy ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quote, real", [
    ("atrial  fibrillation   on warfarin", "atrial fibrillation on warfarin"),  # extra whitespace
    ("ATRIAL FIBRILLATION ON WARFARIN", "atrial fibrillation on warfarin"),  # case
    ("atrial fibrilation on warfarin", "atrial fibrillation on warfarin"),  # one character missing
    ("atrial fibrillation on warfarim", "atrial fibrillation on warfarin"),  # one character wrong
    ("creatinine 1.4 mg/dl", "Creatinine 1.4 mg/dL"),
    ("  Hgb 8.9 g/dL. ", "Hgb 8.9 g/dL."),
])
def test_fuzzy_match_overlaps_the_real_place(quote, real):
    start = NOTE.index(real)
    span = locate(quote, NOTE)
    assert span[2] in ("fuzzy", "exact")
    if quote.strip() != real:
        assert span[2] == "fuzzy"
    assert overlaps(span, start, start + len(real)), (span, NOTE[span[0]:span[1]] if span[0] is not None else None)
    assert 0 <= span[0] < span[1] <= len(NOTE)


@pytest.mark.parametrize("quote", ["metastatic pancreatic cancer", "Hx of stroke in 2019", "xyz", "zq"])
def test_quote_that_is_not_there_is_not_found(quote):
    assert locate(quote, NOTE) == (None, None, "not_found")


# --- a long note with odd characters -----------------------------------------------------------------------

def test_long_note_with_odd_characters_exact_and_fuzzy():
    note = odd_note()
    assert len(note) == 20_000
    planted = "Serum creatinine peaked at 2.7 mg/dL \u2265 baseline (\u00b5mol 239)"
    at = 15_003
    note = note[:at] + planted + note[at:]
    assert locate(planted, note) == (at, at + len(planted), "exact")
    typo = planted.replace("peaked", "peeked").replace("Serum", "serum")
    span = locate(typo, note)
    assert span[2] == "fuzzy" and overlaps(span, at, at + len(planted))
    assert abs(span[0] - at) <= 2 and abs(span[1] - (at + len(planted))) <= 2
    assert locate("mitral stenosis requiring valve replacement surgery", note)[2] == "not_found"


def test_exact_spans_are_python_string_offsets_after_emoji_and_crlf():
    note = "\U0001F600\U0001F600\r\n\u00a0\u00b5 AF noted\r\n"
    start, end, status = locate("AF noted", note)
    assert status == "exact" and note[start:end] == "AF noted"


def test_quote_across_a_line_break_or_nbsp_is_found():
    note = "Vitals: BP\u00a0140/90, HR 88.\r\nLabs: Hgb 8.9 g/dL.\r\nEF 35%. Denies chest pain."
    cases = {"BP 140/90": "BP\u00a0140/90", "8.9 g/dL. EF 35%": "8.9 g/dL.\r\nEF 35%", "HR 88. Labs": "HR 88.\r\nLabs"}
    missed = {}
    for quote, real in cases.items():
        start = note.index(real)
        span = locate(quote, note)
        if span[2] not in ("exact", "fuzzy") or not overlaps(span, start, start + len(real)):
            missed[quote] = span
    assert missed == {}


def test_fuzzy_span_covers_the_whole_quoted_text_across_crlf():
    note = "Labs on admission: Creatinine\r\n1.4 mg/dL on admission, improving."
    real = "Creatinine\r\n1.4 mg/dL on admission"
    start = note.index(real)
    span = locate("Creatinine 1.4 mg/dL on admission", note)
    assert span[2] == "fuzzy"
    assert span[:2] == (start, start + len(real)), repr(note[span[0]:span[1]])


def test_fuzzy_span_is_not_shifted_by_characters_that_lowercase_to_two():
    note = "\u0130zmir trip. " * 3 + "Hx: atrial fibrillation on warfarin."
    real = "atrial fibrillation on warfarin"
    start = note.index(real)
    span = locate("Atrial fibrilation on warfarin", note)
    assert span[2] == "fuzzy"
    assert abs(span[0] - start) <= 1 and abs(span[1] - (start + len(real))) <= 1, repr(note[span[0]:span[1]])


# --- the batch function ------------------------------------------------------------------------------------

def test_ground_evidence_adds_span_columns_and_drops_the_text():
    texts = pa.DictionaryArray.from_arrays(pa.array([0, 0, 0, 1], pa.int32()), pa.array([NOTE, "short note, no AF"]))
    table = pa.table({
        "note_id": ["a", "a", "a", "b"],
        "text": texts,
        "evidence": pa.array(["Hgb 8.9 g/dL", None, "metastatic pancreatic cancer", "no AF"], pa.string()),
    })
    out = ground_evidence(table)
    assert "text" not in out.column_names
    assert out.column_names == ["note_id", "evidence", *GROUNDING_COLUMNS]
    for name, dtype in GROUNDING_COLUMNS.items():
        assert out.schema.field(name).type == dtype
    hgb = NOTE.index("Hgb 8.9 g/dL")
    assert out["evidence_start"].to_pylist() == [hgb, None, None, 12]
    assert out["evidence_end"].to_pylist() == [hgb + 12, None, None, 17]
    assert out["grounding"].to_pylist() == ["exact", None, "not_found", "exact"]

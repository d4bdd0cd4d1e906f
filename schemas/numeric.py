"""Answer to a numeric question: a short verbatim quote, then the value and its unit, or null when not in note."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

EVIDENCE_MAX_CHARS = 120
# A JSON number has no digit limit, so a weak model can write 1.000000... forever; this pattern cannot.
# Written without {m,n}: xgrammar 0.2.8 does not enforce bounded repetition inside a pattern (measured: it let
# "444444444" through {1,7}). No max_length beside it: vLLM rejects pattern plus length bounds for xgrammar.
INTEGER_DIGITS, DECIMAL_DIGITS = 7, 3


def number_pattern(integer_digits: int = INTEGER_DIGITS, decimal_digits: int = DECIMAL_DIGITS) -> str:
    """Regex for a plain decimal number with at most this many digits before and after the point."""
    return "^[0-9]" + "[0-9]?" * (integer_digits - 1) + r"(\.[0-9]" + "[0-9]?" * (decimal_digits - 1) + ")?$"


NUMBER_PATTERN = number_pattern()
UNIT_MAX_CHARS = 16


class NumericAnswer(BaseModel):
    """`value` null means the note does not report it. The engine narrows `unit` to the question's units."""

    model_config = ConfigDict(extra="forbid")

    evidence: str = Field(
        max_length=EVIDENCE_MAX_CHARS,
        description="Shortest verbatim quote from the note that contains the value; empty if not in note.",
    )
    value: Annotated[str, Field(pattern=NUMBER_PATTERN)] | None = Field(
        description="The number as written (digits, optional decimals), or null if the note does not report it."
    )
    unit: Annotated[str, Field(max_length=UNIT_MAX_CHARS)] | None = Field(
        description="Unit of the value, or null if the note does not report it."
    )

    def number(self) -> float | None:
        return None if self.value is None else float(self.value)

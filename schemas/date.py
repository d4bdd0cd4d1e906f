"""Answer to a date question: a short verbatim quote, the date phrase as the note writes it, and the ISO date it
names (resolved against the note's time), or nulls when the note does not give it."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

EVIDENCE_MAX_CHARS = 120
PHRASE_MAX_CHARS = 40
# Written out digit by digit, no {m,n}: xgrammar does not enforce bounded repetition inside a pattern (schemas/numeric.py).
# Months 01-12 and days 01-31 by pattern; a day the month lacks (2026-02-30) fails parsing as a date and is an error row.
ISO_DATE_PATTERN = r"^[12][0-9][0-9][0-9]-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"


class DateAnswer(BaseModel):
    """`date` null means the note does not say when. `phrase` is kept as evidence of how the date was written."""

    model_config = ConfigDict(extra="forbid")

    evidence: str = Field(
        max_length=EVIDENCE_MAX_CHARS,
        description="Shortest verbatim quote from the note that contains the event and its date; empty if not in note.",
    )
    phrase: Annotated[str, Field(max_length=PHRASE_MAX_CHARS)] | None = Field(
        description="The date exactly as the quote writes it (2026-03-02, 3/2/2026, March 2, 2 weeks ago, last March, "
        "POD 3), or null if not in note."
    )
    date: Annotated[str, Field(pattern=ISO_DATE_PATTERN)] | None = Field(
        description="The date the phrase names, as YYYY-MM-DD, counted from the note's date for relative phrases; "
        "null if not in note."
    )

"""Answer to a yes/no question: a short verbatim quote, then yes, no or not_in_note."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EVIDENCE_MAX_CHARS = 120


class YesNoAnswer(BaseModel):
    """`not_in_note` is its own outcome: the note says nothing either way (distinct from an explicit no)."""

    model_config = ConfigDict(extra="forbid")

    evidence: str = Field(
        max_length=EVIDENCE_MAX_CHARS,
        description="Shortest verbatim quote from the note that supports the answer; empty if not in note.",
    )
    answer: Literal["yes", "no", "not_in_note"] = Field(description="yes, no, or not_in_note.")

"""Answer to a categorical question: a short verbatim quote, then one of the question's declared choices, or null."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

EVIDENCE_MAX_CHARS = 120
CHOICE_MAX_CHARS = 40  # as the job's choices


class CategoricalAnswer(BaseModel):
    """`choice` null means the note does not say. The engine narrows `choice` to the question's `choices`."""

    model_config = ConfigDict(extra="forbid")

    evidence: str = Field(
        max_length=EVIDENCE_MAX_CHARS,
        description="Shortest verbatim quote from the note that supports the choice; empty if not in note.",
    )
    choice: Annotated[str, Field(max_length=CHOICE_MAX_CHARS)] | None = Field(description="One of the question's choices, or null if the note does not say.")

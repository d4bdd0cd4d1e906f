"""The model interface: start once per actor, answer a batch of (note, question) requests, close."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

from engine.plan import Plan, PlannedQuestion

# The start of a row's error when its model server could not be reached after retries (backend openai): such rows
# are no answer about the note, and a re-run of the same job asks them again (engine.run, `rows to redo`).
SERVER_UNAVAILABLE = "model server unavailable"


class Request(NamedTuple):
    """One (note, question). A tuple: millions are made per run, so it must be cheap."""

    note_key: str
    note_text: str  # the note, or (hybrid, model_sees: windows) the text around the question's cue mentions
    question: PlannedQuestion
    hint: str = ""  # hybrid: the cue mentions and their context, told to the model after the question


@dataclass(slots=True)
class Generation:
    """What the model wrote for one request, with its token accounting. `text` None means no output; token counts
    None where no model answered (a request the server never took)."""

    text: str | None
    finish_reason: str = "stop"
    prompt_tokens: int | None = 0
    cached_tokens: int | None = 0
    completion_tokens: int | None = 0
    truncated: bool = False
    error: str | None = None


class Backend(ABC):
    """Subclasses load their model in __init__ (once per actor) and must return one Generation per Request."""

    name: str = "backend"

    def __init__(self, plan: Plan):
        self.plan = plan

    @property
    def model_name(self) -> str:
        return self.plan.job.model.name

    @abstractmethod
    def generate(self, requests: list[Request]) -> list[Generation]:
        """Answer every request; a per-request failure is a Generation with `error`, never an exception."""

    def constant_answers(self) -> dict[str, str] | None:
        """question id -> output, for a backend whose answer depends only on the question (null); the generate
        stage then fills whole columns instead of building a request per row. None for real models."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""

"""Answer models: what the model may write for each kind of question. Every field is bounded."""

from schemas.categorical import CategoricalAnswer
from schemas.date import DateAnswer
from schemas.numeric import NumericAnswer
from schemas.yes_no import YesNoAnswer

__all__ = ["CategoricalAnswer", "DateAnswer", "NumericAnswer", "YesNoAnswer"]

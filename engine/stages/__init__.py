"""Pipeline stages: pure functions over a pyarrow batch (only generate holds state: the model).

Each stage names the columns it reads (`REQUIRED_COLUMNS` in its module) and checks them on entry, so a batch
that lacks one fails with the stage's name, what is missing and what the batch has, not a bare KeyError deep
inside pyarrow.
"""

from __future__ import annotations

import pyarrow as pa


class StageInputError(ValueError):
    """A batch reached a stage without a column the stage reads (a wiring bug, or a hand-built batch)."""


def require_columns(batch: pa.Table, stage: str, names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in batch.column_names]
    if missing:
        raise StageInputError(f"stage {stage} needs column(s) {', '.join(missing)}; the batch has: "
                              f"{', '.join(batch.column_names) or 'no columns'}")

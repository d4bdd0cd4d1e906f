"""engine: batch extraction of single-order answers from clinical notes, for trial cohort screening."""

__version__ = "0.1.0"

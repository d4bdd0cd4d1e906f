"""Tools for tests and benchmarks, not used by a run: the synthetic-note generator, the in-process runner, candidate recall."""

"""Pipeline stages: pure functions over a pyarrow batch (only generate holds state: the model)."""

"""From answers to a cohort: roll-up to patients (rollup, columnar), units, rules, and the SQL sandbox they share (sql)."""

# The README's two commands: `make demo` and `make test`. Both install what they need first.
.PHONY: install install-test demo test adapter

install:
	EXTRAS=cpu bash scripts/install.sh

install-test:
	EXTRAS=cpu,test,train bash scripts/install.sh

# The demo screens the first 24 of the 64 bundled notes (about 6 minutes on 2 CPU cores); the job itself has no limit.
demo: install
	.venv/bin/python -m engine run jobs/apixaban.yaml --limit 24

test: install-test
	.venv/bin/python -m pytest -q tests

# The distillation recipe behind README's "Distillation" figures: training data from the bundled notes' cue answers and
# 150 synthetic patients (never data/heldout*), then a rank-8 LoRA adapter of the embedded model (about an hour on 2
# CPU cores; resumes from its last checkpoint). Serve it with `model.adapter: out/adapter` in a job.
adapter: install-test
	.venv/bin/python -m engine synth jobs/apixaban.yaml --output out/synth --notes data/sample_notes.parquet --synthetic-patients 150 --window-chars 2000 --max-prompt-tokens 1100 --n 480
	.venv/bin/python -m engine train jobs/apixaban.yaml --data out/synth --output out/adapter --learning-rate 5e-4 --max-steps 60 --save-steps 20

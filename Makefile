# The README's two commands: `make demo` and `make test`. Both install what they need first.
.PHONY: install install-test demo test

install:
	EXTRAS=cpu bash scripts/install.sh

install-test:
	EXTRAS=cpu,test,train bash scripts/install.sh

# The demo screens the first 24 of the 64 bundled notes (about 6 minutes on 2 CPU cores); the job itself has no limit.
demo: install
	.venv/bin/python -m engine run jobs/apixaban.yaml --limit 24

test: install-test
	.venv/bin/python -m pytest -q tests

# The README's two commands: `make demo` and `make test`. Both install what they need first.
.PHONY: install install-test demo test

install:
	EXTRAS=cpu bash scripts/install.sh

install-test:
	EXTRAS=cpu,test bash scripts/install.sh

demo: install
	.venv/bin/python -m engine run jobs/apixaban.yaml

test: install-test
	.venv/bin/python -m pytest -q tests

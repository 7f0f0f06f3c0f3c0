# The two commands of the README:
#   make bench  - install ectransfer (CPU torch) into .venv and run ectransfer-bench (fs default)
#   make test   - install everything the tests need (apt + pip) and run lint, types and tests
PY ?= python3
VENV ?= .venv

.PHONY: bench test env-bench env-test lint pytest

bench: env-bench
	$(VENV)/bin/ectransfer-bench

test: env-test lint pytest

env-bench:
	bash scripts/setup-env.sh bench

env-test:
	bash scripts/setup-env.sh test

lint:
	$(VENV)/bin/ruff check ectransfer tests benchmarks scripts examples
	$(VENV)/bin/mypy

pytest:
	$(VENV)/bin/python -m pytest -p no:cacheprovider

# Developer and CI entry points. Every target that runs code first makes sure
# .venv exists and matches pyproject.toml; the stamp file keeps that a no-op
# when nothing changed, so `make test` stays fast on repeat runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp
BENCH_STAMP := $(VENV)/.stamp-bench
PYTEST_ARGS ?=
# e.g. PIP_CONSTRAINTS='-c constraints/minimum.txt' (the CI minimum-versions job)
PIP_CONSTRAINTS ?=
BENCH_ARGS ?=

.PHONY: venv demo test reliability bench clean

venv: $(STAMP)

# Re-run the install whenever pyproject.toml changes (new dependency, extra...).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[kms,asyncio,alembic,progress]' --group test $(PIP_CONSTRAINTS)
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --group bench
	touch $@

demo: venv
	$(BIN)/sa-envelope demo

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Faults, crashes, concurrency and tampering; ends with the reliability figures.
reliability: venv
	$(BIN)/python -m pytest -q -m reliability tests

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# Keeps .sa_envelope/ (a development master key: deleting it makes data unreadable)
# and benchmarks/results/.
clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis sa_envelope_demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

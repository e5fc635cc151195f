# The README's two commands: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-cluster compile lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned to the machine's CPU build, so the package's torch range installs nothing more.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,dicom-codecs]"
	touch $(STAMP)

# medood is installed editable, so pip compiles none of it; where PYTHONDONTWRITEBYTECODE is set every
# Ray worker would compile it again (seconds per process). Stale files are ignored by Python's checks.
compile: $(STAMP)
	$(BIN)/python -m compileall -q medood

demo: compile
	$(BIN)/medood demo --out runs/demo

# Everything, the two-node cluster tests (issue 15) included; `make test-cluster` runs those alone.
test: compile
	$(BIN)/python -m pytest -q --durations=15

test-cluster: compile
	$(BIN)/python -m pytest -q -m cluster

lint: $(STAMP)
	$(BIN)/ruff check medood tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# The course in two commands: `make course` and `make test` (see README.md).
# Both create .venv on first use and install the course package into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra pip arguments, e.g. a CPU-only torch index:
#   make course PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_ARGS ?=
# Extra papermill parameters for `make course`, e.g. PARAMS="-p seed 1"
PARAMS ?=
OUT ?= outputs
# Full-scale runs (README, "Full-scale runs"): a configuration file or folder, the data root, the runs folder
CONFIG ?= configs
DATA ?= $(if $(MUX_DATA_ROOT),$(MUX_DATA_ROOT),data)
RUNS ?= runs

.PHONY: install course test lab notebooks check-notebooks clean full report

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_ARGS) -e ".[dev]"
	@touch $(STAMP)

course: $(STAMP)
	$(PY) -m mux.runner.course run --notebooks notebooks --out $(OUT) $(PARAMS)

# Run full-scale configurations into $(RUNS)/<name>/ (skips finished runs, resumes interrupted ones)
full: $(STAMP)
	$(PY) -m mux.runner.course full $(CONFIG) --data-root $(DATA) --runs $(RUNS) $(PARAMS)

# Every run beside the papers' figures: $(RUNS)/report.md and $(RUNS)/report.png
report: $(STAMP)
	$(PY) -m mux.runner.course report --runs $(RUNS)

# Test files run on as many workers as the machine has cores (pytest-xdist), each file whole on one
# worker (its fixtures and its order kept); one torch thread a worker (tests/conftest.py).
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests notebooks --nbval-lax --nbval-current-env

# Re-execute the notebooks in place, so the committed copies carry their default run's outputs.
notebooks: $(STAMP)
	$(PY) -m mux.runner.course refresh --notebooks notebooks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

check-notebooks:
	$(PYTHON) ../shared/tools/check_notebooks.py notebooks

clean:
	rm -rf $(OUT) notebooks/outputs .pytest_cache

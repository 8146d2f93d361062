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

.PHONY: install course test lab notebooks check-notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_ARGS) -e ".[dev]"
	@touch $(STAMP)

course: $(STAMP)
	$(PY) -m mux.course run --notebooks notebooks --out $(OUT) $(PARAMS)

test: $(STAMP)
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env

# Re-execute the notebooks in place, so the committed copies carry their default run's outputs.
notebooks: $(STAMP)
	$(PY) -m mux.course refresh --notebooks notebooks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

check-notebooks:
	$(PYTHON) ../shared/tools/check_notebooks.py notebooks

clean:
	rm -rf $(OUT) notebooks/outputs .pytest_cache

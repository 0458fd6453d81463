# Two commands a newcomer needs:  `make demo`  and  `make test`.
# Both create ./.venv on first use and install the project into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch: 2.13.0 is the floor of the project's range. On the development/CI machines a CPU wheel
# of exactly this version lies on disk (pip's find-links), so no multi-GB CUDA download happens.
# GPU users: `make setup TORCH_SPEC="torch>=2.13"` (or any CUDA build) works too.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Pin everything else to the tested set; `make setup CONSTRAINTS=` installs the newest allowed.
CONSTRAINTS ?= -c requirements.lock

.PHONY: setup demo test lint bench audit compose-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" $(CONSTRAINTS)
	touch $@

demo: setup
	$(PY) scripts/demo.py

# import contracts (DESIGN's package boundaries), style + bug patterns (ruff), formatting, a reason on
# every `# noqa`, types of the contracts, server and worker (mypy)
lint: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/check_noqa.py
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: setup
	$(PY) bench/train_throughput.py

# The compose stack from a fresh clone of HEAD: build, up, two chained rounds with worker
# containers killed, lineage, down -v (15-25 minutes on 2 cores; needs Docker; README "Running it for real").
compose-smoke: setup
	$(PY) scripts/compose_smoke.py

# Known-vulnerability audit of the locked set (needs the PyPI JSON API or OSV reachable).
audit: setup
	$(VENV)/bin/pip-audit --disable-pip --no-deps -r requirements.lock

clean:
	rm -rf $(VENV) demo-data halos-data .pytest_cache

# deepmosaic: `make demo` and `make test` are the quickstart; both create/update .venv/ first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all bench slurm-up slurm-down clean

venv: $(STAMP)

# Idempotent: re-runs pip only when pyproject.toml or constraints.txt changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: venv
	$(BIN)/deepmosaic demo --out demo_out

test: venv
	$(BIN)/python -m pytest -q

# Everything, including slow tests (long benchmarks and training stay in benchmarks/).
test-all: venv
	RUN_SLOW=1 $(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/bench_sep_tiling.py

# A single-node Slurm for the `slurm` tests (installs it if missing; root, Debian): up is idempotent.
slurm-up:
	.ci/slurm-up.sh

slurm-down:
	.ci/slurm-down.sh

clean:
	rm -rf demo_out .pytest_cache .hypothesis

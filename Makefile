# Two commands: `make demo` (whole workflow on the built-in demo data) and `make test`.
# Both create the virtual environment .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2
# The CPU build of PyTorch; on a GPU machine pass e.g. TORCH="torch==2.13.0 --index-url ..."
TORCH  ?= torch==2.13.0

.PHONY: demo report test test-slurm env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: env
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	$(BIN)/python -m precip_cvae.headline results/demo

# All figures and tables of the demo in one HTML file (after `make demo`)
report: env
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml --report report.html

# Two pytest-xdist workers (TEST_WORKERS=0: one process); tests that share a built fixture stay together
TEST_WORKERS ?= 2
test: env
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# Only the SLURM tests (root: installs and starts a one-node SLURM with .ci/slurm.sh; docs/hpc.md)
test-slurm: env
	$(BIN)/python -m pytest -q -rs tests/test_slurm.py

clean:
	rm -rf results data/demo data/tiny .snakemake

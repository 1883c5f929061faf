# pixgen — common tasks. `make install data` sets up and builds the mixing sets; `make test` tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIXGEN  := $(BIN)/pixgen

.PHONY: install data experiment claim test bench clean

install: $(BIN)/pixgen

# torch and torchvision come from the registry as a matching pair (never a local "+cpu" wheel,
# with which torchvision fails to import); torchattacks goes in without its stale `requests` pin.
$(BIN)/pixgen: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q 'torch>=2.14' 'torchvision>=0.29'
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps 'torchattacks==3.5.1'
	touch $@

# The featvis network: wk-small, 3 epochs (98.6% test accuracy is plenty to visualise).
data: install
	$(PIXGEN) fractals
	$(PIXGEN) train --method standard --arch wk-small --epochs 3 --seed 0 --out "$${PIXGEN_HOME:-data}/models/featvis-wk-small"
	$(PIXGEN) featvis --model "$${PIXGEN_HOME:-data}/models/featvis-wk-small" --out "$${PIXGEN_HOME:-data}/mixing/featvis.zarr"

# The whole study on full MNIST (pipelines/mnist.yaml), cached stage by stage under data/mnist/.
# Two stages at a time, one thread each (2 cores).
experiment: install
	OMP_NUM_THREADS=1 $(PIXGEN) run pipelines/mnist.yaml --jobs 2

# The claim's grid of conditions (pipelines/claim.yaml) in make experiment's root, so the stages
# both files name alike run once; two stages at a time, one thread each.
claim: install
	OMP_NUM_THREADS=1 $(PIXGEN) run pipelines/claim.yaml --root "$${PIXGEN_HOME:-data}/mnist" --jobs 2

test: install
	$(BIN)/pytest -q --durations=15

bench: install
	@$(BIN)/python benchmarks/machine.py
	@for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# Set-up and entry points. `make quickstart` and `make test` each set up a fresh
# clone first: a virtual environment in .venv with the CPU build of torch,
# saesweep and its test tools, and the embedded model and corpus.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup quickstart test smoke clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml requirements-embedded.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -r requirements-embedded.txt
	$(PY) -m saesweep prepare
	touch $@

quickstart: setup
	$(PY) -m saesweep run experiments/quickstart.yaml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

smoke: setup
	$(PY) -m saesweep run experiments/quickstart.yaml --smoke
	$(PY) -m saesweep run experiments/gpt2_all_layers.yaml --smoke --set model.random_weights=true --set data.dataset=embedded

clean:
	rm -rf $(VENV) saesweep_results mlruns mlflow.db

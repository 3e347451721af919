# Everything a fresh clone needs: each target creates its own virtual environment (.venv) and
# installs what it uses, at the exact versions in constraints.txt.
#   make demo   MAT on small slices of Fashion-MNIST and WikiText-2 shipped in examples/data
#               (installs keras-mat with JAX and matplotlib only; no download of data)
#   make test   ruff, then the test suite once per Keras backend (installs everything)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet -c constraints.txt
BACKENDS ?= jax tensorflow torch
DEMO_BACKEND ?= jax
# Optional offline copy of the full data sets for `make compare` (folder layout: docs/data.md).
# Empty: the examples download the official files.
DATA_DIR ?=
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR))

.PHONY: install install-demo demo compare docs test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo's environment: keras-mat, JAX (CPU) and matplotlib.
$(BIN)/.installed-demo: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[jax,plot]"
	touch $@

# Everything: the three backends, keras-hub, plotting, TensorBoard and the test tools.
$(BIN)/.installed-all: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[all]"
	touch $@ $(BIN)/.installed-demo

install: $(BIN)/.installed-all
install-demo: $(BIN)/.installed-demo

# Plain training vs MAT vs Rand on the data in examples/data: prints the comparison table and
# writes the lambda_max heatmap, the masks over time and loss against FLOPs to results/demo/.
demo: $(BIN)/.installed-demo
	KERAS_BACKEND=$${KERAS_BACKEND:-$(DEMO_BACKEND)} $(BIN)/python examples/demo.py --out-dir results/demo

# The short comparisons of the full-size examples (BERT on WikiText-2, VGG on CIFAR-10), with
# Multirate as well; they download the official data unless DATA_DIR names an offline copy.
compare: $(BIN)/.installed-all
	KERAS_BACKEND=$${KERAS_BACKEND:-$(DEMO_BACKEND)} $(BIN)/python examples/bert_wikitext2.py --preset demo $(DATA_FLAG) --out-dir results/compare/bert
	KERAS_BACKEND=$${KERAS_BACKEND:-$(DEMO_BACKEND)} $(BIN)/python examples/vgg_cifar10.py --preset demo $(DATA_FLAG) --out-dir results/compare/vgg

# docs/api.md from the docstrings of keras_mat's public names.
docs: $(BIN)/.installed-demo
	$(BIN)/python docs/make_api.py

# The suite runs once per Keras backend; every backend runs even if one fails.
test: $(BIN)/.installed-all
	$(BIN)/ruff check keras_mat tests examples benchmarks
	@status=0; for b in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$b ==="; \
		KERAS_BACKEND=$$b TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m pytest -q -p no:cacheprovider --doctest-modules keras_mat tests || status=1; \
	done; exit $$status

lint: $(BIN)/.installed-all
	$(BIN)/ruff check keras_mat tests examples benchmarks
	$(BIN)/ruff format --check keras_mat tests examples benchmarks

format: $(BIN)/.installed-all
	$(BIN)/ruff format keras_mat tests examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache

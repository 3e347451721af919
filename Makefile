# Everything a fresh machine needs: `make demo` and `make test` create their own
# virtual environment (.venv) and install the pinned dependencies first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS ?= jax tensorflow torch
DATA_DIR ?= ../shared/data
DEMO_BACKEND ?= jax

.PHONY: install demo tour test lint format clean

$(BIN)/.keras_mat_installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $@

install: $(BIN)/.keras_mat_installed

# Short versions of the BERT / WikiText-2 and VGG / CIFAR-10 comparisons (plain, MAT, Rand,
# Multirate), offline from $(DATA_DIR); each prints its results table.
demo: install
	KERAS_BACKEND=$${KERAS_BACKEND:-$(DEMO_BACKEND)} $(BIN)/python examples/bert_wikitext2.py --preset demo --data-dir $(DATA_DIR) --out-dir results/demo/bert
	KERAS_BACKEND=$${KERAS_BACKEND:-$(DEMO_BACKEND)} $(BIN)/python examples/vgg_cifar10.py --preset demo --data-dir $(DATA_DIR) --out-dir results/demo/vgg

# A one-model tour (Fashion-MNIST conv + attention): lambda_max per head, masks, stopped modules.
tour: install
	KERAS_BACKEND=$${KERAS_BACKEND:-$(DEMO_BACKEND)} $(BIN)/python examples/demo.py --data-dir $(DATA_DIR)

# The suite runs once per Keras backend; every backend runs even if one fails.
test: install
	$(BIN)/ruff check keras_mat tests examples benchmarks
	@status=0; for b in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$b ==="; \
		KERAS_BACKEND=$$b TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m pytest -q -p no:cacheprovider --doctest-modules keras_mat tests || status=1; \
	done; exit $$status

lint: install
	$(BIN)/ruff check keras_mat tests examples benchmarks
	$(BIN)/ruff format --check keras_mat tests examples benchmarks

format: install
	$(BIN)/ruff format keras_mat tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# The README's two commands: `make demo` and `make test`. Each sets up .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= demo_out
# torch and torchvision are pinned: these releases are the ones this project is tested with.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test test-slow bench study clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) data

# Fashion-MNIST from Debian, when we are root with apt and the files are absent.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ -z "$$CLIPCL_DATA" ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	    || echo "note: apt-get could not install dataset-fashion-mnist; clipcl will try torchvision's download"; \
	fi

demo: setup
	$(BIN)/clipcl demo --out $(OUT) --overwrite

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/throughput.py

# The method study of the README (the grid src/clipcl/grids/method-study.yaml, 125 runs per benchmark; 83
# minutes for the three on 2 cores). Run again, it skips finished runs and resumes stopped ones.
SWEEP := $(BIN)/clipcl sweep --jobs 2 --threads-per-job 1
study: setup
	$(SWEEP) fmnist-cil method-study scenario.train_per_class=500 --out benchmarks/out/sweep-fmnist-cil
	$(BIN)/clipcl report benchmarks/out/sweep-fmnist-cil --out benchmarks/results/report-fmnist-cil
	$(SWEEP) fmnist-pre-cil method-study scenario.train_per_class=500 --out benchmarks/out/sweep-fmnist-pre-cil
	$(BIN)/clipcl report benchmarks/out/sweep-fmnist-pre-cil --out benchmarks/results/report-fmnist-pre-cil
	$(SWEEP) fmnist-dil method-study scenario.train_per_class=100 --out benchmarks/out/sweep-fmnist-dil
	$(BIN)/clipcl report benchmarks/out/sweep-fmnist-dil --out benchmarks/results/report-fmnist-dil

clean:
	rm -rf $(OUT) .pytest_cache

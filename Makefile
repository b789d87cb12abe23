# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRA ?= cpu
JOBS ?= 2

.PHONY: demo test test-fast lint bench bench-quick bench-budget coverage install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first so pip takes the local CPU wheel instead of the CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRA),dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m accelc.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) tests

test-fast: $(STAMP)  # the in-process unit tests only (no end-to-end CLI runs)
	$(BIN)/python -m pytest -q -n $(JOBS) -m "not slow" tests

# ruff (lint, the argument-count rule, format check), the size budget (.ci/size_budget.py) and
# the layer contracts (import-linter). import-linter finds a
# package's modules under one folder, while accelc's are mapped from four (pyproject's
# package-dir), so the contracts are checked on a copy assembled the way the package installs.
LINT_TREE := build/lint
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/size_budget.py
	rm -rf $(LINT_TREE) && mkdir -p $(LINT_TREE)/accelc
	cp -r facade/. $(LINT_TREE)/accelc/
	for p in compiler runtime passes; do cp -r $$p $(LINT_TREE)/accelc/$$p; done
	cd $(LINT_TREE) && PYTHONPATH=. ../../$(BIN)/lint-imports --config ../../pyproject.toml

FASHION := /usr/share/datasets/fashion-mnist

$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist; \
	 else echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; exit 2; fi

# the time-to-accuracy protocol (benchmarks/workloads.json: VGG and ResNet at 32x32, largekernel at
# 64x64 on Fashion-MNIST and on its multi-scale canvases, fixed targets on a validation split, 3 seeds);
# writes docs/results/time-to-accuracy.md
bench: $(STAMP) $(FASHION)
	$(BIN)/python benchmarks/protocol.py -o bench-out --results docs/results/time-to-accuracy.md
	$(BIN)/python benchmarks/skip_step_time.py 25
	$(BIN)/python benchmarks/lars_overhead.py 80
	$(BIN)/python benchmarks/reuse_layer.py --repeats 9 -o bench-out/reuse_layer.json
	$(BIN)/python benchmarks/buffer_reuse.py --json bench-out/buffer_reuse.json
	$(BIN)/accelc bench --model vgg --data fashion-mnist --train-limit 4096 --test-limit 1000 --epochs 3 --nproc 2 --repeats 3 -o bench-scaling --force

bench-quick: $(STAMP) $(FASHION)  # one seed, fewer images and epochs: for trying things
	$(BIN)/python benchmarks/protocol.py --quick -o bench-quick

# protocol v2 (docs/time-to-accuracy.md): budgets of 2, 4 and 8 epochs with the linear schedule, each
# trained in full, torch and ort against skip's freezeout rule (benchmarks/budget-freezeout.json);
# writes bench-budget/<workload>/budget-<E>/ and the fronts (fronts.json, .md, .png); ~80 min on 2 cores
bench-budget: $(STAMP) $(FASHION)
	$(BIN)/python benchmarks/protocol.py --budgets 2,4,8 --workloads vgg32,resnet32 --train-limit 8000 --config-file benchmarks/budget-freezeout.json -o bench-budget

coverage: $(STAMP)  # torchvision's and timm's CNNs through every pass: docs/results/model-coverage.md
	$(BIN)/python benchmarks/model_coverage.py -o docs/results/model-coverage

clean:
	rm -rf $(VENV) bench-out bench-scaling demo-out build

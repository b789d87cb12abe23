# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRA ?= cpu
JOBS ?= 2

.PHONY: demo test bench install clean

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

FASHION := /usr/share/datasets/fashion-mnist
BENCH_CONFIGS ?= torch,ort,ort+skip,ort+reuse,ort+reuse[strategy=lh;plateau=0.3],ort+reuse[strategy=off;plateau=0.3],ort+rescale,ort+all[strategy=off;plateau=0.3]
BENCH_EPOCHS ?= 5
BENCH_ARGS ?= --train-limit 20000 --test-limit 5000 --input-shape 1,32,32 --target torch-best-0.2

$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist; \
	 else echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; exit 2; fi

bench: $(STAMP) $(FASHION)
	$(BIN)/accelc bench --model vgg --data fashion-mnist --epochs $(BENCH_EPOCHS) --configs "$(BENCH_CONFIGS)" $(BENCH_ARGS) -o bench-out
	$(BIN)/python benchmarks/skip_step_time.py 25
	$(BIN)/python benchmarks/lars_overhead.py 80
	$(BIN)/python benchmarks/reuse_layer.py --repeats 9 -o bench-out/reuse_layer.json

clean:
	rm -rf $(VENV) bench-out demo-out

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench node-tests clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned: an unpinned torch pulls a several-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch,tvm,dev,ray]'
	touch $(STAMP)

install: $(STAMP)

# The product's point on a real trained model: half its channels pruned, the accuracy healed back
# by distillation, verified, then timed against the original and torch in one run.
SLIM := fold-constants,prune-channels:ratio=0.5,heal:steps=300
demo: $(STAMP)
	$(BIN)/slimgraph inspect digits-cnn
	$(BIN)/slimgraph export digits-cnn -o demo-out/slim --passes $(SLIM) --backend ort-cpu --force
	$(BIN)/slimgraph bench digits-cnn --variants fp32,$(subst $(comma),+,$(SLIM)) --batch 1,16 \
		--peers torch-eager -o demo-out/bench --force

# Two pytest-xdist workers, a test file per worker at a time (module caches stay shared within
# a file; measured 12.5 min against 17-19 serial on 2 cores).
# One BLAS / OpenMP thread per pytest worker: two workers on two cores with two threads each
# oversubscribe them (measured: 13 min 0 s -> 10 min 55 s for the same 1,424 tests).
test: $(STAMP)
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
		$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check slimgraph tests benchmarks

node-tests: $(STAMP)
	$(BIN)/python benchmarks/node_tests.py

# The benchmark suite behind the README's numbers; torch-pruning, hls4ml and qonnx are
# benchmark-only peers.
bench: $(STAMP)
	$(BIN)/pip install -q torch-pruning hls4ml==1.3.0 qonnx==1.0.0
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) demo-out

# Set-up and entry points. Every target installs what it needs first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TFF_VERSION := 0.87.0
FMNIST_DIR := /usr/share/datasets/fashion-mnist
RUN_DIR ?= runs/quick

.PHONY: venv data run test clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (TensorFlow Federated 0.87 needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# The lock is complete (--no-deps). TensorFlow, 1.4 GB of the 2.2 GB
	@# installed, unpacks on one core while the rest unpack on the other:
	@# 16 s instead of 31 s on 2 cores.
	grep -v '^tensorflow==' requirements.lock > $(VENV)/rest.lock
	$(PY) -m pip install --quiet --no-compile --no-deps $$(grep '^tensorflow==' requirements.lock) \
	  tensorflow-federated==$(TFF_VERSION) & \
	  $(PY) -m pip install --quiet --no-compile --no-deps -r $(VENV)/rest.lock; b=$$?; wait $$! && exit $$b
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@# Byte-compiled on every core instead of one file at a time by pip
	@# (about 7 s less on 2 cores). Like pip, it leaves a file that does
	@# not compile (one of vizier's has a syntax error) to its import.
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package, where apt is available.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	else echo "note: $(FMNIST_DIR) is missing and apt is not usable; run.py will try --data_dir and the Keras cache"; fi

# The main job: a short FedDST run on Fashion-MNIST, exported to sparse TFLite.
run: venv data
	$(PY) run.py --algorithm=feddst --dataset=fashion_mnist --sparsity=0.8 \
	  --readjustment_ratio=0.05 --rounds_between_readjustments=5 \
	  --rounds=20 --eval_every=5 --export_tflite --output_dir=$(RUN_DIR)

# The suite on 2 processes, after a second pass of the tests that compare
# floating-point training results (marker `portability`) with oneDNN held
# one step below this processor: to AVX2 (FMA, 8-wide) on a processor with
# AVX-512, to AVX (no FMA) on one with AVX2, to SSE4.1 on one with AVX only.
# Its matrix kernels then add in another order, as another processor's
# would, so an assertion that only holds on this processor fails here.
# `make test PORTABILITY_ISA=SSE41` holds it to the lowest setting on any
# processor (about 15% slower than AVX; AVX is 6% slower than AVX2 on an
# AVX-512 Xeon). Each test module runs in one process (--dist loadfile): its module
# fixtures run once, and its runs share the processes they build. Modules
# start longest first (tests/conftest.py, MODULE_SECONDS), so both processes
# finish together. Ends with the 15 slowest tests.
PORTABILITY_ISA ?= $(shell if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then echo AVX2; \
  elif grep -qw avx2 /proc/cpuinfo 2>/dev/null; then echo AVX; else echo SSE41; fi)
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder
test: venv data
	ONEDNN_MAX_CPU_ISA=$(PORTABILITY_ISA) $(PYTEST) -m portability tests
	$(PYTEST) --durations=15 tests

clean:
	rm -rf $(VENV) runs .pytest_cache

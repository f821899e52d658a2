# make test   : create .venv if missing, install torch and the tools, build and install the
#               project (compiled C++/CUDA extension included), run the test suite.
# make bench  : the same set-up, then the quick CPU benchmark (a few minutes on 2 cores).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.14.1

# CI proves that the CUDA kernels compile: when nvcc is on the PATH the build must contain them,
# and a test fails if it does not (see tests/test_compiled.py).
STVIT_EXPECT_CUDA     ?= $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
STVIT_EXPECT_COMPILED ?= 1
export STVIT_EXPECT_CUDA STVIT_EXPECT_COMPILED

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

.PHONY: test bench install clean

$(VENV)/.deps:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "setuptools>=64" wheel
	$(PIP) install $(TORCH) triton numpy pytest pytest-benchmark hypothesis ninja pybind11 matplotlib
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest tests -q -rs

bench: install
	$(PY) benchmarks/bench_ops.py --quick

clean:
	rm -rf build *.egg-info stvit_kernels/_C*.so stvit_kernels/_build_info.py $(VENV)/.built

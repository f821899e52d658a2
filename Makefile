# make test   : create .venv if missing, install torch and the tools, build and install the
#               project (compiled C++/CUDA extension included), run the test suite.
# make bench  : the same set-up, then the quick CPU benchmark (a few minutes on 2 cores).
# make test-gpu     : the GPU tier (every test that puts something on the GPU) on a machine with a
#                     GPU, with its own python (GPU_PY) and the extension already built in the tree
#                     (e.g. by ../shared/gpu/stage.sh); no venv, no build.
# make sanitize-gpu : compute-sanitizer memcheck + racecheck over every CUDA kernel (same machine).
# make test-torch2.11 : the test suite against torch 2.11 (the GPU machines' version, the oldest
#                     supported), CPU build, in its own venv and its own copy of the tree (so its
#                     extension never replaces the one `make test` built).
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

GPU_PY      ?= python3
GPU_WORKERS ?= 16

T211_VENV := .venv-torch2.11
T211_TREE := .build-torch2.11

.PHONY: test bench install clean test-gpu sanitize-gpu test-torch2.11

# the tools of the tests and benchmarks; TORCH_PINNED: packages pinned to one torch release (the
# timm tests skip without them)
DEPS         := triton numpy pytest pytest-benchmark hypothesis ninja pybind11 matplotlib scikit-image
TORCH_PINNED ?= torchvision==0.29.1 timm

$(VENV)/.deps:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "setuptools>=64" wheel
	$(PIP) install $(TORCH) $(DEPS) $(TORCH_PINNED)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest tests -q -rs

test-gpu:
	GPU_PY=$(GPU_PY) GPU_WORKERS=$(GPU_WORKERS) bash tests/gpu.sh tier

sanitize-gpu:
	GPU_PY=$(GPU_PY) bash tests/gpu.sh sanitize

test-torch2.11:
	test -x $(T211_VENV)/bin/python || $(PYTHON) -m venv $(T211_VENV)
	$(T211_VENV)/bin/pip install "setuptools>=64" wheel torch==2.11.0 $(DEPS)
	rm -rf $(T211_TREE) && mkdir -p $(T211_TREE)
	git ls-files --cached --others --exclude-standard | while read -r f; do test -e "$$f" && echo "$$f"; done \
		| tar -cf - -T - | tar -xf - -C $(T211_TREE)
	cd $(T211_TREE) && STVIT_NO_CUDA=1 MAX_JOBS=2 ../$(T211_VENV)/bin/python setup.py -q build_ext --inplace
	cd $(T211_TREE) && STVIT_EXPECT_CUDA=0 ../$(T211_VENV)/bin/python -m pytest tests -q -rs -p no:cacheprovider

bench: install
	$(PY) benchmarks/bench_ops.py --quick

clean:
	rm -rf build *.egg-info stvit_kernels/_C*.so stvit_kernels/_build_info.py $(VENV)/.built $(T211_TREE)

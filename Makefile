# make setup: install what is missing, then this package in editable mode (compiling the CUDA kernels when
#             torch has CUDA and nvcc is found); a second run does nothing unless setup.py or csrc/ changed.
# make test:  the test suite; where the kernels cannot run, the GPU tests (marker `gpu`) are deselected, with one
#             line saying how many and why.
# make demo:  the demo (python -m moe_gemm.demo), then the benchmark when the kernels are available.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= .device_out

# Wheels carried along for a machine without network (e.g. nvidia-cutlass for the GPU machine).
FIND_LINKS := $(if $(wildcard .wheels/*.whl),--find-links .wheels)
# torch is only installed when absent, never upgraded; pinned to the version of the local CPU wheel CI uses.
TORCH_SPEC ?= torch==2.13.0
# pip package:module it provides. KERNEL_DEPS only build the CUDA kernels: installed where they can be built.
DEPS := pytest:pytest tqdm:tqdm numpy:numpy transformers:transformers setuptools:setuptools wheel:wheel
KERNEL_DEPS := nvidia-cutlass:cutlass_library ninja:ninja pybind11:pybind11
MISSING_DEPS := import importlib.util, sys; \
        print(" ".join(p for p, m in (d.split(":") for d in sys.argv[1:]) if importlib.util.find_spec(m) is None))
# Exit 0 when setup.py would compile the CUDA kernels (its skip_reason, without the check for sources): torch is a
# CUDA build, CUDA_HOME holds nvcc and the CUDA headers, and MOE_GEMM_SKIP_CUDA_BUILD is not 1.
KERNELS_BUILDABLE := import os, sys, torch; from torch.utils.cpp_extension import CUDA_HOME; \
        sys.exit(os.environ.get("MOE_GEMM_SKIP_CUDA_BUILD") == "1" or torch.version.cuda is None or CUDA_HOME is None \
                 or not all(os.path.isfile(os.path.join(CUDA_HOME, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))))
# Exit 0 when the kernels run here (an sm_90 GPU, the extension built).
KERNELS_AVAILABLE := import sys, moe_gemm; sys.exit(not moe_gemm.kernels_available())
# Exit 0 when the installed moe_gemm is this tree's package (the editable install). Under -c, sys.path[0] is the
# current directory, dropped so that the source tree itself does not count.
INSTALLED_HERE := import importlib.util, os, sys; sys.path.pop(0); spec = importlib.util.find_spec("moe_gemm"); \
        sys.exit(spec is None or os.path.realpath(os.path.dirname(spec.origin)) != os.path.realpath(sys.argv[1]))

INSTALL_STAMP := build/.editable-install
KERNEL_SOURCES := $(shell find csrc -type f 2>/dev/null)

.PHONY: setup deps kernel-deps test demo gpu-check clean

setup: deps
	@$(PYTHON) -c '$(INSTALLED_HERE)' moe_gemm || rm -f $(INSTALL_STAMP)
	@$(MAKE) --no-print-directory --silent $(INSTALL_STAMP)

deps:
	@$(PYTHON) -c 'import torch' 2>/dev/null || $(PIP) install $(FIND_LINKS) '$(TORCH_SPEC)'
	@deps="$(DEPS)"; if $(PYTHON) -c '$(KERNELS_BUILDABLE)'; then deps="$$deps $(KERNEL_DEPS)"; fi; \
	missing="$$($(PYTHON) -c '$(MISSING_DEPS)' $$deps)"; \
	if [ -n "$$missing" ]; then $(PIP) install $(FIND_LINKS) $$missing; fi

# What a compile of the kernels needs whatever torch is (CI compiles them with CMake beside a CPU torch).
kernel-deps:
	@missing="$$($(PYTHON) -c '$(MISSING_DEPS)' $(KERNEL_DEPS))"; \
	if [ -n "$$missing" ]; then $(PIP) install $(FIND_LINKS) $$missing; fi

$(INSTALL_STAMP): setup.py pyproject.toml third_party/cutlass_locator.py $(KERNEL_SOURCES)
	$(PIP) install --no-build-isolation -e .
	@mkdir -p $(@D) && touch $@

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) -m moe_gemm.demo
	@if $(PYTHON) -c '$(KERNELS_AVAILABLE)' 2>/dev/null; then $(PYTHON) -m moe_gemm.bench; \
	else echo "(the benchmark, python -m moe_gemm.bench, needs an sm_90 GPU and the built kernels: not run)"; fi

gpu-check:
	bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf build dist *.egg-info moe_gemm/_C*.so .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# make setup: install what is missing, then this package in editable mode (compiling the CUDA kernels when
#             torch has CUDA and nvcc is found); a second run does nothing unless setup.py or csrc/ changed.
# make test:  the CPU test suite (GPU tests skip with their reason).
# make demo:  the benchmark on a GPU with the kernels built, else the pure-PyTorch demo on CPU.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= .device_out

# Wheels carried along for a machine without network (e.g. nvidia-cutlass for the GPU machine).
FIND_LINKS := $(if $(wildcard .wheels/*.whl),--find-links .wheels)
# torch is only installed when absent, never upgraded; pinned to the version of the local CPU wheel CI uses.
TORCH_SPEC ?= torch==2.13.0
# pip package:module it provides.
DEPS := nvidia-cutlass:cutlass_library ninja:ninja pybind11:pybind11 pytest:pytest tqdm:tqdm numpy:numpy transformers:transformers \
        setuptools:setuptools wheel:wheel
MISSING_DEPS := import importlib.util, sys; \
        print(" ".join(p for p, m in (d.split(":") for d in sys.argv[1:]) if importlib.util.find_spec(m) is None))
# Exit 0 when the installed moe_gemm is this tree's package (the editable install). Under -c, sys.path[0] is the
# current directory, dropped so that the source tree itself does not count.
INSTALLED_HERE := import importlib.util, os, sys; sys.path.pop(0); spec = importlib.util.find_spec("moe_gemm"); \
        sys.exit(spec is None or os.path.realpath(os.path.dirname(spec.origin)) != os.path.realpath(sys.argv[1]))

INSTALL_STAMP := build/.editable-install
KERNEL_SOURCES := $(shell find csrc -type f 2>/dev/null)

.PHONY: setup deps test demo gpu-check clean

setup: deps
	@$(PYTHON) -c '$(INSTALLED_HERE)' moe_gemm || rm -f $(INSTALL_STAMP)
	@$(MAKE) --no-print-directory --silent $(INSTALL_STAMP)

deps:
	@$(PYTHON) -c 'import torch' 2>/dev/null || $(PIP) install $(FIND_LINKS) '$(TORCH_SPEC)'
	@missing="$$($(PYTHON) -c '$(MISSING_DEPS)' $(DEPS))"; \
	if [ -n "$$missing" ]; then $(PIP) install $(FIND_LINKS) $$missing; fi

$(INSTALL_STAMP): setup.py pyproject.toml third_party/cutlass_locator.py $(KERNEL_SOURCES)
	$(PIP) install --no-build-isolation -e .
	@mkdir -p $(@D) && touch $@

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) -m moe_gemm.demo

gpu-check:
	bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf build dist *.egg-info moe_gemm/_C*.so .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

"""Build script for moe_gemm: the Python package, plus the CUDA extension ``moe_gemm._C`` compiled from ``csrc/``.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the extension must be compiled against the torch
that will import it, which an isolated build environment would replace. The CUDA extension is skipped, leaving the
pure-PyTorch path, when ``MOE_GEMM_SKIP_CUDA_BUILD=1``, when torch is a CPU build, when no CUDA toolkit is found, or
while ``csrc/`` has no sources.
"""

import glob
import importlib.util
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
except ImportError:
    sys.exit("moe_gemm builds against your installed torch: install torch, then `pip install --no-build-isolation .`")

# Kernels use Hopper-only features (TMA, WGMMA), hence the arch-specific sm_90a target whatever the arch list says.
ARCH_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a"]
HOPPER_ARCHES = {"9.0", "9.0a", "hopper"}
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-DNDEBUG",  # CUTLASS is much slower with its device-side asserts compiled in.
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "-lineinfo",
    "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1",
    "-Xcompiler=-fno-strict-aliasing",
]
# No -std for the host compiler: torch's cpp_extension adds the standard its headers need (C++20 from torch 2.12 or
# 2.13 on). The kernels (nvcc) are torch-free and keep C++17, as in the CMake build of the profiler.
CXX_FLAGS = ["-O3", "-DNDEBUG"]
# A toolchain that has only libstdc++.a (no libstdc++.so) links a static copy of the C++ runtime into the extension.
# Exported, its symbols mix with those of the libstdc++ that torch loaded, and the first error message that formats an
# integer crashes (two copies of the locale tables). Hidden, the copy stays private; with a shared libstdc++ this
# changes nothing.
LINK_FLAGS = ["-Wl,--exclude-libs,ALL"]
# One CUTLASS translation unit takes about 3-4 GB of memory to compile.
GIB_PER_COMPILE_JOB = 4


def read_version() -> str:
    with open(os.path.join(ROOT, "moe_gemm", "__init__.py")) as init:
        return re.search(r'^__version__ = "([^"]+)"', init.read(), re.MULTILINE).group(1)


def kernel_sources() -> list[str]:
    patterns = ("csrc/**/*.cu", "csrc/**/*.cpp")
    return sorted(path for pattern in patterns for path in glob.glob(pattern, root_dir=ROOT, recursive=True))


def skip_reason(sources: list[str]) -> str | None:
    """Why the CUDA extension is not built, or None. Never touches torch.cuda: the build machine may have no GPU."""
    if os.environ.get("MOE_GEMM_SKIP_CUDA_BUILD") == "1":
        return "MOE_GEMM_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "no nvcc found (set CUDA_HOME to a CUDA toolkit)"
    # torch takes CUDA_HOME from the nvcc on PATH when unset, which may be a wrapper script outside the toolkit.
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME to the CUDA toolkit root)"
    if not sources:
        return "csrc/ has no .cu or .cpp sources"
    return None


def warn_about_arch_list() -> None:
    """Say so when TORCH_CUDA_ARCH_LIST asks for archs other than Hopper; the kernels are built for sm_90a only."""
    requested = re.split(r"[;,\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip())
    others = [arch for arch in requested if arch and arch.lower().removesuffix("+ptx") not in HOPPER_ARCHES]
    if others:
        print(f"moe_gemm: the kernels need sm_90a; building for sm_90a only, not for {' '.join(others)}")


def available_memory_gib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // (1024 * 1024)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 1024**3


def set_default_max_jobs() -> None:
    if "MAX_JOBS" not in os.environ:
        jobs = max(1, min(os.cpu_count() or 1, available_memory_gib() // GIB_PER_COMPILE_JOB))
        os.environ["MAX_JOBS"] = str(jobs)


class BuildExtensionKeepingObjects(BuildExtension):
    """BuildExtension with its objects and build.ninja kept in build/ext.

    Editable installs (PEP 660) otherwise compile in a fresh temporary directory each time, so every reinstall would
    recompile all CUTLASS translation units; kept, ninja recompiles only what changed.
    """

    def finalize_options(self):
        self.build_temp = os.path.join(ROOT, "build", "ext")
        super().finalize_options()


def cutlass_include_dirs() -> list[str]:
    spec = importlib.util.spec_from_file_location(
        "cutlass_locator", os.path.join(ROOT, "third_party", "cutlass_locator.py")
    )
    locator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(locator)
    return locator.cutlass_include_dirs()


def extensions() -> list:
    sources = kernel_sources()
    reason = skip_reason(sources)
    if reason is not None:
        print(f"moe_gemm: CUDA kernels not built ({reason}); installing the pure-PyTorch path only")
        return []
    warn_about_arch_list()
    set_default_max_jobs()
    return [
        CUDAExtension(
            name="moe_gemm._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc"), *cutlass_include_dirs()],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + ARCH_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    ]


setup(
    name="moe_gemm",
    version=read_version(),
    description="CUTLASS grouped GEMM for mixture-of-experts layers on Hopper",
    packages=find_packages(include=["moe_gemm", "moe_gemm.*"]),
    package_data={"moe_gemm": ["shapes.json", "bench/layer_configs.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionKeepingObjects.with_options(use_ninja=True)},
)

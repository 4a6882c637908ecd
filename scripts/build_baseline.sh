#!/usr/bin/env bash
# Builds another version of moe_gemm's extension as a baseline for scripts/ab.py: its ops in the namespace
# moe_gemm_base, so that it loads beside this tree's moe_gemm (torch.ops.load_library) and both run in one process.
#
#   bash scripts/build_baseline.sh REF OUTDIR      REF: a git ref of this repository, or a directory holding a tree
#   python scripts/ab.py --baseline "$(bash scripts/build_baseline.sh b12abfa /tmp/moe_gemm_base)"
#
# Exports REF into OUTDIR (git archive, or a copy of the directory), renames the op namespace in csrc/*_torch.cpp
# (TORCH_LIBRARY, TORCH_LIBRARY_IMPL and TORCH_LIBRARY_FRAGMENT of moe_gemm), builds the extension in place, and prints
# the path of the .so on stdout (the build's output goes to stderr).
#
# Supported: trees whose C++ defines the op schemas (TORCH_LIBRARY(moe_gemm, ...) with m.def, as b12abfa and before),
# which then load complete; and trees whose schemas are declared in Python (the C++ only implements them): the .so
# then carries the kernels alone, and scripts/ab.py defines the schemas of grouped_mm and grouped_mm_wgrad for it
# (the other ops of such a baseline stay without a schema). Needs what a build of the extension needs: a CUDA torch,
# nvcc, and CUTLASS (nvidia-cutlass or CUTLASS_DIR).
set -euo pipefail
if [ $# -ne 2 ]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
ref=$1
out=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "build_baseline: $out exists and is not empty; give an empty or new directory" >&2
  exit 1
fi
mkdir -p "$out"
if [ -d "$ref" ]; then
  # A directory: its files, without build outputs that would be taken for this build's.
  tar -C "$ref" --exclude=./build --exclude='*.so' --exclude=.git -cf - . | tar -x -C "$out"
else
  git -C "$repo" archive "$ref" | tar -x -C "$out"
fi

shopt -s nullglob
bindings=("$out"/csrc/*_torch.cpp)
if [ ${#bindings[@]} -eq 0 ]; then
  echo "build_baseline: $ref has no csrc/*_torch.cpp" >&2
  exit 1
fi
sed -i -E 's/\b(TORCH_LIBRARY|TORCH_LIBRARY_IMPL|TORCH_LIBRARY_FRAGMENT)\(moe_gemm,/\1(moe_gemm_base,/g' "${bindings[@]}"
if grep -nE '\bTORCH_LIBRARY(_IMPL|_FRAGMENT)?\(moe_gemm,' "${bindings[@]}" >&2; then
  echo "build_baseline: the namespace was not renamed everywhere (above)" >&2
  exit 1
fi

(cd "$out" && MAX_JOBS=${MAX_JOBS:-$(nproc)} "$python" setup.py -q build_ext --inplace) >&2
libraries=("$out"/moe_gemm/_C*.so)
if [ ${#libraries[@]} -ne 1 ]; then
  echo "build_baseline: expected one moe_gemm/_C*.so in $out, found ${#libraries[@]}" >&2
  exit 1
fi
realpath "${libraries[0]}"

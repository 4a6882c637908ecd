#!/usr/bin/env bash
# One pass on a GPU machine (torch already installed, no network): build the extension and the C++
# profiler with all cores, run the whole test suite and the benchmark, and leave logs and JSON in
# the output folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          (default: $OUT, else ./gpu_check_out)
#
# Environment: MOE_GEMM_BENCH_ARGS (extra arguments for `python -m moe_gemm.bench`),
# MOE_GEMM_BENCH_MODES (benchmarks to run, default "forward"; any of forward backward decode layer),
# MOE_GEMM_SKIP_BENCH=1, MOE_GEMM_SANITIZE=1 (also run the GPU tests under compute-sanitizer),
# WHEELS_DIR (local wheels to install first, e.g. nvidia-cutlass; default .wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$out"
log="$out/gpu_check.log"
: >"$log"
status=0
step() { echo "=== $* ($(date +%H:%M:%S))" | tee -a "$log"; }
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
python=${PYTHON:-python3}

step "device"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$log"
$python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$log"

wheels="${WHEELS_DIR:-.wheels}"
if ! $python -c "import cutlass_library" 2>/dev/null; then
  step "install local wheels from $wheels"
  $python -m pip install -q --no-index --no-deps "$wheels"/*.whl 2>&1 | tee -a "$log"
fi

step "build: extension and C++ profiler in parallel (MAX_JOBS=$MAX_JOBS)"
# Build logs stay in build/logs; the tail of a failing one goes into the main log.
mkdir -p build/logs
(cmake -S . -B build/profiler -DCMAKE_BUILD_TYPE=Release >build/logs/profiler.log 2>&1 &&
  cmake --build build/profiler -j "$MAX_JOBS" >>build/logs/profiler.log 2>&1) &
profiler_pid=$!
if ! $python -m pip install --no-build-isolation --no-deps -e . >build/logs/extension.log 2>&1; then
  grep -E "error|Error" build/logs/extension.log | head -20 | tee -a "$log"
  echo "extension build FAILED" | tee -a "$log"
  exit 1
fi
$python -m moe_gemm | tee -a "$log"
wait $profiler_pid || { echo "profiler build FAILED" | tee -a "$log"; grep -E "error" build/logs/profiler.log | head -20 | tee -a "$log"; status=1; }
# The built extension, to carry into a later run instead of rebuilding.
cp moe_gemm/_C*.so "$out/" 2>/dev/null || true

step "C++ profiler: verification"
if [ -x build/profiler/moe_gemm_profiler ]; then
  p=build/profiler/moe_gemm_profiler
  for args in "--sizes=0,5,300,0,17 --n=256 --k=512 --extra_rows=9" \
              "--sizes=129,0,0,1000 --n=136 --k=72 --layout=kn --dtype=fp16" \
              "--experts=128 --tokens=2048 --topk=8 --n=1536 --k=2048 --routing=skewed" \
              "--experts=256 --tokens=1024 --topk=8 --n=4096 --k=7168 --config=128x128" \
              "--experts=128 --tokens=2048 --topk=8 --n=1536 --k=2048 --routing=skewed --config=128x256c1x2 --dynamic=1" \
              "--sizes=0,5,300,0,17,1000,0,260 --n=5760 --k=2880 --config=128x256c1x2 --extra_rows=9" \
              "--sizes=1,64,65,300,2,193,63 --n=2880 --k=576 --config=128x256c1x2" \
              "--sizes=0,5,300,0,17,1000,0,260 --n=2880 --k=2880 --config=128x256c2x1 --dynamic=1 --layout=kn --dtype=fp16" \
              "--sizes=0,5,300,0,17,1000,0,260 --n=2880 --k=2880 --config=128x128 --extra_rows=9" \
              "--experts=128 --tokens=2048 --topk=8 --n=1536 --k=2048 --routing=skewed --config=128x128 --dynamic=1 --layout=kn" \
              "--sizes=1,64,65,300,2,193,63 --n=2880 --k=576 --config=128x256 --dynamic=0 --extra_rows=9" \
              "--experts=64 --tokens=4096 --topk=8 --n=2048 --k=1024 --config=128x256 --dynamic=1 --layout=kn --dtype=fp16" \
              "--experts=512 --tokens=300 --topk=8 --n=256 --k=512 --routing=skewed" \
              "--sizes=0,1,0,1,0,0,0,0 --n=4096 --k=14336" \
              "--sizes=300,0,129,5 --n=264 --k=2504 --split_k=7 --layout=kn --dtype=fp16 --extra_rows=9" \
              "--sizes=0,5,33,0,17,1,0,16 --n=2880 --k=2880 --config=16x128s --extra_rows=9" \
              "--sizes=300,0,129,5 --n=264 --k=2504 --config=16x128s --split_k=7 --layout=kn --dtype=fp16 --extra_rows=9" \
              "--sizes=0,31,32,0,17,1,33,16 --n=2880 --k=2880 --config=32x128s --extra_rows=9" \
              "--experts=128 --tokens=384 --topk=8 --n=1536 --k=2048 --config=32x128s --dynamic=1 --layout=kn --dtype=fp16" \
              "--sizes=300,0,129,5 --n=264 --k=2504 --config=32x128s --split_k=3 --extra_rows=9" \
              "--gather --sizes=0,5,300,0,17,1000,0,260 --n=2880 --k=2880 --config=128x128 --extra_rows=9" \
              "--gather --experts=128 --tokens=2048 --topk=8 --n=1536 --k=2048 --routing=skewed --config=128x256 --dynamic=1 --layout=kn --dtype=fp16" \
              "--gather --sizes=1,64,65,300,2,193,63 --n=2880 --k=576 --config=128x256 --dynamic=0 --extra_rows=9" \
              "--gather --sizes=300,0,129,5 --n=264 --k=2504 --config=128x128 --split_k=7 --layout=kn --dtype=fp16 --extra_rows=9" \
              "--gather --experts=128 --tokens=4096 --topk=8 --n=1536 --k=768" \
              "--dtype=fp8 --scales=rowwise --sizes=0,5,300,0,17,1000,0,260 --n=2880 --k=2880 --extra_rows=9" \
              "--dtype=fp8 --scales=rowwise --sizes=1,64,65,300,2,193,63 --n=2880 --k=576 --config=128x128" \
              "--dtype=fp8 --scales=rowwise --sizes=0,31,32,0,17,1,33,16 --n=2880 --k=2880 --config=32x128s --extra_rows=9" \
              "--dtype=fp8 --scales=blockwise --sizes=0,5,300,0,17,1000,0,260 --n=2880 --k=2880 --extra_rows=9" \
              "--dtype=fp8 --scales=blockwise --experts=256 --tokens=1024 --topk=8 --n=4096 --k=7168 --routing=skewed" \
              "--wgrad --sizes=0,5,300,0,17 --n=256 --k=520 --extra_rows=9" \
              "--wgrad --accumulate --sizes=64,0,129,1000 --n=136 --k=264 --layout=kn --dtype=fp16" \
              "--wgrad --experts=128 --tokens=2048 --topk=8 --n=1536 --k=2048 --routing=skewed" \
              "--experts=128 --tokens=4096 --topk=8 --n=1536 --k=768" \
              "--wgrad --experts=64 --tokens=4096 --topk=8 --n=1024 --k=768" \
              "--wgrad --gather=x --sizes=0,5,300,0,17 --n=256 --k=520 --extra_rows=9" \
              "--wgrad --gather=grad_y --sizes=0,5,300,0,17 --n=256 --k=520 --extra_rows=9 --layout=kn --dtype=fp16" \
              "--wgrad --gather=x --sizes=1,64,65,300,2,193,63 --n=136 --k=264 --layout=kn" \
              "--wgrad --gather=grad_y --sizes=1,64,65,300,2,193,63 --n=136 --k=264 --dtype=fp16" \
              "--wgrad --gather=x --experts=128 --tokens=4096 --topk=8 --n=1024 --k=4096" \
              "--wgrad --gather=grad_y --experts=128 --tokens=4096 --topk=8 --n=4096 --k=512 --routing=skewed"; do
    echo "-- $args" >>"$log"
    $p $args --iterations=3 >>"$log" 2>&1 || { echo "profiler FAILED: $args" | tee -a "$log"; status=1; }
  done
  grep -c PASSED "$log" | sed 's/^/profiler cases passed: /' | tee -a "$log"
fi

step "tests"
$python -m pytest -q -rs tests 2>&1 | tee "$out/pytest.log" | tail -25 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "${MOE_GEMM_SANITIZE:-0}" = 1 ]; then
  step "compute-sanitizer memcheck on the GPU tests"
  # Everything but the slow cases (the 4 GB input, torch.compile, the scaled suite): the same kernels and edges.
  compute-sanitizer --tool memcheck --error-exitcode 1 $python -m pytest -q -x tests/test_cuda_kernel.py \
    tests/test_cuda_gather.py tests/test_cuda_wgrad.py tests/test_cuda_wgrad_gather.py tests/test_decode.py -k "not beyond_2_pow_31 and not compile and not suite_shapes" \
    >"$out/sanitizer.log" 2>&1 && echo "memcheck clean" | tee -a "$log" ||
    { tail -30 "$out/sanitizer.log" | tee -a "$log"; status=1; }
fi

if [ "${MOE_GEMM_SKIP_BENCH:-0}" != 1 ]; then
  for mode in ${MOE_GEMM_BENCH_MODES:-forward}; do
    step "benchmark: $mode"
    case "$mode" in
      forward) flags=(--plot "$out/bench.png") ;;
      *) flags=(--"$mode") ;;
    esac
    name=$([ "$mode" = forward ] && echo bench || echo "bench_$mode")
    # shellcheck disable=SC2086
    $python -m moe_gemm.bench "${flags[@]}" --json "$out/$name.json" ${MOE_GEMM_BENCH_ARGS:-} \
      2>&1 | tee "$out/$name.log" | grep -v '%|' | tail -80 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
fi

step "done, status $status"
exit $status

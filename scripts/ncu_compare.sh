#!/usr/bin/env bash
# Nsight Compute side by side: moe_gemm's kernel (through the C++ profiler, one launch) and
# torch._grouped_mm's kernel on the same GEMM with random data. Needs build/profiler (gpu_check.sh
# builds it). Writes OUT_DIR/ncu_compare.txt.
#   bash scripts/ncu_compare.sh [OUT_DIR] [experts tokens topk n k]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-$PWD/gpu_check_out}}"
experts=${2:-256} tokens=${3:-16384} topk=${4:-8} n=${5:-7168} k=${6:-2048}
metrics=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed,sm__cycles_elapsed.avg.per_second,\
launch__grid_size,launch__cluster_size,dram__bytes_read.sum,dram__bytes_write.sum
{
  echo "== moe_gemm (profiler, integer data) experts=$experts tokens=$tokens topk=$topk n=$n k=$k"
  ncu --metrics "$metrics" -k regex:device_kernel -c 1 build/profiler/moe_gemm_profiler \
    --experts="$experts" --tokens="$tokens" --topk="$topk" --n="$n" --k="$k" --ncu 2>&1 | grep -v "^==PROF=="
  echo "== moe_gemm and torch._grouped_mm from Python (random data)"
  ncu --metrics "$metrics" -k regex:"device_kernel|Gemm|gemm" -c 2 python3 - "$experts" "$tokens" "$topk" "$n" "$k" <<'PY' 2>&1 | grep -v "^==PROF=="
import sys, torch, moe_gemm
E, T, topk, N, K = map(int, sys.argv[1:])
counts = torch.bincount(torch.rand(T, E, device="cuda").topk(topk, -1).indices.flatten(), minlength=E)
x = torch.randn(int(counts.sum()), K, device="cuda", dtype=torch.bfloat16)
w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16)
torch.ops.moe_gemm.grouped_mm(x, w, counts, False)
torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.cumsum(counts, 0).to(torch.int32))
torch.cuda.synchronize()
PY
} >"$out/ncu_compare.txt" 2>&1
tail -60 "$out/ncu_compare.txt"

#!/usr/bin/env bash
# Times every tile configuration on the benchmark suite (forced through MOE_GEMM_TILE_CONFIG) next
# to the heuristic's choice, for tuning choose_tile_config(). Writes OUT_DIR/tile_configs.json.
#   bash scripts/compare_tile_configs.sh [OUT_DIR] [bench arguments...]
# With --decode among the arguments the decode benchmark runs instead, and its CUDA-graph times are compared.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-$PWD/gpu_check_out}}"
shift || true
tmp=$(mktemp -d)
configs="${MOE_GEMM_CONFIGS:-auto 128x256 128x128 128x256c2x1 128x256c1x2 128x128pp 16x128s 32x128s}"
for config in $configs; do
  MOE_GEMM_TILE_CONFIG=$config python3 -m moe_gemm.bench --json "$tmp/$config.json" "$@" >"$tmp/$config.log" 2>&1 ||
    { tail -5 "$tmp/$config.log"; exit 1; }
done
python3 - "$tmp" "$out/tile_configs.json" <<'PY'
import json, sys, pathlib
tmp, dest = pathlib.Path(sys.argv[1]), sys.argv[2]
runs = {p.stem: json.loads(p.read_text()) for p in tmp.glob("*.json")}
configs = [c for c in ["auto", "128x256", "128x128", "128x256c2x1", "128x256c1x2", "128x128pp", "16x128s", "32x128s"]
           if (tmp / f"{c}.json").exists()]
key = lambda r: (r["model"], r["tokens"], r["gemm"])


def ms(row, forward_key, graph_key):  # the forward benchmark's ms, else the decode benchmark's graph us
    if row.get(forward_key) is not None:
        return row[forward_key]
    return row[graph_key] / 1e3 if row.get(graph_key) is not None else None


table = {}
for config in configs:
    for row in runs[config]["rows"]:
        table.setdefault(key(row), {"grouped_mm_ms": ms(row, "grouped_mm_ms", "gmm_graph_us")})[config] = ms(
            row, "moe_gemm_ms", "moe_graph_us")
print(f"{'model':18s} {'tokens':>6s} {'gemm':4s} " + " ".join(f"{c:>10s}" for c in configs) + "  torch  best")
for (model, tokens, gemm), times in table.items():
    best = min([c for c in configs if c != "auto"], key=lambda c: times[c] or 1e9)
    print(f"{model:18s} {tokens:6d} {gemm:4s} " + " ".join(f"{times[c] or float('nan'):10.4f}" for c in configs)
          + f" {times['grouped_mm_ms'] or float('nan'):6.4f} {best}")
json.dump({"configs": configs, "rows": [dict(model=k[0], tokens=k[1], gemm=k[2], **v) for k, v in table.items()]},
          open(dest, "w"), indent=1)
PY

"""Markdown tables for BENCHMARKS.md from the JSON of `python -m moe_gemm.bench [--backward | --layer] --json PATH`.

    python3 scripts/benchmarks_table.py bench.json
"""
import json
import sys


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def backward_tables(result: dict) -> None:
    print("| selection | shapes | wgrad | dgrad | forward+backward |")
    print("|---|---|---|---|---|")
    for label, stats in result["summary"].items():
        print(f"| {label} | {stats['shapes']} | {stats['wgrad_speedup']:.2f} | {stats['dgrad_speedup']:.2f} | "
              f"{stats['train_speedup']:.2f} |")
    print("\n| model | tokens | gemm | M | N | K | wgrad ms | x floor | torch ms | speedup | dgrad ms | torch ms | "
          "speedup | fwd+bwd ms | torch ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        cells = [r["model"], r["tokens"], r["gemm"], r["M"], r["N"], r["K"]]
        for key, spec in (("wgrad_ms", ".3f"), ("wgrad_x_floor", ".2f"), ("wgrad_torch_ms", ".3f"),
                          ("wgrad_speedup", ".2f"), ("dgrad_ms", ".3f"), ("dgrad_torch_ms", ".3f"),
                          ("dgrad_speedup", ".2f"), ("train_ms", ".3f"), ("train_torch_ms", ".3f"),
                          ("train_speedup", ".2f")):
            cells.append(fmt(r.get(key), spec))
        print("| " + " | ".join(map(str, cells)) + " |")


def layer_tables(result: dict) -> None:
    print("TFLOP/s over the whole layer's time: forward 6*T*K*d*n, backward 12*T*K*d*n, forward+backward "
          "18*T*K*d*n; peak = memory allocated above the weights during one forward+backward.\n")
    print("| config (T, d, n, E, K) | implementation | fwd | bwd | fwd+bwd | peak GB | x grouped_mm fwd / fwd+bwd "
          "| published (H100) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        published = result["summary"]["configs"][r["config"]]["published_h100"] if r["impl"] == "moe_gemm" else {}
        speedups = f"{fmt(r.get('x_grouped_mm_fwd'), '.2f')} / {fmt(r.get('x_grouped_mm_fwd_bwd'), '.2f')}"
        cells = [f"{r['config']} ({r['T']}, {r['d']}, {r['n']}, {r['E']}, {r['K']})",
                 r["impl"] if r["check"] == "ok" else f"{r['impl']} ({r['check']})",
                 fmt(r.get("fwd_tflops"), ".0f"), fmt(r.get("bwd_tflops"), ".0f"),
                 fmt(r.get("fwd_bwd_tflops"), ".0f"),
                 fmt(r.get("peak_gb"), ".1f"), "" if r["impl"] == "grouped_mm" else speedups,
                 ", ".join(f"{key} {value}" for key, value in published.items())]
        print("| " + " | ".join(cells) + " |")
    print("\n| decode sizes | T | implementation | fwd ms | fwd+bwd ms | x the faster of grouped_mm, batched_mm |")
    print("|---|---|---|---|---|---|")
    for r in result["decode_rows"]:
        print(f"| {r['config']} | {r['T']} | {r['impl']} | {fmt(r.get('fwd_ms'), '.3f')} | "
              f"{fmt(r.get('fwd_bwd_ms'), '.3f')} | {fmt(r.get('x_transformers_fwd'), '.2f')} / "
              f"{fmt(r.get('x_transformers_fwd_bwd'), '.2f')} |")
    print(f"\nRouting kernel: {result['summary']['routing_speedup']:.1f}x the PyTorch ops (DeepSeek-V3 router).")


def main(path: str) -> None:
    with open(path) as file:
        result = json.load(file)
    if "routing_rows" in result:
        print(f"Device: {result['device']}; {result['build']}; transformers {result['transformers']}; "
              f"{result['liger']}.\n")
        layer_tables(result)
        return
    if result.get("mode") == "backward":
        print(f"Device: {result['device']}; {result['build']}. Ceilings measured in the same run: dense bf16 "
              f"8192^3 matmul {result['peak_tflops']:.0f} TFLOP/s, device-to-device copy "
              f"{result['bandwidth_tbs']:.2f} TB/s. Routing {result['routing']}, {result['dtype']}, "
              f"seed {result['seed']}.\n")
        backward_tables(result)
        return
    print(f"Device: {result['device']}; {result['build']}. Ceilings measured in the same run: dense bf16 "
          f"8192^3 matmul {result['peak_tflops']:.0f} TFLOP/s, device-to-device copy {result['bandwidth_tbs']:.2f} TB/s. "
          f"Routing {result['routing']}, {result['dtype']}, seed {result['seed']}.\n")
    print("| tokens | shapes | speedup vs torch._grouped_mm | moe_gemm x floor |")
    print("|---|---|---|---|")
    for label, stats in result["summary"]["groups"].items():
        print(f"| {label.removeprefix('tokens=')} | {stats['shapes']} | {stats['speedup']:.2f} | {stats['x_floor']:.2f} |")
    print(f"\nGeometric-mean speedup over the {sum(1 for r in result['rows'] if r['tokens'] >= 256)} shapes with "
          f">= 256 tokens: {result['summary']['speedup_tokens_ge_256']:.2f}.\n")
    print("| model | tokens | gemm | M | N | K | experts hit | moe_gemm ms | TFLOP/s | x floor | "
          "torch._grouped_mm ms | speedup | loop ms | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['model']} | {r['tokens']} | {r['gemm']} | {r['M']} | {r['N']} | {r['K']} | {r['active']} | "
              f"{fmt(r.get('moe_gemm_ms'), '.3f')} | {fmt(r.get('tflops'), '.0f')} | {fmt(r.get('x_floor'), '.2f')} | "
              f"{fmt(r.get('grouped_mm_ms'), '.3f')} | {fmt(r.get('speedup'), '.2f')} | {fmt(r.get('loop_ms'), '.3f')} | "
              f"{fmt(r.get('rel_error'), '.1e')} |")


if __name__ == "__main__":
    main(sys.argv[1])

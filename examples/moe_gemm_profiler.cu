// moe_gemm profiler: runs the sm90 MoE grouped GEMM on one problem, verifies it against a simple
// reference GEMM and times it. Built from the same kernel code as the PyTorch extension, without
// libtorch.
//
//   cmake -S . -B build && cmake --build build -j
//   ./build/moe_gemm_profiler --experts=128 --tokens=4096 --topk=8 --n=1536 --k=2048
//   ./build/moe_gemm_profiler --sizes=0,5,300,0,17 --n=256 --k=512 --layout=kn --dtype=fp16
//   ./build/moe_gemm_profiler --gather --experts=128 --tokens=4096 --topk=8 --n=1536 --k=2048   (A's rows gathered)
//   ./build/moe_gemm_profiler --wgrad --experts=128 --tokens=4096 --topk=8 --n=1536 --k=2048   (weight gradient)
//   ./build/moe_gemm_profiler --wgrad --gather=x --experts=128 --tokens=4096 --topk=8 --n=1536 --k=2048
//                                                                  (weight gradient, x's rows gathered; or grad_y)
//   ./build/moe_gemm_profiler --dtype=fp8 --scales=blockwise --experts=256 --tokens=4096 --n=4096 --k=7168
//                                                 (FP8 operands with DeepSeek-V3's scales; or --scales=rowwise)
//   ncu --set full ./build/moe_gemm_profiler --tokens=16384 --ncu     (one launch, nothing else)
//
// Inputs are small random integers (FP8 scales powers of two), so the float32 accumulation is exact and the
// output must equal the reference rounded to the output type, element for element. (FP8's fast accumulation, over
// the whole of K with rowwise scales, keeps about 14 bits: exact while the partial sums, random walks of K steps
// of at most 4, stay below 2^14 -- K up to tens of thousands in practice.)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "cutlass/numeric_types.h"
#include "cutlass/util/command_line.h"

#include "moe_gemm.h"

#define CHECK_CUDA(call)                                                                        \
  do {                                                                                          \
    cudaError_t status_ = (call);                                                               \
    if (status_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(status_)); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

struct Options {
  int experts = 128;
  int tokens = 4096;
  int topk = 8;
  std::vector<int> sizes;        // explicit per-expert rows; overrides experts/tokens/topk
  int64_t n = 1536;
  int64_t k = 2048;
  int extra_rows = 0;            // rows past the last expert (must come out as zeros)
  std::string dtype = "bf16";    // bf16 | fp16 | fp8 (e4m3 operands, bf16 output)
  std::string scales = "blockwise";  // --dtype=fp8: rowwise (x [M], w [E, N]) | blockwise (x [M, K/128], w blocks)
  std::string layout = "nk";     // nk: weight [E, N, K];  kn: weight [E, K, N]
  std::string routing = "uniform";  // uniform | skewed
  std::string config = "auto";   // auto or a name of csrc/moe_tile_configs.h
  int dynamic = -1;              // tile scheduling: 1 dynamic, 0 static, -1 by problem size
  int split_k = 0;               // K splits per tile: 0 by problem size, 1 none
  int iterations = 50;
  int warmup = 5;
  bool verify = true;
  bool ncu = false;              // a single launch for Nsight Compute: no warm-up, no verification
  bool wgrad = false;            // the weight gradient grad_W[e] = grad_y_e^T @ x_e instead of the forward
  bool accumulate = false;       // --wgrad: add into a float32 gradient (main-grad) instead of writing one
  bool gather = false;           // row r of A is row (r * 7919) % T of a [T = M / topk, K] source (grouped_mm_gather)
  std::string gather_operand;    // --wgrad --gather=x|grad_y: that operand's rows gathered the same way
  int seed = 0;
  bool help = false;

  void parse(int argc, char const** argv) {
    cutlass::CommandLine cmd(argc, argv);
    help = cmd.check_cmd_line_flag("help");
    cmd.get_cmd_line_argument("experts", experts);
    cmd.get_cmd_line_argument("tokens", tokens);
    cmd.get_cmd_line_argument("topk", topk);
    cmd.get_cmd_line_arguments("sizes", sizes);
    cmd.get_cmd_line_argument("n", n);
    cmd.get_cmd_line_argument("k", k);
    cmd.get_cmd_line_argument("extra_rows", extra_rows);
    cmd.get_cmd_line_argument("dtype", dtype);
    cmd.get_cmd_line_argument("scales", scales);
    cmd.get_cmd_line_argument("layout", layout);
    cmd.get_cmd_line_argument("routing", routing);
    cmd.get_cmd_line_argument("config", config);
    cmd.get_cmd_line_argument("dynamic", dynamic);
    cmd.get_cmd_line_argument("split_k", split_k);
    cmd.get_cmd_line_argument("iterations", iterations);
    cmd.get_cmd_line_argument("warmup", warmup);
    cmd.get_cmd_line_argument("verify", verify, true);
    cmd.get_cmd_line_argument("seed", seed);
    ncu = cmd.check_cmd_line_flag("ncu");
    wgrad = cmd.check_cmd_line_flag("wgrad");
    accumulate = cmd.check_cmd_line_flag("accumulate");
    gather = cmd.check_cmd_line_flag("gather");
    cmd.get_cmd_line_argument("gather", gather_operand);
    if (!sizes.empty()) {
      experts = int(sizes.size());
    }
  }

  static void usage() {
    std::string configs = "auto";
    for (moe_gemm::TileConfigInfo const& info : moe_gemm::kTileConfigs) {
      configs = configs + "|" + info.name;
    }
    std::printf(
        "moe_gemm_profiler: the sm90 MoE grouped GEMM D[rows of e] = A[rows of e] @ B[e]^T\n\n"
        "  --experts=E --tokens=T --topk=k   routing of T tokens to k of E experts each\n"
        "  --routing=uniform|skewed          uniform scores, or Zipf-like expert popularity\n"
        "  --sizes=a,b,c                     explicit rows per expert instead of routing\n"
        "  --n=N --k=K                       GEMM sizes (multiples of 8; of 16 with --dtype=fp8)\n"
        "  --extra_rows=R                    rows past the last expert (checked to be zero)\n"
        "  --dtype=bf16|fp16|fp8  --layout=nk|kn\n"
        "  --scales=rowwise|blockwise        --dtype=fp8: x per row and w per channel, or x per row and 128\n"
        "                                    columns and w per 128 x 128 block (DeepSeek-V3's); bf16 output, nk\n"
        "  --config=%s\n"
        "                                    the tile configuration (default: the heuristic)\n"
        "  --dynamic=1|0|-1                  dynamic (tile counter) or static tile scheduling (-1: heuristic)\n"
        "  --split_k=S                       split each tile's K loop S ways (1: never; default: heuristic;\n"
        "                                    S > 1 only for configurations with a split-K kernel)\n"
        "  --iterations=I --warmup=W --verify=true|false --seed=S\n"
        "  --ncu                             one launch, for profiling under ncu\n"
        "  --wgrad [--accumulate]            the weight gradient grad_W[e] = grad_y_e^T x_e ([E, N, K], [E, K, N]\n"
        "                                    with --layout=kn), K-grouped over each expert's rows; --accumulate\n"
        "                                    adds it into a float32 buffer\n"
        "  --gather                          A's rows gathered from a [T, K] source, T = M / topk: row r reads\n"
        "                                    source row (r * 7919) %% T (duplicates and a scattered order, as the MoE\n"
        "                                    layer's tokens; configurations with a gathering kernel only)\n"
        "  --wgrad --gather=x|grad_y         the weight gradient with x's (grad_y's) rows gathered the same way\n"
        "                                    (grouped_mm_wgrad_gather; not with --accumulate)\n",
        configs.c_str());
  }
};

// Rows per expert: each token picks `topk` distinct experts, by uniform scores or Zipf weights.
std::vector<int> route(Options const& opt, std::mt19937& rng) {
  if (!opt.sizes.empty()) {
    return opt.sizes;
  }
  std::vector<int> counts(opt.experts, 0);
  std::vector<double> weight(opt.experts, 1.0);
  if (opt.routing == "skewed") {
    for (int e = 0; e < opt.experts; ++e) weight[e] = 1.0 / (e + 1);
  }
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<std::pair<double, int>> keys(opt.experts);
  int const topk = std::min(opt.topk, opt.experts);
  for (int t = 0; t < opt.tokens; ++t) {
    // Weighted sampling without replacement: the top-k of u^(1/w).
    for (int e = 0; e < opt.experts; ++e) keys[e] = {std::pow(uniform(rng), 1.0 / weight[e]), e};
    std::partial_sort(keys.begin(), keys.begin() + topk, keys.end(), std::greater<>());
    for (int j = 0; j < topk; ++j) ++counts[keys[j].second];
  }
  return counts;
}

// The rows of one run: per expert, and in all (the routed ones, then --extra_rows past the last expert).
struct Rows {
  std::vector<int> sizes;
  int64_t routed;
  int64_t M;
};

Rows rows_of(Options const& opt) {
  std::mt19937 rng(opt.seed);
  Rows rows{route(opt, rng), 0, 0};
  rows.routed = std::accumulate(rows.sizes.begin(), rows.sizes.end(), int64_t(0));
  rows.M = rows.routed + opt.extra_rows;
  return rows;
}

// Integer values in [-2, 2] from a hash of the index: products and sums stay exact in float32, and
// filling gigabytes on the GPU takes milliseconds.
template <class Element>
__global__ void fill_small_integers(Element* ptr, int64_t count, uint32_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t h = uint64_t(i) * 0x9E3779B97F4A7C15ull + seed;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    ptr[i] = Element(float(int(h % 5) - 2));
  }
}

// One thread per output element; float accumulation, exact for the integer inputs used here. Row r of A is row
// gather_rows[r] of `a` (row r without a gather).
template <class Element>
__global__ void reference_grouped_gemm(Element const* a, int64_t const* gather_rows, Element const* b, float* d,
                                       int const* row_expert, int64_t rows, int64_t n, int64_t k, bool b_n_major) {
  int64_t const idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * n) return;
  int64_t const row = idx / n, col = idx % n;
  int const e = row_expert[row];
  if (e < 0) {
    d[idx] = 0.f;
    return;
  }
  Element const* b_e = b + int64_t(e) * n * k;
  Element const* a_row = a + (gather_rows != nullptr ? gather_rows[row] : row) * k;
  float sum = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    float const bv = b_n_major ? float(b_e[i * n + col]) : float(b_e[col * k + i]);
    sum += float(a_row[i]) * bv;
  }
  d[idx] = sum;
}

// Exact comparison of the kernel's output with the reference: the count of elements that differ (NaN
// never equals), the first few printed with where(i).
template <class Where>
int64_t count_mismatches(std::vector<float> const& got, std::vector<float> const& expected, Where&& where) {
  int64_t mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(got[i] == expected[i])) {
      if (mismatches < 5) {
        std::printf("  mismatch at %s: got %f expected %f\n", where(int64_t(i)).c_str(), got[i], expected[i]);
      }
      ++mismatches;
    }
  }
  std::printf("verification: %s (%lld of %lld elements differ)\n", mismatches == 0 ? "PASSED" : "FAILED",
              (long long)mismatches, (long long)got.size());
  return mismatches;
}

// Whether the kernel's output d [M, N] equals, element for element, the float32 reference that
// launch_reference(ref, row_expert) writes on the device (row_expert [M]: each row's expert, -1 past the last),
// rounded to the output type.
template <class Out, class LaunchReference>
bool matches_reference(Out const* d, int64_t M, int64_t N, std::vector<int> const& row_expert,
                       LaunchReference&& launch_reference) {
  float* ref;
  int* dev_row_expert;
  CHECK_CUDA(cudaMalloc(&ref, std::max<int64_t>(1, M * N) * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dev_row_expert, std::max<int64_t>(1, M) * sizeof(int)));
  CHECK_CUDA(cudaMemcpy(dev_row_expert, row_expert.data(), M * sizeof(int), cudaMemcpyHostToDevice));
  if (M * N > 0) {
    launch_reference(ref, dev_row_expert);
    CHECK_CUDA(cudaGetLastError());
  }
  std::vector<Out> out(M * N);
  std::vector<float> host_d(M * N), host_ref(M * N);
  CHECK_CUDA(cudaMemcpy(out.data(), d, M * N * sizeof(Out), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(host_ref.data(), ref, M * N * sizeof(float), cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < M * N; ++i) {
    host_d[i] = float(out[i]);
    host_ref[i] = float(Out(host_ref[i]));  // the exact sum, rounded to the output type
  }
  bool const passed = count_mismatches(host_d, host_ref, [&](int64_t i) {
                        return "row " + std::to_string(i / N) + " col " + std::to_string(i % N);
                      }) == 0;
  CHECK_CUDA(cudaFree(ref));
  CHECK_CUDA(cudaFree(dev_row_expert));
  return passed;
}

// Device memory of `bytes` (nullptr for none), poisoned with 0xFF bytes (NaN in every float type): a
// split that reads a partial nobody wrote shows up as NaN. The counters at its start are zeroed by run_*.
void* allocate_workspace(size_t bytes) {
  void* workspace = nullptr;
  if (bytes > 0) {
    CHECK_CUDA(cudaMalloc(&workspace, bytes));
    CHECK_CUDA(cudaMemset(workspace, 0xFF, bytes));
  }
  return workspace;
}

void print_time(double ms, double flops, double bytes) {
  std::printf("time %.4f ms  %.1f TFLOP/s  %.1f GB/s  (back-to-back launches, warm L2)\n", ms, flops / ms / 1e9,
              bytes / ms / 1e6);
}

// The first launch, waited for. With --ncu that is all: returns false.
template <class Launch>
bool first_launch(Options const& opt, Launch&& launch) {
  launch();
  CHECK_CUDA(cudaDeviceSynchronize());
  if (opt.ncu) {
    std::printf("one launch done (--ncu)\n");
    return false;
  }
  return true;
}

// Mean time of one launch over opt.iterations back-to-back launches, after opt.warmup, by CUDA events.
template <class Launch>
double time_launches(Options const& opt, Launch&& launch) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < opt.warmup; ++i) launch();
  CHECK_CUDA(cudaEventRecord(start));
  for (int i = 0; i < opt.iterations; ++i) launch();
  CHECK_CUDA(cudaEventRecord(stop));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float total_ms = 0.f;
  CHECK_CUDA(cudaEventElapsedTime(&total_ms, start, stop));
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return total_ms / std::max(1, opt.iterations);
}

template <class Element>
int run(Options const& opt) {
  Rows const rows = rows_of(opt);
  std::vector<int> const& sizes = rows.sizes;
  int const E = int(sizes.size());
  int64_t const rows_routed = rows.routed, M = rows.M, N = opt.n, K = opt.k;
  int const experts_hit = int(std::count_if(sizes.begin(), sizes.end(), [](int s) { return s > 0; }));

  int64_t const b_count = int64_t(E) * N * K;
  std::vector<int> row_expert(M, -1);
  for (int e = 0, row = 0; e < E; ++e)
    for (int i = 0; i < sizes[e]; ++i) row_expert[row++] = e;
  // --gather: `a` holds the source's T rows; row r of A reads source row (r * 7919) % T, so that rows repeat (the
  // MoE layer's tokens appear topk times) in a scattered order.
  int64_t const a_rows = opt.gather ? std::max<int64_t>(1, M / std::max(1, opt.topk)) : M;
  std::vector<int64_t> gather_rows(opt.gather ? M : 0);
  for (int64_t r = 0; r < int64_t(gather_rows.size()); ++r) gather_rows[r] = r * 7919 % a_rows;

  Element *a, *b, *d;
  int* m_sizes;
  int64_t* dev_gather_rows = nullptr;
  CHECK_CUDA(cudaMalloc(&a, std::max<int64_t>(1, a_rows * K) * sizeof(Element)));
  CHECK_CUDA(cudaMalloc(&b, std::max<int64_t>(1, b_count) * sizeof(Element)));
  CHECK_CUDA(cudaMalloc(&d, std::max<int64_t>(1, M * N) * sizeof(Element)));
  CHECK_CUDA(cudaMalloc(&m_sizes, std::max(1, E) * sizeof(int)));
  if (opt.gather) {
    CHECK_CUDA(cudaMalloc(&dev_gather_rows, std::max<int64_t>(1, M) * sizeof(int64_t)));
    CHECK_CUDA(cudaMemcpy(dev_gather_rows, gather_rows.data(), M * sizeof(int64_t), cudaMemcpyHostToDevice));
  }
  fill_small_integers<<<1024, 256>>>(a, a_rows * K, uint32_t(opt.seed) * 2 + 1);
  fill_small_integers<<<1024, 256>>>(b, b_count, uint32_t(opt.seed) * 2 + 2);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaMemcpy(m_sizes, sizes.data(), E * sizeof(int), cudaMemcpyHostToDevice));
  // Poison D (0xFF bytes are NaN in both types) so that any element the kernel skips shows up.
  CHECK_CUDA(cudaMemset(d, 0xFF, M * N * sizeof(Element)));

  moe_gemm::GroupedGemmParams params;
  params.a = a;
  params.b = b;
  params.d = d;
  params.m_sizes = m_sizes;
  params.b_n_major = opt.layout == "kn";
  params.dtype = std::is_same_v<Element, cutlass::bfloat16_t> ? moe_gemm::DType::kBFloat16 : moe_gemm::DType::kFloat16;
  params.M = M;
  params.N = N;
  params.K = K;
  params.E = E;
  params.lda = K;
  params.ldb = params.b_n_major ? N : K;
  params.batch_stride_b = N * K;
  params.ldd = N;
  params.gather_rows = dev_gather_rows;
  params.gather_source_rows = opt.gather ? a_rows : 0;
  moe_gemm::PlanOverride plan_override;
  plan_override.dynamic_schedule = opt.dynamic;
  plan_override.split_k = opt.split_k;
  if (!moe_gemm::parse_tile_config(opt.config.c_str(), &plan_override.config)) {
    std::fprintf(stderr, "unknown --config=%s\n", opt.config.c_str());
    return 1;
  }
  if (char const* problem = moe_gemm::check_plan_override(plan_override); problem != nullptr) {
    std::fprintf(stderr, "--config=%s --split_k=%d --dynamic=%d: %s\n", opt.config.c_str(), opt.split_k, opt.dynamic,
                 problem);
    return 1;
  }
  if (char const* problem = moe_gemm::check_grouped_gemm(params)) {
    std::fprintf(stderr, "cannot run: %s\n", problem);
    return 1;
  }
  moe_gemm::GroupedGemmPlan const plan = moe_gemm::plan_grouped_gemm(params, plan_override);
  if (char const* problem = moe_gemm::check_grouped_gemm_plan(params, plan)) {
    std::fprintf(stderr, "cannot run --config=%s%s: %s\n", opt.config.c_str(), opt.gather ? " --gather" : "", problem);
    return 1;
  }
  params.workspace = allocate_workspace(plan.workspace.total_bytes);
  auto launch = [&]() { CHECK_CUDA(moe_gemm::run_grouped_gemm(params, plan, nullptr)); };
  if (!first_launch(opt, launch)) {
    return 0;
  }

  bool const passed = !opt.verify || matches_reference(d, M, N, row_expert, [&](float* ref, int const* experts) {
    reference_grouped_gemm<<<unsigned((M * N + 255) / 256), 256>>>(a, dev_gather_rows, b, ref, experts, M, N, K,
                                                                  params.b_n_major);
  });

  double const ms = time_launches(opt, launch);
  double const flops = 2.0 * rows_routed * N * K;
  double const bytes = (double(experts_hit) * N * K + double(M) * K + double(M) * N) * sizeof(Element);
  std::printf("experts=%d hit=%d M=%lld N=%lld K=%lld dtype=%s layout=%s config=%s schedule=%s split_k=%d%s\n", E,
              experts_hit, (long long)M, (long long)N, (long long)K, opt.dtype.c_str(), opt.layout.c_str(),
              moe_gemm::tile_config_name(plan.config), plan.dynamic_schedule ? "dynamic" : "static", plan.split_k,
              opt.gather ? (" gather from " + std::to_string(a_rows) + " rows").c_str() : "");
  print_time(ms, flops, bytes);

  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  CHECK_CUDA(cudaFree(d));
  CHECK_CUDA(cudaFree(m_sizes));
  if (dev_gather_rows) CHECK_CUDA(cudaFree(dev_gather_rows));
  if (params.workspace) CHECK_CUDA(cudaFree(params.workspace));
  return passed ? 0 : 1;
}

// --dtype=fp8: the scale of index i, a power of two from 2^-1 to 2^1, so that scaled products stay exact.
__global__ void fill_power_of_two_scales(float* ptr, int64_t count, uint32_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t const h = (uint64_t(i) * 0x9E3779B97F4A7C15ull + seed) >> 33;
    ptr[i] = float(h % 3 == 0 ? 0.5 : h % 3 == 1 ? 1.0 : 2.0);
  }
}

// The FP8 reference: d[row, col] = sum over k-blocks of (sum_k a * b) * x scale * w scale, the scales as
// moe_gemm::Fp8ScaleParams lays them out (x_groups 0: one x scale per row; rowwise: w_scale [E, N]).
__global__ void reference_grouped_gemm_fp8(cutlass::float_e4m3_t const* a, cutlass::float_e4m3_t const* b,
                                           moe_gemm::Fp8ScaleParams scales, float* d, int const* row_expert,
                                           int64_t rows, int64_t n, int64_t k) {
  int64_t const idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * n) return;
  int64_t const row = idx / n, col = idx % n;
  int const e = row_expert[row];
  if (e < 0) {
    d[idx] = 0.f;
    return;
  }
  int64_t const k_groups = (k + 127) / 128, n_groups = (n + 127) / 128;
  float sum = 0.f;
  for (int64_t g = 0; g < k_groups; ++g) {
    float block = 0.f;
    for (int64_t i = g * 128; i < std::min(k, g * 128 + 128); ++i) {
      block += float(a[row * k + i]) * float(b[(int64_t(e) * n + col) * k + i]);
    }
    float const x_scale = scales.x_scale[scales.x_groups > 0 ? row * scales.x_groups + g : row];
    float const w_scale = scales.kind == moe_gemm::Fp8Scales::kRowwise
                              ? scales.w_scale[int64_t(e) * n + col]
                              : scales.w_scale[(int64_t(e) * n_groups + col / 128) * k_groups + g];
    sum += block * x_scale * w_scale;
  }
  d[idx] = sum;
}

// --dtype=fp8: the FP8 kernel (run_grouped_gemm_fp8), e4m3 operands [M, K] and [E, N, K], bf16 output, the
// scales of --scales.
int run_fp8(Options const& opt) {
  using Fp8 = cutlass::float_e4m3_t;
  using Out = cutlass::bfloat16_t;
  Rows const rows = rows_of(opt);
  std::vector<int> const& sizes = rows.sizes;
  int const E = int(sizes.size());
  int64_t const rows_routed = rows.routed, M = rows.M, N = opt.n, K = opt.k;
  int64_t const k_groups = (K + 127) / 128, n_groups = (N + 127) / 128;
  int const experts_hit = int(std::count_if(sizes.begin(), sizes.end(), [](int s) { return s > 0; }));
  bool const blockwise = opt.scales == "blockwise";
  if (!blockwise && opt.scales != "rowwise") {
    std::fprintf(stderr, "unknown --scales=%s (rowwise or blockwise)\n", opt.scales.c_str());
    return 1;
  }
  std::vector<int> row_expert(M, -1);
  for (int e = 0, row = 0; e < E; ++e)
    for (int i = 0; i < sizes[e]; ++i) row_expert[row++] = e;

  int64_t const b_count = int64_t(E) * N * K;
  int64_t const x_scale_count = blockwise ? M * k_groups : M;
  int64_t const w_scale_count = blockwise ? int64_t(E) * n_groups * k_groups : int64_t(E) * N;
  Fp8 *a, *b;
  Out* d;
  float *x_scale, *w_scale;
  int* m_sizes;
  CHECK_CUDA(cudaMalloc(&a, std::max<int64_t>(1, M * K)));
  CHECK_CUDA(cudaMalloc(&b, std::max<int64_t>(1, b_count)));
  CHECK_CUDA(cudaMalloc(&d, std::max<int64_t>(1, M * N) * sizeof(Out)));
  CHECK_CUDA(cudaMalloc(&x_scale, std::max<int64_t>(1, x_scale_count) * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&w_scale, std::max<int64_t>(1, w_scale_count) * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&m_sizes, std::max(1, E) * sizeof(int)));
  fill_small_integers<<<1024, 256>>>(a, M * K, uint32_t(opt.seed) * 2 + 1);
  fill_small_integers<<<1024, 256>>>(b, b_count, uint32_t(opt.seed) * 2 + 2);
  fill_power_of_two_scales<<<1024, 256>>>(x_scale, x_scale_count, uint32_t(opt.seed) * 2 + 3);
  fill_power_of_two_scales<<<1024, 256>>>(w_scale, w_scale_count, uint32_t(opt.seed) * 2 + 4);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaMemcpy(m_sizes, sizes.data(), E * sizeof(int), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(d, 0xFF, M * N * sizeof(Out)));  // NaN: an element the kernel skips shows up

  moe_gemm::GroupedGemmParams params;
  params.a = a;
  params.b = b;
  params.d = d;
  params.m_sizes = m_sizes;
  params.dtype = moe_gemm::DType::kBFloat16;  // the output's
  params.M = M;
  params.N = N;
  params.K = K;
  params.E = E;
  params.lda = K;
  params.ldb = K;
  params.batch_stride_b = N * K;
  params.ldd = N;
  moe_gemm::Fp8ScaleParams scales;
  scales.kind = blockwise ? moe_gemm::Fp8Scales::kBlockwise : moe_gemm::Fp8Scales::kRowwise;
  scales.x_scale = x_scale;
  scales.w_scale = w_scale;
  scales.x_groups = blockwise ? int32_t(k_groups) : 0;
  moe_gemm::PlanOverride plan_override;
  plan_override.dynamic_schedule = opt.dynamic;
  if (!moe_gemm::parse_tile_config(opt.config.c_str(), &plan_override.config)) {
    std::fprintf(stderr, "unknown --config=%s\n", opt.config.c_str());
    return 1;
  }
  moe_gemm::GroupedGemmPlan const plan = moe_gemm::plan_grouped_gemm_fp8(params, scales.kind, plan_override);
  if (char const* problem = moe_gemm::check_grouped_gemm_fp8(params, scales, plan)) {
    std::fprintf(stderr, "cannot run: %s\n", problem);
    return 1;
  }
  params.workspace = allocate_workspace(plan.workspace.total_bytes);
  auto launch = [&]() { CHECK_CUDA(moe_gemm::run_grouped_gemm_fp8(params, scales, plan, nullptr)); };
  if (!first_launch(opt, launch)) {
    return 0;
  }

  bool const passed = !opt.verify || matches_reference(d, M, N, row_expert, [&](float* ref, int const* experts) {
    reference_grouped_gemm_fp8<<<unsigned((M * N + 255) / 256), 256>>>(a, b, scales, ref, experts, M, N, K);
  });

  double const ms = time_launches(opt, launch);
  double const flops = 2.0 * rows_routed * N * K;
  double const bytes = double(experts_hit) * N * K + double(M) * K + double(M) * N * sizeof(Out);
  std::printf("experts=%d hit=%d M=%lld N=%lld K=%lld dtype=fp8 scales=%s config=%s schedule=%s\n", E, experts_hit,
              (long long)M, (long long)N, (long long)K, opt.scales.c_str(), moe_gemm::tile_config_name(plan.config),
              plan.dynamic_schedule ? "dynamic" : "static");
  print_time(ms, flops, bytes);

  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  CHECK_CUDA(cudaFree(d));
  CHECK_CUDA(cudaFree(x_scale));
  CHECK_CUDA(cudaFree(w_scale));
  CHECK_CUDA(cudaFree(m_sizes));
  if (params.workspace) CHECK_CUDA(cudaFree(params.workspace));
  return passed ? 0 : 1;
}

// grad_W[e][p][q] = sum over the expert's rows of L[row][p] * R[row][q]; one thread per gradient element. Row
// `row` of L is row l_rows[row] of `l` when l_rows is given, likewise for R.
template <class Element>
__global__ void reference_grouped_wgrad(Element const* l, int64_t const* l_rows, Element const* r,
                                        int64_t const* r_rows, float* d, int64_t const* row_start, int const* sizes,
                                        int E, int64_t P, int64_t Q) {
  int64_t const idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(E) * P * Q) return;
  int const e = int(idx / (P * Q));
  int64_t const p = idx / Q % P, q = idx % Q;
  float sum = 0.f;
  for (int64_t row = row_start[e]; row < row_start[e] + sizes[e]; ++row) {
    int64_t const l_row = l_rows != nullptr ? l_rows[row] : row;
    int64_t const r_row = r_rows != nullptr ? r_rows[row] : row;
    sum += float(l[l_row * P + p]) * float(r[r_row * Q + q]);
  }
  d[idx] = sum;
}

// --wgrad: the K-grouped weight-gradient kernel. x [M, K] and grad_y [M, N]; the gradient is [E, N, K]
// (L = grad_y, R = x), or [E, K, N] with --layout=kn (L = x, R = grad_y). --gather=x (grad_y): that operand is a
// [T = M / topk, *] source whose row (r * 7919) % T is row r, read in place (grouped_mm_wgrad_gather).
template <class Element>
int run_wgrad(Options const& opt) {
  Rows const rows = rows_of(opt);
  std::vector<int> const& sizes = rows.sizes;
  int const E = int(sizes.size());
  int64_t const rows_routed = rows.routed, M = rows.M;
  bool const transposed = opt.layout == "kn";
  int64_t const P = transposed ? opt.k : opt.n, Q = transposed ? opt.n : opt.k;
  std::vector<int64_t> row_start(std::max(E, 1), 0);
  for (int e = 1; e < E; ++e) row_start[e] = row_start[e - 1] + sizes[e - 1];
  // x is L when transposed, else R.
  bool const gather_l = opt.gather_operand == (transposed ? "x" : "grad_y");
  bool const gather_r = opt.gather_operand == (transposed ? "grad_y" : "x");
  int64_t const source_rows = std::max<int64_t>(1, M / std::max(1, opt.topk));
  int64_t const l_rows_count = gather_l ? source_rows : M, r_rows_count = gather_r ? source_rows : M;
  std::vector<int64_t> gather_rows(gather_l || gather_r ? M : 0);
  for (int64_t i = 0; i < int64_t(gather_rows.size()); ++i) gather_rows[i] = i * 7919 % source_rows;

  Element *l, *r;
  float* d32 = nullptr;
  Element* d16 = nullptr;
  int* m_sizes;
  int64_t* dev_gather_rows = nullptr;
  int64_t const d_count = int64_t(E) * P * Q;
  CHECK_CUDA(cudaMalloc(&l, std::max<int64_t>(1, l_rows_count * P) * sizeof(Element)));
  CHECK_CUDA(cudaMalloc(&r, std::max<int64_t>(1, r_rows_count * Q) * sizeof(Element)));
  CHECK_CUDA(cudaMalloc(&m_sizes, std::max(1, E) * sizeof(int)));
  if (!gather_rows.empty()) {
    CHECK_CUDA(cudaMalloc(&dev_gather_rows, M * sizeof(int64_t)));
    CHECK_CUDA(cudaMemcpy(dev_gather_rows, gather_rows.data(), M * sizeof(int64_t), cudaMemcpyHostToDevice));
  }
  if (opt.accumulate) {
    CHECK_CUDA(cudaMalloc(&d32, std::max<int64_t>(1, d_count) * sizeof(float)));
    CHECK_CUDA(cudaMemset(d32, 0, d_count * sizeof(float)));  // the main-grad the first launch adds into
  } else {
    CHECK_CUDA(cudaMalloc(&d16, std::max<int64_t>(1, d_count) * sizeof(Element)));
    CHECK_CUDA(cudaMemset(d16, 0xFF, d_count * sizeof(Element)));  // NaN: unwritten elements show up
  }
  fill_small_integers<<<1024, 256>>>(l, l_rows_count * P, uint32_t(opt.seed) * 2 + 1);
  fill_small_integers<<<1024, 256>>>(r, r_rows_count * Q, uint32_t(opt.seed) * 2 + 2);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaMemcpy(m_sizes, sizes.data(), E * sizeof(int), cudaMemcpyHostToDevice));

  moe_gemm::GroupedWgradParams params;
  params.l = l;
  params.r = r;
  params.d = opt.accumulate ? static_cast<void*>(d32) : static_cast<void*>(d16);
  params.m_sizes = m_sizes;
  params.dtype = std::is_same_v<Element, cutlass::bfloat16_t> ? moe_gemm::DType::kBFloat16 : moe_gemm::DType::kFloat16;
  params.d_float32 = opt.accumulate;
  params.accumulate = opt.accumulate;
  params.M = M;
  params.P = P;
  params.Q = Q;
  params.E = E;
  params.ldl = P;
  params.ldr = Q;
  params.ldd = Q;
  params.batch_stride_d = P * Q;
  params.l_rows = gather_l ? dev_gather_rows : nullptr;
  params.l_source_rows = l_rows_count;
  params.r_rows = gather_r ? dev_gather_rows : nullptr;
  params.r_source_rows = r_rows_count;
  if (char const* problem = moe_gemm::check_grouped_wgrad(params)) {
    std::fprintf(stderr, "cannot run: %s\n", problem);
    return 1;
  }
  moe_gemm::GroupedWgradPlan const plan = moe_gemm::plan_grouped_wgrad(params);
  params.workspace = allocate_workspace(plan.workspace.total_bytes);
  auto launch = [&]() { CHECK_CUDA(moe_gemm::run_grouped_wgrad(params, plan, nullptr)); };
  if (!first_launch(opt, launch)) {
    return 0;
  }

  bool passed = true;
  if (opt.verify && d_count > 0) {
    float* ref;
    int64_t* dev_row_start;
    CHECK_CUDA(cudaMalloc(&ref, d_count * sizeof(float)));
    CHECK_CUDA(cudaMalloc(&dev_row_start, E * sizeof(int64_t)));
    CHECK_CUDA(cudaMemcpy(dev_row_start, row_start.data(), E * sizeof(int64_t), cudaMemcpyHostToDevice));
    reference_grouped_wgrad<<<unsigned((d_count + 255) / 256), 256>>>(l, params.l_rows, r, params.r_rows, ref,
                                                                      dev_row_start, m_sizes, E, P, Q);
    CHECK_CUDA(cudaGetLastError());
    std::vector<float> host_ref(d_count), host_d(d_count);
    CHECK_CUDA(cudaMemcpy(host_ref.data(), ref, d_count * sizeof(float), cudaMemcpyDeviceToHost));
    if (opt.accumulate) {
      CHECK_CUDA(cudaMemcpy(host_d.data(), d32, d_count * sizeof(float), cudaMemcpyDeviceToHost));
    } else {
      std::vector<Element> out(d_count);
      CHECK_CUDA(cudaMemcpy(out.data(), d16, d_count * sizeof(Element), cudaMemcpyDeviceToHost));
      for (int64_t i = 0; i < d_count; ++i) host_d[i] = float(out[i]);
    }
    // Integer sums are exact in float32: the float32 gradient must match exactly, the 16-bit one after rounding.
    if (!opt.accumulate) {
      for (int64_t i = 0; i < d_count; ++i) host_ref[i] = float(Element(host_ref[i]));
    }
    passed = count_mismatches(host_d, host_ref, [&](int64_t i) {
               return "expert " + std::to_string(i / (P * Q)) + " p " + std::to_string(i / Q % P) + " q " +
                      std::to_string(i % Q);
             }) == 0;
    CHECK_CUDA(cudaFree(ref));
    CHECK_CUDA(cudaFree(dev_row_start));
  }

  double const ms = time_launches(opt, launch);
  double const flops = 2.0 * rows_routed * P * Q;
  size_t const d_element = opt.accumulate ? sizeof(float) : sizeof(Element);
  double const bytes = double(M) * (P + Q) * sizeof(Element) + double(d_count) * d_element;
  std::string const gathered =
      gather_l || gather_r ? " " + opt.gather_operand + " gathered from " + std::to_string(source_rows) + " rows" : "";
  std::printf("wgrad experts=%d M=%lld gradient=[%d, %lld, %lld] dtype=%s layout=%s%s%s\n", E, (long long)M, E,
              (long long)P, (long long)Q, opt.dtype.c_str(), opt.layout.c_str(),
              opt.accumulate ? " accumulated into float32" : "", gathered.c_str());
  print_time(ms, flops, bytes);
  CHECK_CUDA(cudaFree(l));
  CHECK_CUDA(cudaFree(r));
  CHECK_CUDA(cudaFree(m_sizes));
  if (dev_gather_rows) CHECK_CUDA(cudaFree(dev_gather_rows));
  if (d32) CHECK_CUDA(cudaFree(d32));
  if (d16) CHECK_CUDA(cudaFree(d16));
  if (params.workspace) CHECK_CUDA(cudaFree(params.workspace));
  return passed ? 0 : 1;
}

int main(int argc, char const** argv) {
  Options opt;
  opt.parse(argc, argv);
  if (opt.help) {
    Options::usage();
    return 0;
  }
  if (opt.wgrad && opt.gather && opt.gather_operand != "x" && opt.gather_operand != "grad_y") {
    std::fprintf(stderr, "--wgrad --gather=x|grad_y: say which operand's rows are gathered\n");
    return 1;
  }
  if (!opt.wgrad && !opt.gather_operand.empty()) {
    std::fprintf(stderr, "--gather=%s is a --wgrad option: the forward gathers A's rows (plain --gather)\n",
                 opt.gather_operand.c_str());
    return 1;
  }
  if (opt.dtype == "fp8") {
    if (opt.wgrad || opt.gather || opt.layout != "nk" || opt.split_k > 1) {
      std::fprintf(stderr, "--dtype=fp8: the forward of [E, N, K] weights only (no --wgrad, --gather, --layout=kn or "
                           "--split_k)\n");
      return 1;
    }
    return run_fp8(opt);
  }
  if (opt.wgrad) {
    if (opt.dtype == "fp16") return run_wgrad<cutlass::half_t>(opt);
    if (opt.dtype == "bf16") return run_wgrad<cutlass::bfloat16_t>(opt);
  } else {
    if (opt.dtype == "fp16") return run<cutlass::half_t>(opt);
    if (opt.dtype == "bf16") return run<cutlass::bfloat16_t>(opt);
  }
  std::fprintf(stderr, "unknown --dtype=%s (bf16, fp16 or fp8)\n", opt.dtype.c_str());
  return 1;
}

// The fused CPU twin of the LAMB and LARS kernels: torch.ops.lamb_cpu.lamb_step_ / lars_step_.
//
// Same pass structure as the CUDA kernels and the same per-element math (include/lamb_math.h):
//   pass A  reads g, w, m, v; writes m, v (unless finiteness must first be checked, or the moments are stored
//           in 16 bits and the tensor has no scratch: see defer_moments in cpu/lamb_cpu_kernels.inc); accumulates
//           ||w||^2, ||u||^2 (and with check_finite sum g^2, finite iff every g is) per chunk: fp32 runs of
//           256 elements added in double (see kSumRun in cpu/lamb_cpu_kernels.inc);
//   ratio   per tensor, from the chunk sums added in chunk order (fixed chunking: the result does not
//           depend on the thread count);
//   pass B  reads w, m, v (and g when recomputing), writes w (and the low-precision copy).
// The same step split in two ops (lamb_pass_a_ / lamb_pass_b_, lars_pass_a_ / lars_pass_b_) for tensors
// that are pieces of parameters (ZeRO partitions): pass A returns the pieces' partial squared norms, the
// caller completes them across the pieces (an all-reduce), pass B applies the exact ratios; see "split steps".
// fp32 LAMB moves 40 bytes a parameter a step (24 in pass A, 16 in pass B); with check_finite it is 44
// (pass A only reads: 16; pass B reads g, w, m, v and writes m, v, w: 28).  LARS moves 28 (8 + 20).
//
// Cache blocking (the one-call steps): consecutive tensors are stepped in blocks of at most g_block elements
// (a larger tensor is a block by itself); pass A, the ratios and pass B run block by block, so pass B finds
// w, m, v (g for LARS) of a block still in the last-level cache where pass A left them, and memory traffic for
// such tensors drops to pass A's (24 B/param for fp32 LAMB) plus the write of w.  LAMB's pass A also keeps each
// element's u in a scratch buffer (attach_scratch), so that pass B reads w and u and computes w - s u without
// m, v, the square root and the division: a CPU with fast memory is bound by that arithmetic, which LAMB would
// otherwise do twice.  A tensor alone in its block keeps a scratch too, up to g_scratch_limit elements.
// Results are bit-identical to unblocked stepping: each tensor's norms are summed over the same fixed chunks in
// the same order, and u is the same value either way.  Not with check_finite (every gradient is checked before
// anything is written) nor in the split ops (the norms are completed by the caller between the passes).
//
// Threads: at::parallel_for over chunks of kChunk elements.  The norms' partial sums live in a buffer of
// at most kWave chunks (pass A runs in waves of kWave chunks), so no allocation grows with the
// parameter count.  SIMD: the loops are compiled three times, for baseline x86-64, AVX2+FMA and AVX-512, and
// the best is picked from cpuid at run time (never -march=native, so a cached build can move between machines).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <unistd.h>  // sysconf: the last-level cache size for the default cache block (where sysfs has none)

#include "include/lamb_math.h"

namespace lamb_cpu {

using namespace lamb_math;

constexpr int64_t kChunk = 16384;  // elements per chunk (64 KiB of fp32 per buffer)
constexpr int64_t kWave = 256;     // chunks per pass-A wave (the partial-sum buffer: 256 x 3 doubles)

// Default cache block: the largest power of two between 256Ki and 2Mi elements whose pass-A data (20 B an
// element: g, w, m, v and the scratch u) fill at most half the last-level cache, 1Mi where the cache size is
// unknown.  The cache size is the kernel's (sysfs: the L3 that cpu0 shares), else glibc's sysconf: on a 2-vCPU
// AMD EPYC (Zen 1) VM, sysfs says 8 MiB, the L3 of the core complex the VM runs on, while sysconf says 64 MiB,
// the whole chip's.  Swept with `bench_fused_cpu.py --blocks` (benchmarks/results/: zen1/, xeon/, and Zen 4):
// on that Zen 1 VM 256Ki and 1Mi were within 5% of each other, 2Mi 10% slower; on a 2-vCPU Intel Xeon
// VM (AVX-512, its L3 read by sysconf as 480 MiB) 1Mi, 2Mi and 4Mi were the fastest, in an order that changed
// between runs, and 512Ki about 5% slower than the best; on a 2-core AMD EPYC Zen 4 with a 32 MiB L3 (512Ki by
// this rule) 256Ki..1Mi were within 1% and 4Mi lost most of the gain, and in a later run, with other tenants
// loading the shared L3, 256Ki..2Mi were within 4% and blocking gained nothing over unblocked stepping; there a
// 1Mi block (the feed-forward matrices with their scratch, 20 MiB) ran 12-23% faster or slower than 512Ki from
// one process to the next: the margin of half the cache keeps the default clear of that.  On a 2-vCPU Zen 3
// (AVX2, 32 MiB L3; zen3/) 256Ki..2Mi were within 2% on the whole set and blocking gained 13%; by tensor class
// (bench_tensor_classes.py) 1Mi ran the feed-forward matrices (1Mi elements each) 1.15x AdamW against 1.27x at
// 512Ki, the attention matrices 1.21x against 1.15x, which evens out over the set: the feed-forward gain was
// their scratch, which a tensor alone in its block now keeps at any block size (default_scratch_limit).  The
// 2Mi cap bounds a block of several tensors' scratch (8 MiB).
constexpr int64_t kMinBlock = int64_t{1} << 18;
constexpr int64_t kMaxBlock = int64_t{1} << 21;
constexpr int64_t kUnknownCacheBlock = int64_t{1} << 20;

// The level-3 cache size in bytes from /sys/devices/system/cpu/cpu0/cache/index*/{level,size} ("8192K"),
// 0 where there is none.
static int64_t sysfs_l3_bytes() {
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level(dir + "level"), size(dir + "size");
    int lv = 0;
    if (!(level >> lv)) break;  // no more cache levels
    if (lv != 3) continue;
    int64_t n = 0;
    char unit = 0;
    if (!(size >> n)) return 0;
    size >> unit;
    return unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : unit == 'G' ? n << 30 : n;
  }
  return 0;
}

// The last-level cache in bytes: sysfs, else sysconf; 0 where neither knows.
static int64_t llc_bytes() {
  int64_t llc = sysfs_l3_bytes();
#ifdef _SC_LEVEL3_CACHE_SIZE
  if (llc <= 0) llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  return llc > 0 ? llc : 0;
}

static int64_t default_block(int64_t llc) {
  if (llc <= 0) return kUnknownCacheBlock;
  int64_t b = kMinBlock;
  while (b * 2 <= kMaxBlock && b * 2 * 20 * 2 <= llc) b *= 2;
  return b;
}

// Default scratch limit: a tensor alone in its block (larger than the cache block) keeps its u in the scratch
// up to the size whose pass-A data with the scratch (20 B an element) come to twice the last-level cache, at
// most 4Mi elements (a 16 MiB buffer); 4Mi where the cache size is unknown.  Where such a tensor has left the
// cache before pass B, the scratch costs the same bytes (pass A writes u, 4 B; pass B reads w and u, 8 B,
// instead of w, m, v, 12 B) plus the read for ownership of the scratch's lines, and saves pass B's square root
// and division: that pays while much of the tensor is still in cache when pass B comes.  Measured with tensors
// of one shape on a 2-vCPU Zen 3 (32 MiB L3, a limit of 3.36M elements by this rule; pass A + B against
// torch's fused AdamW, median of 7-9 rounds, without -> with the scratch): 1Mi elements (20 MiB) 1.29x ->
// 1.15x, 2Mi (40 MiB) 1.56x -> 1.44x, 768 x 3072 (BERT-base's feed-forward matrices, 45 MiB) 1.55x -> 1.47x,
// 4Mi (80 MiB) 1.52x -> 1.55x, 8Mi 1.57x -> 1.60x, the 30522 x 512 word embedding (15.6M, 298 MiB) 1.61x ->
// 1.70x.
constexpr int64_t kMaxScratch = int64_t{1} << 22;

static int64_t default_scratch_limit(int64_t llc) {
  if (llc <= 0) return kMaxScratch;
  return std::min(kMaxScratch, 2 * llc / 20);
}

struct TensorRef {
  void* p;           // the parameter (written)
  const void* g;     // its gradient
  void* m;           // exp_avg, or LARS's momentum_buffer
  void* v;           // exp_avg_sq (LAMB only)
  float* master;     // fp32 master weights, or nullptr
  int64_t numel;
  int combo;
  LambStepCoef coef;  // LAMB bias-correction terms at this tensor's step
  float s;           // pass B step: lr_t * rho (LAMB), lr * rho (LARS)
  float decay;       // lr * wd in LAMB's "decoupled" mode, else 0
  float* scratch;    // LAMB: where pass A keeps u for pass B (element i at scratch[i]), or nullptr
};

namespace base {
#include "cpu/lamb_cpu_kernels.inc"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu/lamb_cpu_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
// 512-bit vectors (GCC otherwise prefers 256-bit ones even where AVX-512 is enabled).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,prefer-vector-width=512")
namespace avx512 {
#include "cpu/lamb_cpu_kernels.inc"
}  // namespace avx512
#pragma GCC pop_options
#define LAMB_CPU_HAS_X86_ISAS 1
#endif

// 0: baseline loops, 1: AVX2+FMA, 2: AVX-512 (F/VL/BW/DQ); -1: the best the CPU has (the default;
// LAMB_CPU_ISA=base|avx2|avx512 caps it).
static int g_isa = -1;

static int best_isa() {
#ifdef LAMB_CPU_HAS_X86_ISAS
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return 2;
  return 1;
#else
  return 0;
#endif
}

static int detect_isa() {
  const int best = best_isa();
  const char* env = std::getenv("LAMB_CPU_ISA");
  if (env == nullptr) return best;
  const std::string want(env);
  TORCH_CHECK(want == "base" || want == "avx2" || want == "avx512", "lamb fused CPU: LAMB_CPU_ISA='", want,
              "' is not one of base, avx2, avx512 (it caps the SIMD loops picked from cpuid; unset it for the best)");
  const int cap = want == "base" ? 0 : want == "avx2" ? 1 : 2;
  return std::min(best, cap);
}

static int isa() {
  if (g_isa < 0) g_isa = detect_isa();
  return g_isa;
}

// Select the loops (tests run each one the CPU has): -1 re-detects; returns the ISA now in use.
int64_t set_isa(int64_t which) {
  if (which < 0) {
    g_isa = detect_isa();
  } else {
    TORCH_CHECK(which >= 0 && which <= best_isa(), "lamb_cpu.set_isa: ISA ", which,
                " (0 base, 1 avx2, 2 avx512) is not available on this machine (best: ", best_isa(), ")");
    g_isa = static_cast<int>(which);
  }
  return g_isa;
}

// Run the chunk function NAME of the selected ISA's loops.
#ifdef LAMB_CPU_HAS_X86_ISAS
#define LAMB_CPU_DISPATCH(isa_, NAME, ...)                   \
  do {                                                       \
    if ((isa_) == 2) return avx512::NAME(__VA_ARGS__);       \
    if ((isa_) == 1) return avx2::NAME(__VA_ARGS__);         \
    return base::NAME(__VA_ARGS__);                          \
  } while (0)
#else
#define LAMB_CPU_DISPATCH(isa_, NAME, ...) return base::NAME(__VA_ARGS__)
#endif

// Elements per cache block (0: no blocking, every tensor in one block); set_cache_block(-1) restores the
// default.  Returns the previous value (benchmarks sweep it, tests force tiny blocks).
static const int64_t kDefaultBlock = default_block(llc_bytes());
static int64_t g_block = kDefaultBlock;

int64_t set_cache_block(int64_t elems) {
  const int64_t prev = g_block;
  g_block = elems < 0 ? kDefaultBlock : elems;
  return prev;
}

// The largest tensor alone in a block that keeps a scratch (0: none does; blocks of several tensors, at most
// g_block elements, always do); set_scratch_limit(-1) restores the default.  Returns the previous value.
static const int64_t kDefaultScratchLimit = default_scratch_limit(llc_bytes());
static int64_t g_scratch_limit = kDefaultScratchLimit;

int64_t set_scratch_limit(int64_t elems) {
  const int64_t prev = g_scratch_limit;
  g_scratch_limit = elems < 0 ? kDefaultScratchLimit : elems;
  return prev;
}

// ---------------------------------------------------------------------------------------- checks
// The dtype combination (lamb_math::Combo) of a parameter, its gradient and its state.
static int combo_of(const at::Tensor& p, const at::Tensor& g, const at::Tensor& state, bool master) {
  const auto pd = p.scalar_type();
  const auto gd = g.scalar_type();
  const auto sd = state.scalar_type();
  int combo = -1;
  if (!master) {
    TORCH_CHECK(sd == pd, "lamb fused CPU: state dtype ", sd, " differs from the parameter's ", pd,
                " (without master weights the state keeps the parameter's dtype)");
    if (pd == at::kFloat) combo = kF32;
    if (pd == at::kBFloat16) combo = kBF16;
    if (pd == at::kHalf) combo = kF16;
  } else {
    TORCH_CHECK(sd == at::kFloat, "lamb fused CPU: with master weights the state must be float32, got ", sd);
    if (pd == at::kBFloat16) combo = kBF16Master;
    if (pd == at::kHalf) combo = kF16Master;
  }
  TORCH_CHECK(combo >= 0, "lamb fused CPU: unsupported parameter dtype ", pd, (master ? " with master weights" : ""),
              "; supported: float32, bfloat16, float16 (bf16/fp16 with or without fp32 master weights)");
  if (gd == pd) return combo;
  TORCH_CHECK(gd == at::kFloat, "lamb fused CPU: gradient dtype ", gd, " differs from the parameter's ", pd,
              "; supported: the parameter's dtype, or float32 for a bfloat16/float16 parameter");
  return with_fp32_grad(combo);
}

static void check_like(const at::Tensor& t, const at::Tensor& p, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "lamb fused CPU: ", what, " is on ", t.device(), ", expected cpu");
  TORCH_CHECK(t.numel() == p.numel(), "lamb fused CPU: ", what, " has ", t.numel(), " elements, the parameter ",
              p.numel());
  TORCH_CHECK(t.numel() == 0 || (t.is_non_overlapping_and_dense() && t.strides() == p.strides()),
              "lamb fused CPU: ", what, " must be dense with the parameter's strides");
}

static void check_scalar_out(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1,
              "lamb fused CPU: ", what, " must be a one-element float32 CPU tensor");
}

static double read_scalar(const std::optional<at::Tensor>& t) { return t->item<double>(); }

// Chunks of tensor i are prefix[i] .. prefix[i+1]-1.
static std::vector<int64_t> chunk_prefix(const std::vector<TensorRef>& ts) {
  std::vector<int64_t> prefix(ts.size() + 1, 0);
  for (size_t i = 0; i < ts.size(); ++i) prefix[i + 1] = prefix[i] + (ts[i].numel + kChunk - 1) / kChunk;
  return prefix;
}

template <class F>
static void for_chunks(const std::vector<TensorRef>& ts, const std::vector<int64_t>& prefix, int64_t b,
                       int64_t e, const F& fn) {
  if (b >= e) return;
  int64_t ti = std::upper_bound(prefix.begin(), prefix.end(), b) - prefix.begin() - 1;
  for (int64_t c = b; c < e; ++c) {
    while (prefix[ti + 1] <= c) ++ti;
    const int64_t lo = (c - prefix[ti]) * kChunk;
    const int64_t hi = std::min(ts[ti].numel, lo + kChunk);
    fn(ts[ti], ti, lo, hi, c);
  }
}

// Pass A in waves: partial sums per chunk, then added per tensor in chunk order (deterministic).
template <class F>
static void reduce_pass(const std::vector<TensorRef>& ts, const std::vector<int64_t>& prefix,
                        std::vector<double>& sums /* 3 per tensor */, const F& chunk_fn) {
  const int64_t total = prefix.back();
  std::vector<double> partial(static_cast<size_t>(std::min(total, kWave)) * 3);
  for (int64_t w0 = 0; w0 < total; w0 += kWave) {
    const int64_t w1 = std::min(total, w0 + kWave);
    at::parallel_for(w0, w1, 1, [&](int64_t b, int64_t e) {
      for_chunks(ts, prefix, b, e, [&](const TensorRef& t, int64_t, int64_t lo, int64_t hi, int64_t c) {
        chunk_fn(t, lo, hi, &partial[(c - w0) * 3]);
      });
    });
    for_chunks(ts, prefix, w0, w1, [&](const TensorRef&, int64_t ti, int64_t, int64_t, int64_t c) {
      for (int k = 0; k < 3; ++k) sums[ti * 3 + k] += partial[(c - w0) * 3 + k];
    });
  }
}

// Block boundaries [0, b_1, .., n): consecutive tensors with at most g_block elements together.
static std::vector<size_t> cache_blocks(const std::vector<TensorRef>& ts, bool blocked) {
  std::vector<size_t> bounds{0};
  int64_t filled = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (blocked && g_block > 0 && filled > 0 && filled + ts[i].numel > g_block) {
      bounds.push_back(i);
      filled = 0;
    }
    filled += ts[i].numel;
  }
  if (bounds.back() != ts.size()) bounds.push_back(ts.size());
  return bounds;
}

// Run step_block(block, i0, n) on each cache block of ts in order (tensors i0 .. i0 + n - 1; the whole list
// in one block where !blocked); a step_block that returns false ends the step there.
template <class F>
static void for_each_block(const std::vector<TensorRef>& ts, bool blocked, const F& step_block) {
  const std::vector<size_t> bounds = cache_blocks(ts, blocked);
  for (size_t b = 0; b + 1 < bounds.size(); ++b) {
    const size_t i0 = bounds[b], n = bounds[b + 1] - i0;
    std::vector<TensorRef> block(ts.begin() + i0, ts.begin() + i0 + n);
    if (!step_block(block, i0, n)) return;
  }
}

// Whether every tensor's gradient statistic (the third of its three pass-A sums) is finite.
static bool gradients_finite(const std::vector<double>& sums) {
  for (size_t i = 2; i < sums.size(); i += 3)
    if (!std::isfinite(sums[i])) return false;
  return true;
}

// The update scratch of the blocked one-call LAMB step: a block of at most g_block elements, or a tensor alone
// in its block of at most g_scratch_limit, keeps u in a per-thread buffer of the block's size (at most
// max(g_block, g_scratch_limit) floats, 16 MiB at most by default; reused across steps, so nothing is allocated
// that grows with the parameter count).  Pass A writes it, pass B reads it instead of m and v and skips the
// sqrt and the division: on CPUs where the step is bound by arithmetic rather than memory that is most of pass
// B's cost.  A larger tensor has no scratch and recomputes u (see default_scratch_limit).
static void attach_scratch(std::vector<TensorRef>& block) {
  int64_t total = 0;
  for (const TensorRef& t : block) total += t.numel;
  if (g_block <= 0 || total == 0 || total > std::max(g_block, g_scratch_limit)) return;
  static thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < total) scratch.resize(static_cast<size_t>(total));
  int64_t off = 0;
  for (TensorRef& t : block) {
    t.scratch = scratch.data() + off;
    off += t.numel;
  }
}

template <class F>
static void update_pass(const std::vector<TensorRef>& ts, const std::vector<int64_t>& prefix, const F& chunk_fn) {
  at::parallel_for(0, prefix.back(), 1, [&](int64_t b, int64_t e) {
    for_chunks(ts, prefix, b, e,
               [&](const TensorRef& t, int64_t, int64_t lo, int64_t hi, int64_t) { chunk_fn(t, lo, hi); });
  });
}

static std::vector<TensorRef> collect(at::TensorList params, at::TensorList grads, at::TensorList bufs1,
                                      at::TensorList bufs2, const c10::List<std::optional<at::Tensor>>& masters,
                                      at::TensorList steps, at::TensorList trust_ratios, at::TensorList weight_norms,
                                      at::TensorList update_norms) {
  const size_t n = params.size();
  const bool has_stats = !(trust_ratios.empty() && weight_norms.empty() && update_norms.empty());
  TORCH_CHECK(grads.size() == n && bufs1.size() == n && (bufs2.empty() || bufs2.size() == n) &&
                  (masters.size() == n || masters.empty()) && steps.size() == n &&
                  (!has_stats || (trust_ratios.size() == n && weight_norms.size() == n && update_norms.size() == n)),
              "lamb fused CPU: the tensor lists must have one entry per parameter (master_params: or none)");
  std::vector<TensorRef> ts(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    // an empty master list: no parameter of the call has a master (lamb/_fused.py passes one so, since
    // torch.compile's inductor cannot yet take a written list that holds None)
    const std::optional<at::Tensor> mo = masters.empty() ? std::nullopt : masters.get(i);
    const bool has_master = mo.has_value() && mo->defined();
    TORCH_CHECK(p.device().is_cpu(), "lamb fused CPU: parameter ", i, " is on ", p.device());
    TORCH_CHECK(p.numel() == 0 || p.is_non_overlapping_and_dense(), "lamb fused CPU: parameter ", i,
                " is not dense (a view with gaps); the fused kernels need dense parameters");
    check_like(grads[i], p, "a gradient");
    check_like(bufs1[i], p, "a state buffer");
    if (!bufs2.empty()) {
      check_like(bufs2[i], p, "a state buffer");
      TORCH_CHECK(bufs2[i].scalar_type() == bufs1[i].scalar_type(),
                  "lamb fused CPU: exp_avg and exp_avg_sq dtypes differ");
    }
    TensorRef& t = ts[i];
    t.combo = combo_of(p, grads[i], bufs1[i], has_master);
    if (has_master) {
      check_like(*mo, p, "a master parameter");
      TORCH_CHECK(mo->scalar_type() == at::kFloat, "lamb fused CPU: master parameters must be float32");
      t.master = mo->data_ptr<float>();
    } else {
      t.master = nullptr;
    }
    check_scalar_out(steps[i], "state step");
    if (has_stats) {
      check_scalar_out(trust_ratios[i], "trust_ratio");
      check_scalar_out(weight_norms[i], "weight_norm");
      check_scalar_out(update_norms[i], "update_norm");
    }
    t.p = p.data_ptr();
    t.g = grads[i].data_ptr();
    t.m = bufs1[i].data_ptr();
    t.v = bufs2.empty() ? nullptr : bufs2[i].data_ptr();
    t.numel = p.numel();
    t.s = 0.0f;
    t.decay = 0.0f;
    t.scratch = nullptr;
  }
  return ts;
}

// gscale = +-1 / (grad_divisor * grad_scale); false where the step must be skipped (found_inf set, or a
// non-finite divisor/scale).
static bool grad_multiplier(const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf, bool maximize, float* gscale) {
  if (found_inf.has_value() && read_scalar(found_inf) != 0.0) return false;
  double div = 1.0;
  if (grad_divisor.has_value()) div *= read_scalar(grad_divisor);
  if (grad_scale.has_value()) div *= read_scalar(grad_scale);
  if (!std::isfinite(div) || div == 0.0) return false;
  *gscale = static_cast<float>((maximize ? -1.0 : 1.0) / div);
  return true;
}

// ---------------------------------------------------------------------------------------- LAMB
// lr_tensor: a learning rate held in a tensor (torch.compile keeps a tensor lr out of its guards, so a schedule
// does not recompile the step); read here, by the kernel, where the Python side would need a host read that
// breaks the graph.  Else lr.
static double lr_of(const std::optional<at::Tensor>& lr_tensor, double lr) {
  if (!lr_tensor.has_value() || !lr_tensor->defined()) return lr;
  TORCH_CHECK(lr_tensor->device().is_cpu() && lr_tensor->numel() == 1 && lr_tensor->is_floating_point(),
              "lamb fused CPU: lr_tensor must be a one-element floating-point CPU tensor, got ",
              lr_tensor->scalar_type(), " of ", lr_tensor->numel(), " elements on ", lr_tensor->device());
  return lr_tensor->item<double>();
}

#define LAMB_HP_ARGS                                                                                           \
  const std::optional<at::Tensor>&lr_tensor, double lr, double beta1, double beta2, double eps,                 \
      double weight_decay, int64_t weight_decay_mode, int64_t bias_correction, bool grad_averaging, bool adapt, \
      std::optional<double> min_trust_ratio, std::optional<double> max_trust_ratio,                            \
      std::optional<double> weight_norm_lo, std::optional<double> weight_norm_hi, bool maximize, bool check_finite
#define LAMB_HP_PASS                                                                                           \
  lr_of(lr_tensor, lr), beta1, beta2, eps, weight_decay, weight_decay_mode, bias_correction, grad_averaging,     \
      adapt, min_trust_ratio, max_trust_ratio, weight_norm_lo, weight_norm_hi

static LambParams lamb_params(double lr, double beta1, double beta2, double eps, double weight_decay,
                              int64_t weight_decay_mode, int64_t bias_correction, bool grad_averaging, bool adapt,
                              std::optional<double> min_trust_ratio, std::optional<double> max_trust_ratio,
                              std::optional<double> weight_norm_lo, std::optional<double> weight_norm_hi) {
  TORCH_CHECK(weight_decay_mode >= 0 && weight_decay_mode <= 2, "lamb fused CPU: bad weight_decay_mode");
  TORCH_CHECK(bias_correction >= 0 && bias_correction <= 2, "lamb fused CPU: bad bias_correction");
  LambParams hp{};
  hp.lr = static_cast<float>(lr);
  hp.beta1 = static_cast<float>(beta1);
  hp.beta2 = static_cast<float>(beta2);
  hp.beta3 = grad_averaging ? static_cast<float>(1.0 - beta1) : 1.0f;
  hp.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  hp.eps = static_cast<float>(eps);
  hp.weight_decay = static_cast<float>(weight_decay);
  hp.wd_l2 = (weight_decay_mode == kDecayL2) ? hp.weight_decay : 0.0f;
  hp.wd_ratio = (weight_decay_mode == kDecayRatio) ? hp.weight_decay : 0.0f;
  hp.decoupled = (weight_decay_mode == kDecayDecoupled && weight_decay != 0.0) ? 1 : 0;
  hp.bias_correction = static_cast<int>(bias_correction);
  hp.adapt = adapt ? 1 : 0;
  hp.has_bounds = weight_norm_lo.has_value() ? 1 : 0;
  hp.wn_lo = static_cast<float>(weight_norm_lo.value_or(0.0));
  hp.wn_hi = static_cast<float>(weight_norm_hi.value_or(0.0));
  hp.has_min = min_trust_ratio.has_value() ? 1 : 0;
  hp.has_max = max_trust_ratio.has_value() ? 1 : 0;
  hp.min_ratio = static_cast<float>(min_trust_ratio.value_or(0.0));
  hp.max_ratio = static_cast<float>(max_trust_ratio.value_or(0.0));
  hp.lr_wd = static_cast<float>(lr * weight_decay);
  return hp;
}

// Bias-correction terms at each tensor's next step (step itself is advanced after pass B).
static void lamb_coefs(std::vector<TensorRef>& ts, at::TensorList state_steps, const LambParams& hp) {
  const float decay = hp.decoupled ? hp.lr_wd : 0.0f;
  for (size_t i = 0; i < ts.size(); ++i) {
    const float t = state_steps[i].data_ptr<float>()[0] + 1.0f;
    ts[i].coef = lamb_step_coef(hp, hp.lr, t);
    ts[i].decay = decay;
  }
}

// Pass A: updates m, v (unless write is false) and sums ||w||^2, ||u||^2, sum g^2 per tensor (3 a tensor).
static std::vector<double> lamb_sums(const std::vector<TensorRef>& ts, const std::vector<int64_t>& prefix,
                                     const LambParams& hp, float gscale, bool write) {
  std::vector<double> sums(ts.size() * 3, 0.0);
  const int which = isa();
  reduce_pass(ts, prefix, sums, [&](const TensorRef& t, int64_t lo, int64_t hi, double* acc) {
    LAMB_CPU_DISPATCH(which, lamb_chunk_a, t, lo, hi, hp, gscale, write, acc);
  });
  return sums;
}

// Ratio from the (full) squared norms w2[i * stride], u2[i * stride], statistics, pass B, step += 1.
static void lamb_apply_all(std::vector<TensorRef>& ts, const std::vector<int64_t>& prefix, const LambParams& hp,
                           float gscale, bool recompute, const double* w2, const double* u2, int64_t stride,
                           at::TensorList state_steps, at::TensorList trust_ratios, at::TensorList weight_norms,
                           at::TensorList update_norms) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const float wn = static_cast<float>(std::sqrt(w2[i * stride]));
    const float un = static_cast<float>(std::sqrt(u2[i * stride]));
    const float rho = lamb_trust_ratio(wn, un, hp);
    ts[i].s = ts[i].coef.lr_t * rho;
    trust_ratios[i].data_ptr<float>()[0] = rho;
    weight_norms[i].data_ptr<float>()[0] = wn;
    update_norms[i].data_ptr<float>()[0] = un;
  }
  const int which = isa();
  update_pass(ts, prefix, [&](const TensorRef& t, int64_t lo, int64_t hi) {
    LAMB_CPU_DISPATCH(which, lamb_chunk_b, t, lo, hi, hp, gscale, recompute);
  });
  for (size_t i = 0; i < ts.size(); ++i) state_steps[i].data_ptr<float>()[0] += 1.0f;
}

void lamb_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
               at::TensorList trust_ratios, at::TensorList weight_norms, at::TensorList update_norms,
               const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, LAMB_HP_ARGS) {
  const LambParams hp = lamb_params(LAMB_HP_PASS);
  std::vector<TensorRef> ts = collect(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps,
                                      trust_ratios, weight_norms, update_norms);
  float gscale = 1.0f;
  if (!grad_multiplier(grad_divisor, grad_scale, found_inf, maximize, &gscale)) return;
  lamb_coefs(ts, state_steps, hp);
  for_each_block(ts, /*blocked=*/!check_finite, [&](std::vector<TensorRef>& block, size_t i0, size_t n) {
    if (!check_finite) attach_scratch(block);
    const std::vector<int64_t> prefix = chunk_prefix(block);
    const std::vector<double> sums = lamb_sums(block, prefix, hp, gscale, /*write=*/!check_finite);
    // check_finite steps in one block: nothing written yet, so a non-finite gradient skips the whole step
    if (check_finite && !gradients_finite(sums)) return false;
    lamb_apply_all(block, prefix, hp, gscale, check_finite, sums.data(), sums.data() + 1, 3,
                   state_steps.slice(i0, n), trust_ratios.slice(i0, n), weight_norms.slice(i0, n),
                   update_norms.slice(i0, n));
    return true;
  });
}

// ---------------------------------------------------------------------------------------- split steps
// The one-call step in two ops, for tensors that are pieces of parameters (ZeRO partitions): pass A
// writes each piece's partial squared norms into sq_norms = [||x_1||^2 .. ||x_n||^2, ||u_1||^2 .. ||u_n||^2]
// (float64); the caller completes them (e.g. an all-reduce over ranks); pass B takes the full squared
// norms in the same layout and applies the ratio, the update and step += 1.  A skipped step (found_inf,
// non-finite divisor/scale) writes zeros in pass A and nothing in either pass.  With check_finite, pass A
// only reads and marks a piece with a non-finite gradient by a NaN ||u||^2 (LARS: ||d||^2), which survives a
// sum over pieces; pass B skips the step where a full ||u||^2 is NaN and otherwise recomputes m, v.  NaN, not
// "non-finite": a finite gradient above 1.8e19 overflows its fp32 squares to an inf norm, with which the
// one-call step goes ahead (its check reads the finiteness sum, not the norms), and so does the split step.
static void check_sq_norms(const at::Tensor& sq, size_t n, const char* what) {
  TORCH_CHECK(sq.device().is_cpu() && sq.scalar_type() == at::kDouble && sq.is_contiguous() &&
                  sq.numel() == static_cast<int64_t>(2 * n),
              "lamb fused CPU: ", what, " must be a contiguous float64 CPU tensor of 2 x ", n,
              " squared norms, got ", sq.scalar_type(), " ", sq.sizes());
}

static bool any_nan(const double* q, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::isnan(q[i])) return true;
  return false;
}

void lamb_pass_a(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
                 const at::Tensor& sq_norms, const std::optional<at::Tensor>& grad_divisor,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                 LAMB_HP_ARGS) {
  const LambParams hp = lamb_params(LAMB_HP_PASS);
  std::vector<TensorRef> ts = collect(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, {}, {}, {});
  const size_t n = ts.size();
  check_sq_norms(sq_norms, n, "sq_norms");
  double* out = sq_norms.data_ptr<double>();
  std::fill(out, out + 2 * n, 0.0);
  float gscale = 1.0f;
  if (!grad_multiplier(grad_divisor, grad_scale, found_inf, maximize, &gscale)) return;
  lamb_coefs(ts, state_steps, hp);
  const std::vector<double> sums = lamb_sums(ts, chunk_prefix(ts), hp, gscale, /*write=*/!check_finite);
  for (size_t i = 0; i < n; ++i) {
    out[i] = sums[i * 3 + 0];
    out[n + i] = (check_finite && !std::isfinite(sums[i * 3 + 2])) ? std::numeric_limits<double>::quiet_NaN()
                                                                  : sums[i * 3 + 1];
  }
}

void lamb_pass_b(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
                 at::TensorList trust_ratios, at::TensorList weight_norms, at::TensorList update_norms,
                 const at::Tensor& sq_norms, const std::optional<at::Tensor>& grad_divisor,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                 LAMB_HP_ARGS) {
  const LambParams hp = lamb_params(LAMB_HP_PASS);
  std::vector<TensorRef> ts = collect(params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps,
                                      trust_ratios, weight_norms, update_norms);
  const size_t n = ts.size();
  check_sq_norms(sq_norms, n, "the full sq_norms");
  const double* full = sq_norms.data_ptr<double>();
  float gscale = 1.0f;
  if (!grad_multiplier(grad_divisor, grad_scale, found_inf, maximize, &gscale)) return;
  if (check_finite && any_nan(full + n, n)) return;  // pass A wrote nothing: the step is skipped
  lamb_coefs(ts, state_steps, hp);
  lamb_apply_all(ts, chunk_prefix(ts), hp, gscale, check_finite, full, full + n, 1, state_steps, trust_ratios,
                 weight_norms, update_norms);
}

// ---------------------------------------------------------------------------------------- LARS
#define LARS_HP_ARGS                                                                                           \
  const std::optional<at::Tensor>&lr_tensor, double lr, double momentum, double weight_decay,                   \
      double trust_coefficient, double eps, bool nesterov, int64_t denominator, bool trust_clip, bool adapt,    \
      bool maximize, bool check_finite
#define LARS_HP_PASS \
  lr_of(lr_tensor, lr), momentum, weight_decay, trust_coefficient, eps, nesterov, denominator, trust_clip, adapt

static LarsParams lars_params(double lr, double momentum, double weight_decay, double trust_coefficient, double eps,
                              bool nesterov, int64_t denominator, bool trust_clip, bool adapt) {
  LarsParams lp{};
  lp.lr = static_cast<float>(lr);
  lp.momentum = static_cast<float>(momentum);
  lp.weight_decay = static_cast<float>(weight_decay);
  lp.trust_coefficient = static_cast<float>(trust_coefficient);
  lp.eps = static_cast<float>(eps);
  lp.nesterov = nesterov ? 1 : 0;
  lp.denom_norm = denominator == 1 ? 1 : 0;
  lp.trust_clip = trust_clip ? 1 : 0;
  lp.adapt = adapt ? 1 : 0;
  return lp;
}

// Pass A (reads only): ||w||^2, ||g||^2 (or ||g + wd w||^2) and the same again for the finiteness check.
static std::vector<double> lars_sums(const std::vector<TensorRef>& ts, const std::vector<int64_t>& prefix,
                                     const LarsParams& lp, float gscale) {
  std::vector<double> sums(ts.size() * 3, 0.0);
  const int which = isa();
  reduce_pass(ts, prefix, sums, [&](const TensorRef& t, int64_t lo, int64_t hi, double* acc) {
    LAMB_CPU_DISPATCH(which, lars_chunk_a, t, lo, hi, lp, gscale, acc);
  });
  return sums;
}

static void lars_apply_all(std::vector<TensorRef>& ts, const std::vector<int64_t>& prefix, const LarsParams& lp,
                           float gscale, const double* w2, const double* g2, int64_t stride,
                           at::TensorList state_steps, at::TensorList trust_ratios, at::TensorList weight_norms,
                           at::TensorList update_norms) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const float wn = static_cast<float>(std::sqrt(w2[i * stride]));
    const float gn = static_cast<float>(std::sqrt(g2[i * stride]));
    const float rho = lars_trust_ratio(wn, gn, lp.lr, lp);
    ts[i].s = lp.lr * rho;
    trust_ratios[i].data_ptr<float>()[0] = rho;
    weight_norms[i].data_ptr<float>()[0] = wn;
    update_norms[i].data_ptr<float>()[0] = gn;
  }
  const int which = isa();
  update_pass(ts, prefix, [&](const TensorRef& t, int64_t lo, int64_t hi) {
    LAMB_CPU_DISPATCH(which, lars_chunk_b, t, lo, hi, lp, gscale);
  });
  for (size_t i = 0; i < ts.size(); ++i) state_steps[i].data_ptr<float>()[0] += 1.0f;
}

void lars_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
               const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
               at::TensorList trust_ratios, at::TensorList weight_norms, at::TensorList update_norms,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               LARS_HP_ARGS) {
  std::vector<TensorRef> ts = collect(params, grads, momentum_buffers, {}, master_params, state_steps, trust_ratios,
                                      weight_norms, update_norms);
  float gscale = 1.0f;
  if (!grad_multiplier(std::nullopt, grad_scale, found_inf, maximize, &gscale)) return;
  const LarsParams lp = lars_params(LARS_HP_PASS);
  for_each_block(ts, /*blocked=*/!check_finite, [&](std::vector<TensorRef>& block, size_t i0, size_t n) {
    const std::vector<int64_t> prefix = chunk_prefix(block);
    const std::vector<double> sums = lars_sums(block, prefix, lp, gscale);
    // check_finite steps in one block and pass A only reads: a non-finite gradient skips the whole step
    if (check_finite && !gradients_finite(sums)) return false;
    lars_apply_all(block, prefix, lp, gscale, sums.data(), sums.data() + 1, 3, state_steps.slice(i0, n),
                   trust_ratios.slice(i0, n), weight_norms.slice(i0, n), update_norms.slice(i0, n));
    return true;
  });
}

// As lamb_pass_a / lamb_pass_b: sq_norms = [||w_i||^2 .., ||g_i||^2 (or ||g_i + wd w_i||^2) ..]; pass A
// only reads, so check_finite costs nothing here either.
void lars_pass_a(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
                 const at::Tensor& sq_norms, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, LARS_HP_ARGS) {
  std::vector<TensorRef> ts = collect(params, grads, momentum_buffers, {}, master_params, state_steps, {}, {}, {});
  const size_t n = ts.size();
  check_sq_norms(sq_norms, n, "sq_norms");
  double* out = sq_norms.data_ptr<double>();
  std::fill(out, out + 2 * n, 0.0);
  float gscale = 1.0f;
  if (!grad_multiplier(std::nullopt, grad_scale, found_inf, maximize, &gscale)) return;
  const LarsParams lp = lars_params(LARS_HP_PASS);
  const std::vector<double> sums = lars_sums(ts, chunk_prefix(ts), lp, gscale);
  for (size_t i = 0; i < n; ++i) {
    out[i] = sums[i * 3 + 0];
    out[n + i] = (check_finite && !std::isfinite(sums[i * 3 + 2])) ? std::numeric_limits<double>::quiet_NaN()
                                                                  : sums[i * 3 + 1];
  }
}

void lars_pass_b(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
                 at::TensorList trust_ratios, at::TensorList weight_norms, at::TensorList update_norms,
                 const at::Tensor& sq_norms, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, LARS_HP_ARGS) {
  std::vector<TensorRef> ts = collect(params, grads, momentum_buffers, {}, master_params, state_steps, trust_ratios,
                                      weight_norms, update_norms);
  const size_t n = ts.size();
  check_sq_norms(sq_norms, n, "the full sq_norms");
  const double* full = sq_norms.data_ptr<double>();
  float gscale = 1.0f;
  if (!grad_multiplier(std::nullopt, grad_scale, found_inf, maximize, &gscale)) return;
  if (check_finite && any_nan(full + n, n)) return;
  const LarsParams lp = lars_params(LARS_HP_PASS);
  lars_apply_all(ts, chunk_prefix(ts), lp, gscale, full, full + n, 1, state_steps, trust_ratios, weight_norms,
                 update_norms);
}

}  // namespace lamb_cpu

TORCH_LIBRARY(lamb_cpu, m) {
  // Written arguments are marked (a!) .. (h!), (s!): torch.compile keeps their updates and takes the others as
  // unchanged (tests/test_op_schemas.py checks the marks against what the kernels write).
  m.def(
      "lamb_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)?[] master_params, Tensor(e!)[] state_steps, Tensor(f!)[] trust_ratios, "
      "Tensor(g!)[] weight_norms, Tensor(h!)[] update_norms, Tensor? grad_divisor, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? lr_tensor, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "int weight_decay_mode, int bias_correction, bool grad_averaging, bool adapt, float? min_trust_ratio, "
      "float? max_trust_ratio, float? weight_norm_lo, float? weight_norm_hi, bool maximize, "
      "bool check_finite) -> ()");
  m.def(
      "lars_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(d!)?[] master_params, Tensor(e!)[] state_steps, Tensor(f!)[] trust_ratios, "
      "Tensor(g!)[] weight_norms, Tensor(h!)[] update_norms, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? lr_tensor, float lr, float momentum, float weight_decay, float trust_coefficient, float eps, "
      "bool nesterov, int denominator, bool trust_clip, bool adapt, bool maximize, bool check_finite) -> ()");
  // The split step (ZeRO partitions; see lamb_pass_a above): same arguments, the statistics replaced by
  // sq_norms (pass A writes it) or followed by it (pass B reads the completed norms).
  m.def(
      "lamb_pass_a_(Tensor[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor?[] master_params, Tensor[] state_steps, Tensor(s!) sq_norms, Tensor? grad_divisor, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int weight_decay_mode, int bias_correction, bool grad_averaging, bool adapt, "
      "float? min_trust_ratio, float? max_trust_ratio, float? weight_norm_lo, float? weight_norm_hi, "
      "bool maximize, bool check_finite) -> ()");
  m.def(
      "lamb_pass_b_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)?[] master_params, Tensor(e!)[] state_steps, Tensor(f!)[] trust_ratios, "
      "Tensor(g!)[] weight_norms, Tensor(h!)[] update_norms, Tensor sq_norms, Tensor? grad_divisor, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int weight_decay_mode, int bias_correction, bool grad_averaging, bool adapt, "
      "float? min_trust_ratio, float? max_trust_ratio, float? weight_norm_lo, float? weight_norm_hi, "
      "bool maximize, bool check_finite) -> ()");
  m.def(
      "lars_pass_a_(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, Tensor?[] master_params, "
      "Tensor[] state_steps, Tensor(s!) sq_norms, Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, "
      "float lr, float momentum, float weight_decay, float trust_coefficient, float eps, bool nesterov, "
      "int denominator, bool trust_clip, bool adapt, bool maximize, bool check_finite) -> ()");
  m.def(
      "lars_pass_b_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(d!)?[] master_params, Tensor(e!)[] state_steps, Tensor(f!)[] trust_ratios, "
      "Tensor(g!)[] weight_norms, Tensor(h!)[] update_norms, Tensor sq_norms, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? lr_tensor, float lr, float momentum, float weight_decay, "
      "float trust_coefficient, float eps, bool nesterov, int denominator, bool trust_clip, bool adapt, "
      "bool maximize, bool check_finite) -> ()");
  m.def("set_isa(int which) -> int", &lamb_cpu::set_isa);
  m.def("set_cache_block(int elems) -> int", &lamb_cpu::set_cache_block);
  m.def("set_scratch_limit(int elems) -> int", &lamb_cpu::set_scratch_limit);
}

// The stepping ops have a CPU kernel only (not a catch-all one), so that torch.compile traces them with the fake
// (shape-only) implementations lamb/ops registers when it loads the library.
TORCH_LIBRARY_IMPL(lamb_cpu, CPU, m) {
  m.impl("lamb_step_", &lamb_cpu::lamb_step);
  m.impl("lars_step_", &lamb_cpu::lars_step);
  m.impl("lamb_pass_a_", &lamb_cpu::lamb_pass_a);
  m.impl("lamb_pass_b_", &lamb_cpu::lamb_pass_b);
  m.impl("lars_pass_a_", &lamb_cpu::lars_pass_a);
  m.impl("lars_pass_b_", &lamb_cpu::lars_pass_b);
}

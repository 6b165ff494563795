// The host side of the emulated CUDA step: what cuda/lamb_cuda_binding.cpp does around the launchers of
// cuda/include/lamb_cuda.h, without torch, behind a C API for ctypes (tests/cuda_emu/emulated_ops.py).
//
// prepare() below mirrors the binding's prepare(): tensors grouped by dtype combination in call order,
// per-tensor ids, chunk bases counted over the whole call, the table [4n addresses of step, trust_ratio,
// weight_norm, update_norm | n+1 chunk prefix], the scratch (TensorCoef per tensor, then the grad
// multiplier), the per-chunk partial sums and the flag.  Scratch is filled with NaN / -1 bytes, as
// at::empty may leave anything there: a kernel that reads scratch before writing it shows NaN.  The
// hyperparameter folding (lamb_params, lars_params) is not copied: the build extracts those two functions
// verbatim from the binding into binding_params.inc; and the batches are built by the binding's own
// append_batches (cuda/include/lamb_cuda.h).
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "lamb_cuda.h"

namespace lamb_cuda {
namespace {

using lamb_math::LambParams;
using lamb_math::LarsParams;

#include "binding_params.inc"  // lamb_params(), lars_params() of cuda/lamb_cuda_binding.cpp

}  // namespace
}  // namespace lamb_cuda

// One parameter as the binding sees it (ctypes mirrors this layout in emulated_ops.py).
struct EmuTensor {
  void* p;
  void* g;
  void* m;       // exp_avg, LARS: momentum_buffer
  void* v;       // exp_avg_sq, LARS: unused
  void* master;  // fp32 master or nullptr
  int64_t numel;
  int32_t combo;  // lamb_cuda::Combo, as the binding's combo_of()
  int32_t pad;
  float* step;
  float* trust_ratio;
  float* weight_norm;
  float* update_norm;
};

struct EmuScalars {
  const float* found_inf;
  const float* grad_divisor;
  const float* grad_scale;
  const float* lr;
};

// The binding's LAMB_HP_ARGS.
struct EmuLambArgs {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t weight_decay_mode, bias_correction;
  int32_t grad_averaging, adapt, maximize, check_finite;
  int32_t has_min_trust_ratio, has_max_trust_ratio, has_weight_norm_lo, has_weight_norm_hi;
  double min_trust_ratio, max_trust_ratio, weight_norm_lo, weight_norm_hi;
};

// The binding's LARS_HP_ARGS.
struct EmuLarsArgs {
  double lr, momentum, weight_decay, trust_coefficient, eps;
  int64_t denominator;
  int32_t nesterov, trust_clip, adapt, maximize, check_finite, pad;
};

namespace {

using namespace lamb_cuda;

std::string driver_error;

struct Call {
  std::vector<std::vector<void*>> ptr[5];  // per address kind, per combo
  std::vector<std::vector<int64_t>> numel, chunk_base;
  std::vector<std::vector<int>> id;
  std::vector<Batch> batches;
  std::vector<int64_t> table;
  std::vector<float> scratch_f;
  std::vector<double> partial;
  int flag = -1;
  Scratch s{};
  int n = 0;
};

// stats_from_steps: the split step's pass A, where the binding passes state_steps for the statistics.
void prepare(Call& call, const EmuTensor* ts, int n, bool has_bufs2, bool stats_from_steps) {
  call.n = n;
  for (int k = 0; k < 5; ++k) call.ptr[k].assign(kNumCombos, {});
  call.numel.assign(kNumCombos, {});
  call.chunk_base.assign(kNumCombos, {});
  call.id.assign(kNumCombos, {});
  call.table.assign(5 * static_cast<size_t>(n) + 1, 0);
  int64_t* tab = call.table.data();
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) {
    const EmuTensor& t = ts[i];
    const int c = t.combo;
    call.ptr[0][c].push_back(t.p);
    call.ptr[1][c].push_back(t.g);
    call.ptr[2][c].push_back(t.m);
    call.ptr[3][c].push_back(has_bufs2 ? t.v : nullptr);
    call.ptr[4][c].push_back(t.master);
    call.numel[c].push_back(t.numel);
    call.chunk_base[c].push_back(chunks);
    call.id[c].push_back(i);
    tab[0 * n + i] = reinterpret_cast<int64_t>(t.step);
    tab[1 * n + i] = reinterpret_cast<int64_t>(stats_from_steps ? t.step : t.trust_ratio);
    tab[2 * n + i] = reinterpret_cast<int64_t>(stats_from_steps ? t.step : t.weight_norm);
    tab[3 * n + i] = reinterpret_cast<int64_t>(stats_from_steps ? t.step : t.update_norm);
    tab[4 * n + i] = chunks;
    chunks += (t.numel + kChunkSize - 1) / kChunkSize;
  }
  tab[5 * n] = chunks;
  static_assert(sizeof(TensorCoef) == 5 * sizeof(float), "TensorCoef layout");
  call.scratch_f.resize(5 * static_cast<size_t>(n) + 1);
  call.partial.resize(static_cast<size_t>(std::max<int64_t>(chunks, 1)) * 3);
  memset(call.scratch_f.data(), 0xFF, call.scratch_f.size() * sizeof(float));  // NaN
  memset(call.partial.data(), 0xFF, call.partial.size() * sizeof(double));     // NaN
  call.s.flag = &call.flag;
  call.s.coef = reinterpret_cast<TensorCoef*>(call.scratch_f.data());
  call.s.gscale = call.scratch_f.data() + 5 * static_cast<int64_t>(n);
  call.s.partial = call.partial.data();
  call.s.table = call.table.data();
  append_batches(call);
}

// The binding's cuda_check (a TORCH_CHECK there): the first failure ends the call.
bool check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  driver_error = std::string("launching ") + what + " failed: " + cudaGetErrorString(err);
  return false;
}

LambParams hp_of(const EmuLambArgs& a) {
  auto opt = [](int32_t has, double v) { return has ? std::optional<double>(v) : std::nullopt; };
  return lamb_params(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.weight_decay_mode, a.bias_correction,
                     a.grad_averaging != 0, a.adapt != 0, opt(a.has_min_trust_ratio, a.min_trust_ratio),
                     opt(a.has_max_trust_ratio, a.max_trust_ratio), opt(a.has_weight_norm_lo, a.weight_norm_lo),
                     opt(a.has_weight_norm_hi, a.weight_norm_hi));
}

LarsParams lp_of(const EmuLarsArgs& a) {
  return lars_params(a.lr, a.momentum, a.weight_decay, a.trust_coefficient, a.eps, a.nesterov != 0, a.denominator,
                     a.trust_clip != 0, a.adapt != 0);
}

StepScalars lamb_scalars(const EmuScalars& sc) {
  return StepScalars{sc.found_inf, sc.grad_divisor, sc.grad_scale, sc.lr};
}
// LARS has no grad_divisor (the binding passes nullptr)
StepScalars lars_scalars(const EmuScalars& sc) { return StepScalars{sc.found_inf, nullptr, sc.grad_scale, sc.lr}; }

}  // namespace

extern "C" {

const char* emu_driver_error() { return driver_error.c_str(); }

// Each returns 0, or -1 with emu_driver_error() saying which launch failed.  The sequences are the
// binding's lamb_step, lamb_split_a, lamb_split_b, lars_step, lars_split_a, lars_split_b.
int emu_lamb_step(const EmuTensor* ts, int n, const EmuScalars* sc, const EmuLambArgs* a) {
  driver_error.clear();
  if (n == 0) return 0;
  Call call;
  prepare(call, ts, n, /*has_bufs2=*/true, /*stats_from_steps=*/false);
  const LambParams hp = hp_of(*a);
  const StepScalars s = lamb_scalars(*sc);
  const bool cf = a->check_finite != 0;
  cudaStream_t stream = nullptr;
  if (!check(lamb_prologue(call.n, hp, s, a->maximize ? 1 : 0, call.s, stream), "the LAMB prologue")) return -1;
  for (const Batch& b : call.batches)
    if (!check(lamb_pass_a(b, hp, !cf, call.s, stream), "LAMB pass A")) return -1;
  if (!check(lamb_finalize(call.n, hp, s, cf, call.s, stream), "the LAMB trust ratio")) return -1;
  for (const Batch& b : call.batches)
    if (!check(lamb_pass_b(b, hp, cf, call.s, stream), "LAMB pass B")) return -1;
  return 0;
}

int emu_lamb_pass_a(const EmuTensor* ts, int n, const EmuScalars* sc, const EmuLambArgs* a, double* sq_norms) {
  driver_error.clear();
  if (n == 0) return 0;
  Call call;
  prepare(call, ts, n, true, /*stats_from_steps=*/true);
  const LambParams hp = hp_of(*a);
  const StepScalars s = lamb_scalars(*sc);
  const bool cf = a->check_finite != 0;
  cudaStream_t stream = nullptr;
  if (!check(lamb_prologue(call.n, hp, s, a->maximize ? 1 : 0, call.s, stream), "the LAMB prologue")) return -1;
  for (const Batch& b : call.batches)
    if (!check(lamb_pass_a(b, hp, !cf, call.s, stream), "LAMB pass A")) return -1;
  if (!check(partial_sq_norms(call.n, cf, call.s, sq_norms, stream), "the LAMB partial norms")) return -1;
  return 0;
}

int emu_lamb_pass_b(const EmuTensor* ts, int n, const EmuScalars* sc, const EmuLambArgs* a, const double* full) {
  driver_error.clear();
  if (n == 0) return 0;
  Call call;
  prepare(call, ts, n, true, false);
  const LambParams hp = hp_of(*a);
  const StepScalars s = lamb_scalars(*sc);
  const bool cf = a->check_finite != 0;
  cudaStream_t stream = nullptr;
  if (!check(lamb_prologue(call.n, hp, s, a->maximize ? 1 : 0, call.s, stream), "the LAMB prologue")) return -1;
  if (!check(lamb_finalize_full(call.n, hp, s, cf, full, call.s, stream), "the LAMB trust ratio")) return -1;
  for (const Batch& b : call.batches)
    if (!check(lamb_pass_b(b, hp, cf, call.s, stream), "LAMB pass B")) return -1;
  return 0;
}

int emu_lars_step(const EmuTensor* ts, int n, const EmuScalars* sc, const EmuLarsArgs* a) {
  driver_error.clear();
  if (n == 0) return 0;
  Call call;
  prepare(call, ts, n, /*has_bufs2=*/false, false);
  const LarsParams lp = lp_of(*a);
  const StepScalars s = lars_scalars(*sc);
  cudaStream_t stream = nullptr;
  if (!check(lars_prologue(call.n, s, a->maximize ? 1 : 0, call.s, stream), "the LARS prologue")) return -1;
  for (const Batch& b : call.batches)
    if (!check(lars_pass_a(b, lp, call.s, stream), "LARS pass A")) return -1;
  if (!check(lars_finalize(call.n, lp, s, a->check_finite != 0, call.s, stream), "the LARS trust ratio")) return -1;
  for (const Batch& b : call.batches)
    if (!check(lars_pass_b(b, lp, call.s, stream), "LARS pass B")) return -1;
  return 0;
}

int emu_lars_pass_a(const EmuTensor* ts, int n, const EmuScalars* sc, const EmuLarsArgs* a, double* sq_norms) {
  driver_error.clear();
  if (n == 0) return 0;
  Call call;
  prepare(call, ts, n, false, /*stats_from_steps=*/true);
  const LarsParams lp = lp_of(*a);
  const StepScalars s = lars_scalars(*sc);
  cudaStream_t stream = nullptr;
  if (!check(lars_prologue(call.n, s, a->maximize ? 1 : 0, call.s, stream), "the LARS prologue")) return -1;
  for (const Batch& b : call.batches)
    if (!check(lars_pass_a(b, lp, call.s, stream), "LARS pass A")) return -1;
  if (!check(partial_sq_norms(call.n, a->check_finite != 0, call.s, sq_norms, stream), "the LARS partial norms"))
    return -1;
  return 0;
}

int emu_lars_pass_b(const EmuTensor* ts, int n, const EmuScalars* sc, const EmuLarsArgs* a, const double* full) {
  driver_error.clear();
  if (n == 0) return 0;
  Call call;
  prepare(call, ts, n, false, false);
  const LarsParams lp = lp_of(*a);
  const StepScalars s = lars_scalars(*sc);
  cudaStream_t stream = nullptr;
  if (!check(lars_prologue(call.n, s, a->maximize ? 1 : 0, call.s, stream), "the LARS prologue")) return -1;
  if (!check(lars_finalize_full(call.n, lp, s, a->check_finite != 0, full, call.s, stream), "the LARS trust ratio"))
    return -1;
  for (const Batch& b : call.batches)
    if (!check(lars_pass_b(b, lp, call.s, stream), "LARS pass B")) return -1;
  return 0;
}

// LAMB_CUDA_DISPATCH's answer to a combination it does not know (the binding never passes one).
int emu_dispatch_unknown_combo() {
  void* none[1] = {nullptr};
  const int64_t numel[1] = {1};
  const int64_t base[1] = {0};
  const int id[1] = {0};
  Batch b{};
  b.n = 1;
  b.combo = 99;
  for (int k = 0; k < 5; ++k) b.ptr[k] = none;
  b.numel = numel;
  b.chunk_base = base;
  b.id = id;
  return static_cast<int>(lamb_pass_a(b, LambParams{}, true, Scratch{}, nullptr));
}

}  // extern "C"

// The torch binding of the CUDA kernels: torch.ops.lamb_cuda.lamb_step_ / lars_step_, and the split
// step's lamb_pass_a_ / lamb_pass_b_ / lars_pass_a_ / lars_pass_b_ (pieces of parameters, ZeRO partitions).
//
// Checks the tensors, groups them by dtype combination, packs the per-tensor addresses of step and the
// trust statistics into a pinned table copied to the device without a sync, allocates the call's small
// scratch (per tensor and per 64Ki-element chunk, from torch's caching allocator) and calls the launchers
// of include/lamb_cuda.h, which are compiled by nvcc without any torch header.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "include/lamb_cuda.h"

namespace lamb_cuda {
namespace {

using lamb_math::LambParams;
using lamb_math::LarsParams;

// The dtype combination (lamb_math::Combo) of a parameter, its gradient and its state.
int combo_of(const at::Tensor& p, const at::Tensor& g, const at::Tensor& state, bool master) {
  const auto pd = p.scalar_type();
  const auto gd = g.scalar_type();
  const auto sd = state.scalar_type();
  int combo = -1;
  if (!master) {
    TORCH_CHECK(sd == pd, "lamb fused CUDA: state dtype ", sd, " differs from the parameter's ", pd);
    if (pd == at::kFloat) combo = kF32;
    if (pd == at::kBFloat16) combo = kBF16;
    if (pd == at::kHalf) combo = kF16;
  } else {
    TORCH_CHECK(sd == at::kFloat, "lamb fused CUDA: with master weights the state must be float32, got ", sd);
    if (pd == at::kBFloat16) combo = kBF16Master;
    if (pd == at::kHalf) combo = kF16Master;
  }
  TORCH_CHECK(combo >= 0, "lamb fused CUDA: unsupported parameter dtype ", pd,
              "; supported: float32, bfloat16, float16 (bf16/fp16 with or without fp32 master weights)");
  if (gd == pd) return combo;
  TORCH_CHECK(gd == at::kFloat, "lamb fused CUDA: gradient dtype ", gd, " differs from the parameter's ", pd,
              "; supported: the parameter's dtype, or float32 for a bfloat16/float16 parameter");
  return lamb_math::with_fp32_grad(combo);
}

void check_like(const at::Tensor& t, const at::Tensor& p, const char* what) {
  TORCH_CHECK(t.device() == p.device(), "lamb fused CUDA: ", what, " is on ", t.device(), ", the parameter on ",
              p.device());
  TORCH_CHECK(t.numel() == p.numel(), "lamb fused CUDA: ", what, " has ", t.numel(), " elements, the parameter ",
              p.numel());
  TORCH_CHECK(t.numel() == 0 || (t.is_non_overlapping_and_dense() && t.strides() == p.strides()),
              "lamb fused CUDA: ", what, " must be dense with the parameter's strides");
}

void check_scalar(const at::Tensor& t, const at::Tensor& p, const char* what) {
  TORCH_CHECK(t.device() == p.device() && t.scalar_type() == at::kFloat && t.numel() == 1, "lamb fused CUDA: ", what,
              " must be a one-element float32 tensor on the parameter's device ", p.device(),
              " (state['step'] lives on the parameter's device for the fused kernel)");
}

const float* opt_ptr(const std::optional<at::Tensor>& t, const at::Device& dev, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == dev && t->scalar_type() == at::kFloat && t->numel() == 1, "lamb fused CUDA: ", what,
              " must be a one-element float32 tensor on ", dev);
  return t->data_ptr<float>();
}

void cuda_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lamb fused CUDA: launching ", what, " failed: ", cudaGetErrorString(err),
              " (an unsupported GPU? the kernels were built for TORCH_CUDA_ARCH_LIST at build time)");
}

// Everything one call needs besides the hyperparameters.
struct Call {
  std::vector<std::vector<void*>> ptr[5];  // per combo, per address kind
  std::vector<std::vector<int64_t>> numel, chunk_base;
  std::vector<std::vector<int>> id;
  std::vector<Batch> batches;
  at::Tensor table_dev, scratch_f, partial, flag;
  Scratch s;
  int n = 0;
};

void prepare(Call& call, at::TensorList params, at::TensorList grads, at::TensorList bufs1, at::TensorList bufs2,
             const c10::List<std::optional<at::Tensor>>& masters, at::TensorList steps, at::TensorList trust_ratios,
             at::TensorList weight_norms, at::TensorList update_norms) {
  const int n = static_cast<int>(params.size());
  call.n = n;
  TORCH_CHECK(grads.size() == params.size() && bufs1.size() == params.size() &&
                  (bufs2.empty() || bufs2.size() == params.size()) &&
                  (masters.size() == params.size() || masters.empty()) && steps.size() == params.size() &&
                  trust_ratios.size() == params.size() && weight_norms.size() == params.size() &&
                  update_norms.size() == params.size(),
              "lamb fused CUDA: the tensor lists must have one entry per parameter (master_params: or none)");
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "lamb fused CUDA: parameters must be CUDA tensors");
  for (int k = 0; k < 5; ++k) call.ptr[k].assign(kNumCombos, {});
  call.numel.assign(kNumCombos, {});
  call.chunk_base.assign(kNumCombos, {});
  call.id.assign(kNumCombos, {});

  at::Tensor table = at::empty({5 * static_cast<int64_t>(n) + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* tab = table.data_ptr<int64_t>();
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == dev, "lamb fused CUDA: parameters on several devices in one call (", dev, ", ",
                p.device(), ")");
    TORCH_CHECK(p.numel() == 0 || p.is_non_overlapping_and_dense(), "lamb fused CUDA: parameter ", i,
                " is not dense");
    // an empty master list: no parameter of the call has a master (see cuda/lamb_cpu.cpp)
    const std::optional<at::Tensor> mo = masters.empty() ? std::nullopt : masters.get(i);
    const bool has_master = mo.has_value() && mo->defined();
    check_like(grads[i], p, "a gradient");
    check_like(bufs1[i], p, "a state buffer");
    if (!bufs2.empty()) {
      check_like(bufs2[i], p, "a state buffer");
      TORCH_CHECK(bufs2[i].scalar_type() == bufs1[i].scalar_type(), "lamb fused CUDA: exp_avg and exp_avg_sq dtypes differ");
    }
    if (has_master) {
      check_like(*mo, p, "a master parameter");
      TORCH_CHECK(mo->scalar_type() == at::kFloat, "lamb fused CUDA: master parameters must be float32");
    }
    check_scalar(steps[i], p, "state step");
    check_scalar(trust_ratios[i], p, "trust_ratio");
    check_scalar(weight_norms[i], p, "weight_norm");
    check_scalar(update_norms[i], p, "update_norm");
    const int c = combo_of(p, grads[i], bufs1[i], has_master);
    call.ptr[0][c].push_back(p.data_ptr());
    call.ptr[1][c].push_back(grads[i].data_ptr());
    call.ptr[2][c].push_back(bufs1[i].data_ptr());
    call.ptr[3][c].push_back(bufs2.empty() ? nullptr : bufs2[i].data_ptr());
    call.ptr[4][c].push_back(has_master ? mo->data_ptr() : nullptr);
    call.numel[c].push_back(p.numel());
    call.chunk_base[c].push_back(chunks);
    call.id[c].push_back(i);
    tab[0 * n + i] = reinterpret_cast<int64_t>(steps[i].data_ptr());
    tab[1 * n + i] = reinterpret_cast<int64_t>(trust_ratios[i].data_ptr());
    tab[2 * n + i] = reinterpret_cast<int64_t>(weight_norms[i].data_ptr());
    tab[3 * n + i] = reinterpret_cast<int64_t>(update_norms[i].data_ptr());
    tab[4 * n + i] = chunks;
    chunks += (p.numel() + kChunkSize - 1) / kChunkSize;
  }
  tab[5 * n] = chunks;
  call.table_dev = table.to(dev, /*non_blocking=*/true);
  // per tensor: TensorCoef (5 floats); then the grad multiplier
  static_assert(sizeof(TensorCoef) == 5 * sizeof(float), "TensorCoef layout");
  call.scratch_f = at::empty({5 * static_cast<int64_t>(n) + 1}, params[0].options().dtype(at::kFloat));
  call.partial = at::empty({std::max<int64_t>(chunks, 1) * 3}, params[0].options().dtype(at::kDouble));
  call.flag = at::empty({1}, params[0].options().dtype(at::kInt));
  call.s.flag = call.flag.data_ptr<int>();
  call.s.coef = reinterpret_cast<TensorCoef*>(call.scratch_f.data_ptr<float>());
  call.s.gscale = call.scratch_f.data_ptr<float>() + 5 * static_cast<int64_t>(n);
  call.s.partial = call.partial.data_ptr<double>();
  call.s.table = call.table_dev.data_ptr<int64_t>();
  append_batches(call);
}

#define LAMB_HP_ARGS                                                                                           \
  double lr, double beta1, double beta2, double eps, double weight_decay, int64_t weight_decay_mode,            \
      int64_t bias_correction, bool grad_averaging, bool adapt, std::optional<double> min_trust_ratio,          \
      std::optional<double> max_trust_ratio, std::optional<double> weight_norm_lo,                              \
      std::optional<double> weight_norm_hi, bool maximize, bool check_finite
#define LAMB_HP_PASS                                                                                           \
  lr, beta1, beta2, eps, weight_decay, weight_decay_mode, bias_correction, grad_averaging, adapt,              \
      min_trust_ratio, max_trust_ratio, weight_norm_lo, weight_norm_hi
#define LARS_HP_ARGS                                                                                           \
  double lr, double momentum, double weight_decay, double trust_coefficient, double eps, bool nesterov,         \
      int64_t denominator, bool trust_clip, bool adapt, bool maximize, bool check_finite
#define LARS_HP_PASS lr, momentum, weight_decay, trust_coefficient, eps, nesterov, denominator, trust_clip, adapt

LambParams lamb_params(double lr, double beta1, double beta2, double eps, double weight_decay,
                       int64_t weight_decay_mode, int64_t bias_correction, bool grad_averaging, bool adapt,
                       std::optional<double> min_trust_ratio, std::optional<double> max_trust_ratio,
                       std::optional<double> weight_norm_lo, std::optional<double> weight_norm_hi) {
  LambParams hp{};
  hp.lr = static_cast<float>(lr);
  hp.beta1 = static_cast<float>(beta1);
  hp.beta2 = static_cast<float>(beta2);
  hp.beta3 = grad_averaging ? static_cast<float>(1.0 - beta1) : 1.0f;
  hp.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  hp.eps = static_cast<float>(eps);
  hp.weight_decay = static_cast<float>(weight_decay);
  hp.wd_l2 = weight_decay_mode == lamb_math::kDecayL2 ? hp.weight_decay : 0.0f;
  hp.wd_ratio = weight_decay_mode == lamb_math::kDecayRatio ? hp.weight_decay : 0.0f;
  hp.decoupled = (weight_decay_mode == lamb_math::kDecayDecoupled && weight_decay != 0.0) ? 1 : 0;
  hp.lr_wd = static_cast<float>(lr * weight_decay);
  hp.bias_correction = static_cast<int>(bias_correction);
  hp.adapt = adapt ? 1 : 0;
  hp.has_bounds = weight_norm_lo.has_value() ? 1 : 0;
  hp.wn_lo = static_cast<float>(weight_norm_lo.value_or(0.0));
  hp.wn_hi = static_cast<float>(weight_norm_hi.value_or(0.0));
  hp.has_min = min_trust_ratio.has_value() ? 1 : 0;
  hp.has_max = max_trust_ratio.has_value() ? 1 : 0;
  hp.min_ratio = static_cast<float>(min_trust_ratio.value_or(0.0));
  hp.max_ratio = static_cast<float>(max_trust_ratio.value_or(0.0));
  return hp;
}

LarsParams lars_params(double lr, double momentum, double weight_decay, double trust_coefficient, double eps,
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

// The split step's squared norms: a contiguous float64 tensor of 2n entries on the parameters' device.
double* sq_norms_ptr(const at::Tensor& sq, const at::Device& dev, int n, const char* what) {
  TORCH_CHECK(sq.device() == dev && sq.scalar_type() == at::kDouble && sq.is_contiguous() &&
                  sq.numel() == 2 * static_cast<int64_t>(n),
              "lamb fused CUDA: ", what, " must be a contiguous float64 tensor of 2 x ", n, " squared norms on ",
              dev, ", got ", sq.scalar_type(), " ", sq.sizes(), " on ", sq.device());
  return sq.data_ptr<double>();
}

void lamb_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
               at::TensorList trust_ratios, at::TensorList weight_norms, at::TensorList update_norms,
               const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor,
               LAMB_HP_ARGS) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  Call call;
  prepare(call, params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, trust_ratios, weight_norms,
          update_norms);
  const at::Device dev = params[0].device();
  StepScalars sc{opt_ptr(found_inf, dev, "found_inf"), opt_ptr(grad_divisor, dev, "grad_divisor"),
                 opt_ptr(grad_scale, dev, "grad_scale"), opt_ptr(lr_tensor, dev, "lr")};
  const LambParams hp = lamb_params(LAMB_HP_PASS);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_check(lamb_prologue(call.n, hp, sc, maximize ? 1 : 0, call.s, stream), "the LAMB prologue");
  for (const Batch& b : call.batches) cuda_check(lamb_pass_a(b, hp, !check_finite, call.s, stream), "LAMB pass A");
  cuda_check(lamb_finalize(call.n, hp, sc, check_finite, call.s, stream), "the LAMB trust ratio");
  for (const Batch& b : call.batches) cuda_check(lamb_pass_b(b, hp, check_finite, call.s, stream), "LAMB pass B");
}

// The split step (pieces of parameters, see include/lamb_cuda.h): pass A writes the pieces' partial squared
// norms into sq_norms; pass B takes the complete ones.  No host sync in either.
void lamb_split_a(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
                  const at::Tensor& sq_norms, const std::optional<at::Tensor>& grad_divisor,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& lr_tensor, LAMB_HP_ARGS) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // the statistics are not touched by pass A: the steps stand in for them in prepare()'s checks
  Call call;
  prepare(call, params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, state_steps, state_steps,
          state_steps);
  const at::Device dev = params[0].device();
  double* out = sq_norms_ptr(sq_norms, dev, call.n, "sq_norms");
  StepScalars sc{opt_ptr(found_inf, dev, "found_inf"), opt_ptr(grad_divisor, dev, "grad_divisor"),
                 opt_ptr(grad_scale, dev, "grad_scale"), opt_ptr(lr_tensor, dev, "lr")};
  const LambParams hp = lamb_params(LAMB_HP_PASS);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_check(lamb_prologue(call.n, hp, sc, maximize ? 1 : 0, call.s, stream), "the LAMB prologue");
  for (const Batch& b : call.batches) cuda_check(lamb_pass_a(b, hp, !check_finite, call.s, stream), "LAMB pass A");
  cuda_check(partial_sq_norms(call.n, check_finite, call.s, out, stream), "the LAMB partial norms");
}

void lamb_split_b(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
                  at::TensorList trust_ratios, at::TensorList weight_norms, at::TensorList update_norms,
                  const at::Tensor& sq_norms, const std::optional<at::Tensor>& grad_divisor,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& lr_tensor, LAMB_HP_ARGS) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  Call call;
  prepare(call, params, grads, exp_avgs, exp_avg_sqs, master_params, state_steps, trust_ratios, weight_norms,
          update_norms);
  const at::Device dev = params[0].device();
  const double* full = sq_norms_ptr(sq_norms, dev, call.n, "the full sq_norms");
  StepScalars sc{opt_ptr(found_inf, dev, "found_inf"), opt_ptr(grad_divisor, dev, "grad_divisor"),
                 opt_ptr(grad_scale, dev, "grad_scale"), opt_ptr(lr_tensor, dev, "lr")};
  const LambParams hp = lamb_params(LAMB_HP_PASS);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_check(lamb_prologue(call.n, hp, sc, maximize ? 1 : 0, call.s, stream), "the LAMB prologue");
  cuda_check(lamb_finalize_full(call.n, hp, sc, check_finite, full, call.s, stream), "the LAMB trust ratio");
  for (const Batch& b : call.batches) cuda_check(lamb_pass_b(b, hp, check_finite, call.s, stream), "LAMB pass B");
}

void lars_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
               const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
               at::TensorList trust_ratios, at::TensorList weight_norms, at::TensorList update_norms,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& lr_tensor, LARS_HP_ARGS) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  Call call;
  prepare(call, params, grads, momentum_buffers, {}, master_params, state_steps, trust_ratios, weight_norms,
          update_norms);
  const at::Device dev = params[0].device();
  StepScalars sc{opt_ptr(found_inf, dev, "found_inf"), nullptr, opt_ptr(grad_scale, dev, "grad_scale"),
                 opt_ptr(lr_tensor, dev, "lr")};
  const LarsParams lp = lars_params(LARS_HP_PASS);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_check(lars_prologue(call.n, sc, maximize ? 1 : 0, call.s, stream), "the LARS prologue");
  for (const Batch& b : call.batches) cuda_check(lars_pass_a(b, lp, call.s, stream), "LARS pass A");
  cuda_check(lars_finalize(call.n, lp, sc, check_finite, call.s, stream), "the LARS trust ratio");
  for (const Batch& b : call.batches) cuda_check(lars_pass_b(b, lp, call.s, stream), "LARS pass B");
}

void lars_split_a(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
                  const at::Tensor& sq_norms, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor,
                  LARS_HP_ARGS) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  Call call;
  prepare(call, params, grads, momentum_buffers, {}, master_params, state_steps, state_steps, state_steps,
          state_steps);
  const at::Device dev = params[0].device();
  double* out = sq_norms_ptr(sq_norms, dev, call.n, "sq_norms");
  StepScalars sc{opt_ptr(found_inf, dev, "found_inf"), nullptr, opt_ptr(grad_scale, dev, "grad_scale"),
                 opt_ptr(lr_tensor, dev, "lr")};
  const LarsParams lp = lars_params(LARS_HP_PASS);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_check(lars_prologue(call.n, sc, maximize ? 1 : 0, call.s, stream), "the LARS prologue");
  for (const Batch& b : call.batches) cuda_check(lars_pass_a(b, lp, call.s, stream), "LARS pass A");
  cuda_check(partial_sq_norms(call.n, check_finite, call.s, out, stream), "the LARS partial norms");
}

void lars_split_b(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const c10::List<std::optional<at::Tensor>>& master_params, at::TensorList state_steps,
                  at::TensorList trust_ratios, at::TensorList weight_norms, at::TensorList update_norms,
                  const at::Tensor& sq_norms, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& lr_tensor,
                  LARS_HP_ARGS) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  Call call;
  prepare(call, params, grads, momentum_buffers, {}, master_params, state_steps, trust_ratios, weight_norms,
          update_norms);
  const at::Device dev = params[0].device();
  const double* full = sq_norms_ptr(sq_norms, dev, call.n, "the full sq_norms");
  StepScalars sc{opt_ptr(found_inf, dev, "found_inf"), nullptr, opt_ptr(grad_scale, dev, "grad_scale"),
                 opt_ptr(lr_tensor, dev, "lr")};
  const LarsParams lp = lars_params(LARS_HP_PASS);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda_check(lars_prologue(call.n, sc, maximize ? 1 : 0, call.s, stream), "the LARS prologue");
  cuda_check(lars_finalize_full(call.n, lp, sc, check_finite, full, call.s, stream), "the LARS trust ratio");
  for (const Batch& b : call.batches) cuda_check(lars_pass_b(b, lp, call.s, stream), "LARS pass B");
}

}  // namespace
}  // namespace lamb_cuda

TORCH_LIBRARY(lamb_cuda, m) {
  m.def(
      "lamb_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)?[] master_params, Tensor(e!)[] state_steps, Tensor(f!)[] trust_ratios, Tensor(g!)[] weight_norms, "
      "Tensor(h!)[] update_norms, Tensor? grad_divisor, Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int weight_decay_mode, "
      "int bias_correction, bool grad_averaging, bool adapt, float? min_trust_ratio, float? max_trust_ratio, "
      "float? weight_norm_lo, float? weight_norm_hi, bool maximize, bool check_finite) -> ()");
  m.def(
      "lars_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(d!)?[] master_params, Tensor(e!)[] state_steps, Tensor(f!)[] trust_ratios, "
      "Tensor(g!)[] weight_norms, Tensor(h!)[] update_norms, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, float lr, float momentum, float weight_decay, "
      "float trust_coefficient, float eps, bool nesterov, int denominator, bool trust_clip, bool adapt, "
      "bool maximize, bool check_finite) -> ()");
  // The split step (ZeRO partitions): the statistics replaced by sq_norms (pass A writes the pieces' partial
  // squared norms) or followed by it (pass B reads the complete ones); see lamb/_fused.py.
  m.def(
      "lamb_pass_a_(Tensor[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor?[] master_params, Tensor[] state_steps, Tensor(s!) sq_norms, Tensor? grad_divisor, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int weight_decay_mode, int bias_correction, bool grad_averaging, bool adapt, "
      "float? min_trust_ratio, float? max_trust_ratio, float? weight_norm_lo, float? weight_norm_hi, "
      "bool maximize, bool check_finite) -> ()");
  m.def(
      "lamb_pass_b_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)?[] master_params, Tensor(e!)[] state_steps, Tensor(f!)[] trust_ratios, Tensor(g!)[] weight_norms, "
      "Tensor(h!)[] update_norms, Tensor sq_norms, Tensor? grad_divisor, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? lr_tensor, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "int weight_decay_mode, int bias_correction, bool grad_averaging, bool adapt, float? min_trust_ratio, "
      "float? max_trust_ratio, float? weight_norm_lo, float? weight_norm_hi, bool maximize, "
      "bool check_finite) -> ()");
  m.def(
      "lars_pass_a_(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, Tensor?[] master_params, "
      "Tensor[] state_steps, Tensor(s!) sq_norms, Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, "
      "float lr, float momentum, float weight_decay, float trust_coefficient, float eps, bool nesterov, "
      "int denominator, bool trust_clip, bool adapt, bool maximize, bool check_finite) -> ()");
  m.def(
      "lars_pass_b_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(d!)?[] master_params, Tensor(e!)[] state_steps, Tensor(f!)[] trust_ratios, "
      "Tensor(g!)[] weight_norms, Tensor(h!)[] update_norms, "
      "Tensor sq_norms, Tensor? grad_scale, Tensor? found_inf, Tensor? lr_tensor, float lr, float momentum, "
      "float weight_decay, float trust_coefficient, float eps, bool nesterov, int denominator, bool trust_clip, "
      "bool adapt, bool maximize, bool check_finite) -> ()");
}

// A CUDA kernel only (not a catch-all one), so that torch.compile traces the ops with the fake implementations
// lamb/ops registers when it loads the library.
TORCH_LIBRARY_IMPL(lamb_cuda, CUDA, m) {
  m.impl("lamb_step_", &lamb_cuda::lamb_step);
  m.impl("lars_step_", &lamb_cuda::lars_step);
  m.impl("lamb_pass_a_", &lamb_cuda::lamb_split_a);
  m.impl("lamb_pass_b_", &lamb_cuda::lamb_split_b);
  m.impl("lars_pass_a_", &lamb_cuda::lars_split_a);
  m.impl("lars_pass_b_", &lamb_cuda::lars_split_b);
}

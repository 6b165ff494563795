// The torch-free interface between the CUDA kernels (lamb_kernels.cu, lars_kernels.cu) and the torch
// binding (lamb_cuda_binding.cpp): plain pointers, sizes and a stream.  Each function returns a
// cudaError_t (cudaSuccess when every launch went out).
//
// One optimizer step over n tensors is, all on one stream and with no host synchronisation:
//   prologue   1 block:    skip flag (found_inf, non-finite divisor/scale), grad multiplier, per-tensor
//                          bias-correction terms from each tensor's step
//   pass A     per dtype combination: per-chunk partial sums (||w||^2, ||u||^2, sum g - g: 0 or NaN); LAMB also
//                          writes m, v unless check_finite or they are stored in 16 bits (then pass B does)
//   finalize   1 block:    per-tensor sums in chunk order, trust ratio, trust/norm outputs, step += 1;
//                          with check_finite a non-finite gradient sets the skip flag here
//   pass B     per dtype combination: the update (skipped when the flag is set)
//
// The split step for pieces of parameters (ZeRO partitions; torch.ops.lamb_cuda.*_pass_a_ / *_pass_b_):
//   op A       prologue, pass A, partial_sq_norms: the pieces' [||w_i||^2 .., ||u_i||^2 ..] (float64)
//   (caller)   completes them across pieces, e.g. one all-reduce
//   op B       prologue, *_finalize_full from the complete squared norms, pass B
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "lamb_math.h"

namespace lamb_cuda {

constexpr int64_t kChunkSize = 65536;

// The dtype combinations (parameter, gradient, state, master) are lamb_math's, shared with the CPU twin.
using lamb_math::kBF16;
using lamb_math::kBF16G32;
using lamb_math::kBF16Master;
using lamb_math::kBF16MasterG32;
using lamb_math::kF16;
using lamb_math::kF16G32;
using lamb_math::kF16Master;
using lamb_math::kF16MasterG32;
using lamb_math::kF32;
using lamb_math::kNumCombos;

// Per-tensor terms computed on the device.
struct TensorCoef {
  lamb_math::LambStepCoef c;  // LAMB bias correction at this step (unused by LARS)
  float s;                    // pass B step: lr_t * rho (LAMB) or lr * rho (LARS)
  float decay;                // LAMB decoupled decay lr * wd, else 0
};

// Device scratch of one call.
struct Scratch {
  int* flag;              // 1: skip this step
  float* gscale;          // +-1 / (grad_divisor * grad_scale)
  TensorCoef* coef;       // [n]
  double* partial;        // [total chunks][3]
  const int64_t* table;   // [4n] addresses of step, trust_ratio, weight_norm, update_norm; then [n+1] chunk prefix
};

// The tensors of one dtype combination (host arrays).
struct Batch {
  int n;
  int combo;
  void* const* ptr[5];       // p, g, m (LARS: momentum), v (LARS: unused), master (nullptr entries if none)
  const int64_t* numel;
  const int64_t* chunk_base;
  const int* id;             // index of each tensor in the call
};

// One Batch per dtype combination that has tensors, pointing into a call's host lists (``Call``: the binding's,
// and tests/cuda_emu/driver.cpp's, with per-combo members ptr[k][c], numel[c], chunk_base[c], id[c]; the lists
// must outlive the batches).
template <class Call>
void append_batches(Call& call) {
  for (int c = 0; c < kNumCombos; ++c) {
    if (call.numel[c].empty()) continue;
    Batch b;
    b.n = static_cast<int>(call.numel[c].size());
    b.combo = c;
    for (int k = 0; k < 5; ++k) b.ptr[k] = call.ptr[k][c].data();
    b.numel = call.numel[c].data();
    b.chunk_base = call.chunk_base[c].data();
    b.id = call.id[c].data();
    call.batches.push_back(b);
  }
}

// Optional device scalars (nullptr when absent).
struct StepScalars {
  const float* found_inf;
  const float* grad_divisor;
  const float* grad_scale;
  const float* lr;           // a tensor learning rate; else LambParams::lr / LarsParams::lr is used
};

cudaError_t lamb_prologue(int n, const lamb_math::LambParams& hp, StepScalars sc, int maximize, Scratch s,
                          cudaStream_t stream);
cudaError_t lamb_pass_a(const Batch& b, const lamb_math::LambParams& hp, bool write_state, Scratch s,
                        cudaStream_t stream);
cudaError_t lamb_finalize(int n, const lamb_math::LambParams& hp, StepScalars sc, bool check_finite, Scratch s,
                          cudaStream_t stream);
cudaError_t lamb_pass_b(const Batch& b, const lamb_math::LambParams& hp, bool recompute, Scratch s,
                        cudaStream_t stream);

cudaError_t lars_prologue(int n, StepScalars sc, int maximize, Scratch s, cudaStream_t stream);
cudaError_t lars_pass_a(const Batch& b, const lamb_math::LarsParams& lp, Scratch s, cudaStream_t stream);
cudaError_t lars_finalize(int n, const lamb_math::LarsParams& lp, StepScalars sc, bool check_finite, Scratch s,
                          cudaStream_t stream);
cudaError_t lars_pass_b(const Batch& b, const lamb_math::LarsParams& lp, Scratch s, cudaStream_t stream);

// Split step: out[2n] = per-tensor partial squared norms after pass A (LAMB or LARS); zeros when skipped,
// a NaN second norm where check_finite finds a non-finite gradient.
cudaError_t partial_sq_norms(int n, bool check_finite, Scratch s, double* out, cudaStream_t stream);
// As *_finalize, from complete squared norms full[2n] (with check_finite a NaN second norm skips the step;
// an inf one, from finite gradients whose fp32 squares overflow, does not).
cudaError_t lamb_finalize_full(int n, const lamb_math::LambParams& hp, StepScalars sc, bool check_finite,
                               const double* full, Scratch s, cudaStream_t stream);
cudaError_t lars_finalize_full(int n, const lamb_math::LarsParams& lp, StepScalars sc, bool check_finite,
                               const double* full, Scratch s, cudaStream_t stream);

}  // namespace lamb_cuda

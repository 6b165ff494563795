// Fused LAMB on CUDA: prologue, pass A, finalize, pass B (see include/lamb_cuda.h).  No torch headers.
//
// fp32 bytes a parameter a step: pass A reads g, w, m, v and writes m, v (24), pass B reads w, m, v and
// writes w (16): 40.  With check_finite pass A only reads (16) and pass B reads g, w, m, v and writes
// m, v, w (28): 44.  bf16/fp16 with fp32 masters: pass A 2+4+8 read + 8 written, pass B 12 read + 4+2 written.
// bf16/fp16 without masters (16-bit moments): pass A reads g, w, m, v (8), pass B reads them again and writes
// m, v, w (8 + 6): 22 (see defer_moments).  An fp32 gradient of a bf16/fp16 parameter (the G32 combinations)
// adds 2 bytes to each pass that reads g.
#include <cuda_runtime.h>
#include <stdint.h>

#include "include/kernel_common.cuh"

namespace lamb_cuda {

using lamb_math::LambParams;
using lamb_math::LambStepCoef;

// ------------------------------------------------------------------------------------- pass A
template <typename P, typename G, typename S, bool MASTER, bool WRITE>
struct LambAFunctor {
  template <int V>
  __device__ __forceinline__ static void body(const G* g, const P* p, const float* x, S* m, S* v, int64_t i,
                                              const LambParams& hp, const LambStepCoef& c, float gs, float& aw,
                                              float& au, float& ag) {
    float gf[V], wf[V], mf[V], vf[V];
    load_f<V>(g, i, gf);
    if (MASTER) {
      load_f<V>(x, i, wf);
    } else {
      load_f<V>(p, i, wf);
    }
    load_f<V>(m, i, mf);
    load_f<V>(v, i, vf);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float gk = gf[k] * gs;
      lamb_math::lamb_moments(gk, wf[k], mf[k], vf[k], hp);
      // u from the step's fp32 moments (the reference's); only their stores round to S
      const float u = lamb_math::lamb_update(mf[k], vf[k], wf[k], hp, c);
      aw += wf[k] * wf[k];
      au += u * u;
      // the finiteness check (check_finite) only: gk - gk is 0, or NaN where gk is inf or NaN (gk * gk would
      // overflow to inf for a finite |gk| > 1.8e19 and skip a finite step)
      ag += gk - gk;
    }
    if (WRITE) {
      store_f<V>(m, i, mf);
      store_f<V>(v, i, vf);
    }
  }

  __device__ void operator()(int64_t chunk_size, TensorListMetadata<5>& meta, LambParams hp, Scratch s) {
    if (*s.flag) return;
    const int tl = meta.block_to_tensor[blockIdx.x];
    const int64_t chunk = meta.block_to_chunk[blockIdx.x];
    const int64_t start = chunk * chunk_size;
    const int64_t len = min(chunk_size, meta.numel[tl] - start);
    const P* p = static_cast<const P*>(meta.addr[0][tl]) + start;
    const G* g = static_cast<const G*>(meta.addr[1][tl]) + start;
    S* m = static_cast<S*>(meta.addr[2][tl]) + start;
    S* v = static_cast<S*>(meta.addr[3][tl]) + start;
    const float* x = MASTER ? static_cast<const float*>(meta.addr[4][tl]) + start : nullptr;
    const LambStepCoef c = s.coef[meta.id[tl]].c;
    const float gs = *s.gscale;

    float aw = 0.f, au = 0.f, ag = 0.f;  // per thread (<= 128 elements each); the block sums in double
    const bool vec = is_aligned(p, sizeof(P) * kVec) && is_aligned(g, sizeof(G) * kVec) &&
                     is_aligned(m, sizeof(S) * kVec) && is_aligned(v, sizeof(S) * kVec) &&
                     is_aligned(x, sizeof(float) * kVec);
    const int64_t nvec = vec ? len / kVec : 0;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x)
      body<kVec>(g, p, x, m, v, j * kVec, hp, c, gs, aw, au, ag);
    for (int64_t i = nvec * kVec + threadIdx.x; i < len; i += blockDim.x)
      body<1>(g, p, x, m, v, i, hp, c, gs, aw, au, ag);

    __shared__ double shared[3 * kBlockSize];
    double sums[3] = {aw, au, ag};
    block_sum<3>(sums, shared);
    if (threadIdx.x == 0) {
      double* out = s.partial + (meta.chunk_base[tl] + chunk) * 3;
      out[0] = sums[0];
      out[1] = sums[1];
      out[2] = sums[2];
    }
  }
};

// ------------------------------------------------------------------------------------- pass B
template <typename P, typename G, typename S, bool MASTER, bool RECOMPUTE>
struct LambBFunctor {
  template <int V>
  __device__ __forceinline__ static void body(const G* g, P* p, float* x, S* m, S* v, int64_t i, const LambParams& hp,
                                              const LambStepCoef& c, float gs, float step, float decay) {
    float wf[V], mf[V], vf[V];
    if (MASTER) {
      load_f<V>(x, i, wf);
    } else {
      load_f<V>(p, i, wf);
    }
    load_f<V>(m, i, mf);
    load_f<V>(v, i, vf);
    if (RECOMPUTE) {
      float gf[V];
      load_f<V>(g, i, gf);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        lamb_math::lamb_moments(gf[k] * gs, wf[k], mf[k], vf[k], hp);
      }
      store_f<V>(m, i, mf);
      store_f<V>(v, i, vf);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float u = lamb_math::lamb_update(mf[k], vf[k], wf[k], hp, c);
      wf[k] = lamb_math::lamb_apply(wf[k], u, step, decay);
    }
    if (MASTER) store_f<V>(x, i, wf);
    store_f<V>(p, i, wf);
  }

  __device__ void operator()(int64_t chunk_size, TensorListMetadata<5>& meta, LambParams hp, Scratch s) {
    if (*s.flag) return;
    const int tl = meta.block_to_tensor[blockIdx.x];
    const int64_t chunk = meta.block_to_chunk[blockIdx.x];
    const int64_t start = chunk * chunk_size;
    const int64_t len = min(chunk_size, meta.numel[tl] - start);
    P* p = static_cast<P*>(meta.addr[0][tl]) + start;
    const G* g = static_cast<const G*>(meta.addr[1][tl]) + start;
    S* m = static_cast<S*>(meta.addr[2][tl]) + start;
    S* v = static_cast<S*>(meta.addr[3][tl]) + start;
    float* x = MASTER ? static_cast<float*>(meta.addr[4][tl]) + start : nullptr;
    const TensorCoef tc = s.coef[meta.id[tl]];
    const float gs = *s.gscale;
    const bool vec = is_aligned(p, sizeof(P) * kVec) && is_aligned(g, sizeof(G) * kVec) &&
                     is_aligned(m, sizeof(S) * kVec) && is_aligned(v, sizeof(S) * kVec) &&
                     is_aligned(x, sizeof(float) * kVec);
    const int64_t nvec = vec ? len / kVec : 0;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x)
      body<kVec>(g, p, x, m, v, j * kVec, hp, tc.c, gs, tc.s, tc.decay);
    for (int64_t i = nvec * kVec + threadIdx.x; i < len; i += blockDim.x)
      body<1>(g, p, x, m, v, i, hp, tc.c, gs, tc.s, tc.decay);
  }
};

// ------------------------------------------------------------------------------------- prologue, finalize
__device__ __forceinline__ float* stat_ptr(const Scratch& s, int n, int which, int i) {
  return reinterpret_cast<float*>(static_cast<uintptr_t>(s.table[which * n + i]));
}

// Skip flag and grad multiplier (thread 0); bias-correction terms of every tensor.
__device__ void prologue_common(StepScalars sc, int maximize, Scratch s) {
  if (threadIdx.x == 0) {
    int skip = 0;
    float div = 1.0f;
    if (sc.found_inf != nullptr && *sc.found_inf != 0.0f) skip = 1;
    if (sc.grad_divisor != nullptr) div *= *sc.grad_divisor;
    if (sc.grad_scale != nullptr) div *= *sc.grad_scale;
    if (!isfinite(div) || div == 0.0f) skip = 1;
    *s.flag = skip;
    *s.gscale = skip ? 0.0f : (maximize ? -1.0f : 1.0f) / div;
  }
}

__global__ void lamb_prologue_kernel(int n, LambParams hp, StepScalars sc, int maximize, Scratch s) {
  prologue_common(sc, maximize, s);
  const float lr = sc.lr != nullptr ? *sc.lr : hp.lr;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float t = *stat_ptr(s, n, 0, i) + 1.0f;
    s.coef[i].c = lamb_math::lamb_step_coef(hp, lr, t);
  }
}

// FULL: the squared norms come complete from the caller (full = [||w_i||^2 .., ||u_i||^2 ..], the split
// step's pass B), and a NaN ||u_i||^2 (pass A's mark of a non-finite gradient, kept by the caller's sum) is
// what check_finite skips on: not an inf one, which a finite gradient above 1.8e19 gives (its fp32 squares
// overflow) and with which the one-call step goes ahead; else they are summed from pass A's per-chunk
// partial sums.
template <bool FULL>
__global__ void lamb_finalize_kernel(int n, LambParams hp, StepScalars sc, int check_finite, const double* full,
                                     Scratch s) {
  if (*s.flag) return;  // uniform: every thread returns
  const int64_t* prefix = s.table + 4 * n;
  int nonfinite = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    double w2 = 0.0, u2 = 0.0, g2 = 0.0;
    if (FULL) {
      w2 = full[i];
      u2 = full[n + i];
      g2 = isnan(u2) ? u2 : 0.0;
    } else {
      for (int64_t c = prefix[i]; c < prefix[i + 1]; ++c) {
        w2 += s.partial[c * 3 + 0];
        u2 += s.partial[c * 3 + 1];
        g2 += s.partial[c * 3 + 2];
      }
    }
    if (!isfinite(g2)) nonfinite = 1;
    // keep the norms for the second loop in the coefficient slots they replace
    s.coef[i].s = static_cast<float>(sqrt(w2));
    s.coef[i].decay = static_cast<float>(sqrt(u2));
  }
  nonfinite = __syncthreads_or(nonfinite);
  if (check_finite && nonfinite) {
    if (threadIdx.x == 0) *s.flag = 1;
    return;
  }
  const float lr_wd = sc.lr != nullptr ? *sc.lr * hp.weight_decay : hp.lr_wd;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float wn = s.coef[i].s;
    const float un = s.coef[i].decay;
    const float rho = lamb_math::lamb_trust_ratio(wn, un, hp);
    s.coef[i].s = s.coef[i].c.lr_t * rho;
    s.coef[i].decay = hp.decoupled ? lr_wd : 0.0f;
    *stat_ptr(s, n, 0, i) += 1.0f;
    *stat_ptr(s, n, 1, i) = rho;
    *stat_ptr(s, n, 2, i) = wn;
    *stat_ptr(s, n, 3, i) = un;
  }
}

// ------------------------------------------------------------------------------------- launchers
cudaError_t lamb_prologue(int n, const LambParams& hp, StepScalars sc, int maximize, Scratch s, cudaStream_t stream) {
  LAMB_LAUNCH(lamb_prologue_kernel, 1, kBlockSize, stream)(n, hp, sc, maximize, s);
  return cudaGetLastError();
}

cudaError_t lamb_finalize(int n, const LambParams& hp, StepScalars sc, bool check_finite, Scratch s,
                          cudaStream_t stream) {
  LAMB_LAUNCH(lamb_finalize_kernel<false>, 1, kBlockSize, stream)(n, hp, sc, check_finite ? 1 : 0, nullptr, s);
  return cudaGetLastError();
}

cudaError_t lamb_finalize_full(int n, const LambParams& hp, StepScalars sc, bool check_finite, const double* full,
                               Scratch s, cudaStream_t stream) {
  LAMB_LAUNCH(lamb_finalize_kernel<true>, 1, kBlockSize, stream)(n, hp, sc, check_finite ? 1 : 0, full, s);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------- split step
// The pieces' partial squared norms after pass A (LAMB or LARS: both leave ||w||^2, ||u||^2 or ||g||^2 and
// the finiteness sum in s.partial): out = [||w_i||^2 .., ||u_i||^2 ..] per tensor, chunks added in order;
// zeros where the step is skipped; with check_finite a NaN ||u_i||^2 marks a non-finite gradient.
__global__ void partial_sq_norms_kernel(int n, int check_finite, Scratch s, double* out) {
  const int64_t* prefix = s.table + 4 * n;
  const bool skip = *s.flag != 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    double w2 = 0.0, u2 = 0.0, g2 = 0.0;
    if (!skip) {
      for (int64_t c = prefix[i]; c < prefix[i + 1]; ++c) {
        w2 += s.partial[c * 3 + 0];
        u2 += s.partial[c * 3 + 1];
        g2 += s.partial[c * 3 + 2];
      }
    }
    out[i] = w2;
    out[n + i] = (check_finite && !isfinite(g2)) ? nan("") : u2;
  }
}

cudaError_t partial_sq_norms(int n, bool check_finite, Scratch s, double* out, cudaStream_t stream) {
  LAMB_LAUNCH(partial_sq_norms_kernel, 1, kBlockSize, stream)(n, check_finite ? 1 : 0, s, out);
  return cudaGetLastError();
}

// Moments stored in bf16/fp16 (no master weights): pass B cannot get pass A's u back from the rounded m, v it
// would read, so pass A only reads and pass B recomputes m, v from g, as with check_finite (22 bytes a
// parameter instead of 20), and both passes take u from the fp32 moments.
static bool defer_moments(int combo) { return lamb_math::moments_16bit(combo); }

cudaError_t lamb_pass_a(const Batch& b, const LambParams& hp, bool write_state, Scratch s, cudaStream_t stream) {
  if (write_state && !defer_moments(b.combo)) {
    LAMB_CUDA_DISPATCH(b.combo, return multi_tensor_apply<5>(kChunkSize, b.n, b.ptr, b.numel, b.chunk_base, b.id,
                                                             stream, LambAFunctor<P, G, S, MASTER, true>(), hp, s))
  } else {
    LAMB_CUDA_DISPATCH(b.combo, return multi_tensor_apply<5>(kChunkSize, b.n, b.ptr, b.numel, b.chunk_base, b.id,
                                                             stream, LambAFunctor<P, G, S, MASTER, false>(), hp, s))
  }
  return cudaSuccess;
}

cudaError_t lamb_pass_b(const Batch& b, const LambParams& hp, bool recompute, Scratch s, cudaStream_t stream) {
  if (recompute || defer_moments(b.combo)) {
    LAMB_CUDA_DISPATCH(b.combo, return multi_tensor_apply<5>(kChunkSize, b.n, b.ptr, b.numel, b.chunk_base, b.id,
                                                             stream, LambBFunctor<P, G, S, MASTER, true>(), hp, s))
  } else {
    LAMB_CUDA_DISPATCH(b.combo, return multi_tensor_apply<5>(kChunkSize, b.n, b.ptr, b.numel, b.chunk_base, b.id,
                                                             stream, LambBFunctor<P, G, S, MASTER, false>(), hp, s))
  }
  return cudaSuccess;
}

}  // namespace lamb_cuda

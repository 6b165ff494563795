// Fused LARS on CUDA: prologue, pass A (norms, read only), finalize, pass B (see include/lamb_cuda.h).
// No torch headers.  fp32 bytes a parameter a step: pass A reads g, w (8); pass B reads g, w, v and
// writes v, w (20): 28.  Pass A writes nothing, so the inf/NaN check (check_finite) costs no extra bytes.
#include <cuda_runtime.h>
#include <stdint.h>

#include "include/kernel_common.cuh"

namespace lamb_cuda {

using lamb_math::LarsParams;

template <typename P, typename G, typename S, bool MASTER>
struct LarsAFunctor {
  template <int V>
  __device__ __forceinline__ static void body(const G* g, const P* p, const float* x, int64_t i, const LarsParams& lp,
                                              float gs, float& aw, float& as, float& af) {
    float gf[V], wf[V];
    load_f<V>(g, i, gf);
    if (MASTER) {
      load_f<V>(x, i, wf);
    } else {
      load_f<V>(p, i, wf);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = lamb_math::lars_stat(gf[k] * gs, wf[k], lp);
      aw += wf[k] * wf[k];
      as += d * d;
      af += d - d;  // 0, or NaN where d is inf or NaN (d * d overflows for a finite |d| > 1.8e19)
    }
  }

  __device__ void operator()(int64_t chunk_size, TensorListMetadata<5>& meta, LarsParams lp, Scratch s) {
    if (*s.flag) return;
    const int tl = meta.block_to_tensor[blockIdx.x];
    const int64_t chunk = meta.block_to_chunk[blockIdx.x];
    const int64_t start = chunk * chunk_size;
    const int64_t len = min(chunk_size, meta.numel[tl] - start);
    const P* p = static_cast<const P*>(meta.addr[0][tl]) + start;
    const G* g = static_cast<const G*>(meta.addr[1][tl]) + start;
    const float* x = MASTER ? static_cast<const float*>(meta.addr[4][tl]) + start : nullptr;
    const float gs = *s.gscale;
    float aw = 0.f, as = 0.f, af = 0.f;
    const bool vec = is_aligned(p, sizeof(P) * kVec) && is_aligned(g, sizeof(G) * kVec) &&
                     is_aligned(x, sizeof(float) * kVec);
    const int64_t nvec = vec ? len / kVec : 0;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) body<kVec>(g, p, x, j * kVec, lp, gs, aw, as, af);
    for (int64_t i = nvec * kVec + threadIdx.x; i < len; i += blockDim.x) body<1>(g, p, x, i, lp, gs, aw, as, af);

    __shared__ double shared[3 * kBlockSize];
    double sums[3] = {aw, as, af};
    block_sum<3>(sums, shared);
    if (threadIdx.x == 0) {
      double* out = s.partial + (meta.chunk_base[tl] + chunk) * 3;
      out[0] = sums[0];
      out[1] = sums[1];
      out[2] = sums[2];  // finite iff every d (g, or g + wd w) is
    }
  }
};

template <typename P, typename G, typename S, bool MASTER>
struct LarsBFunctor {
  template <int V>
  __device__ __forceinline__ static void body(const G* g, P* p, float* x, S* buf, int64_t i, const LarsParams& lp,
                                              float gs, float step) {
    float gf[V], wf[V], vf[V];
    load_f<V>(g, i, gf);
    if (MASTER) {
      load_f<V>(x, i, wf);
    } else {
      load_f<V>(p, i, wf);
    }
    load_f<V>(buf, i, vf);
#pragma unroll
    for (int k = 0; k < V; ++k) lamb_math::lars_apply(gf[k] * gs, wf[k], vf[k], step, lp);
    store_f<V>(buf, i, vf);
    if (MASTER) store_f<V>(x, i, wf);
    store_f<V>(p, i, wf);
  }

  __device__ void operator()(int64_t chunk_size, TensorListMetadata<5>& meta, LarsParams lp, Scratch s) {
    if (*s.flag) return;
    const int tl = meta.block_to_tensor[blockIdx.x];
    const int64_t chunk = meta.block_to_chunk[blockIdx.x];
    const int64_t start = chunk * chunk_size;
    const int64_t len = min(chunk_size, meta.numel[tl] - start);
    P* p = static_cast<P*>(meta.addr[0][tl]) + start;
    const G* g = static_cast<const G*>(meta.addr[1][tl]) + start;
    S* buf = static_cast<S*>(meta.addr[2][tl]) + start;
    float* x = MASTER ? static_cast<float*>(meta.addr[4][tl]) + start : nullptr;
    const float gs = *s.gscale;
    const float step = s.coef[meta.id[tl]].s;
    const bool vec = is_aligned(p, sizeof(P) * kVec) && is_aligned(g, sizeof(G) * kVec) &&
                     is_aligned(buf, sizeof(S) * kVec) && is_aligned(x, sizeof(float) * kVec);
    const int64_t nvec = vec ? len / kVec : 0;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) body<kVec>(g, p, x, buf, j * kVec, lp, gs, step);
    for (int64_t i = nvec * kVec + threadIdx.x; i < len; i += blockDim.x) body<1>(g, p, x, buf, i, lp, gs, step);
  }
};

__device__ __forceinline__ float* lars_stat_ptr(const Scratch& s, int n, int which, int i) {
  return reinterpret_cast<float*>(static_cast<uintptr_t>(s.table[which * n + i]));
}

__global__ void lars_prologue_kernel(StepScalars sc, int maximize, Scratch s) {
  if (threadIdx.x == 0) {
    int skip = 0;
    float div = 1.0f;
    if (sc.found_inf != nullptr && *sc.found_inf != 0.0f) skip = 1;
    if (sc.grad_scale != nullptr) div *= *sc.grad_scale;
    if (!isfinite(div) || div == 0.0f) skip = 1;
    *s.flag = skip;
    *s.gscale = skip ? 0.0f : (maximize ? -1.0f : 1.0f) / div;
  }
}

// FULL: complete squared norms from the caller (the split step's pass B), as in lamb_kernels.cu: a NaN
// ||d_i||^2 marks a non-finite d (partial_sq_norms), an inf one is a finite d whose fp32 squares overflowed.
template <bool FULL>
__global__ void lars_finalize_kernel(int n, LarsParams lp, StepScalars sc, int check_finite, const double* full,
                                     Scratch s) {
  if (*s.flag) return;
  const int64_t* prefix = s.table + 4 * n;
  int nonfinite = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    double w2 = 0.0, d2 = 0.0, f2 = 0.0;
    if (FULL) {
      w2 = full[i];
      d2 = full[n + i];
      if (isnan(d2)) nonfinite = 1;
    } else {
      for (int64_t c = prefix[i]; c < prefix[i + 1]; ++c) {
        w2 += s.partial[c * 3 + 0];
        d2 += s.partial[c * 3 + 1];
        f2 += s.partial[c * 3 + 2];
      }
      if (!isfinite(f2)) nonfinite = 1;  // the finiteness sum, not d2: that overflows for large finite d
    }
    s.coef[i].s = static_cast<float>(sqrt(w2));
    s.coef[i].decay = static_cast<float>(sqrt(d2));
  }
  nonfinite = __syncthreads_or(nonfinite);
  if (check_finite && nonfinite) {
    if (threadIdx.x == 0) *s.flag = 1;
    return;
  }
  const float lr = sc.lr != nullptr ? *sc.lr : lp.lr;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float wn = s.coef[i].s;
    const float gn = s.coef[i].decay;
    const float rho = lamb_math::lars_trust_ratio(wn, gn, lr, lp);
    s.coef[i].s = lr * rho;
    s.coef[i].decay = 0.0f;
    *lars_stat_ptr(s, n, 0, i) += 1.0f;
    *lars_stat_ptr(s, n, 1, i) = rho;
    *lars_stat_ptr(s, n, 2, i) = wn;
    *lars_stat_ptr(s, n, 3, i) = gn;
  }
}

cudaError_t lars_prologue(int n, StepScalars sc, int maximize, Scratch s, cudaStream_t stream) {
  (void)n;
  LAMB_LAUNCH(lars_prologue_kernel, 1, 32, stream)(sc, maximize, s);
  return cudaGetLastError();
}

cudaError_t lars_finalize(int n, const LarsParams& lp, StepScalars sc, bool check_finite, Scratch s,
                          cudaStream_t stream) {
  LAMB_LAUNCH(lars_finalize_kernel<false>, 1, kBlockSize, stream)(n, lp, sc, check_finite ? 1 : 0, nullptr, s);
  return cudaGetLastError();
}

cudaError_t lars_finalize_full(int n, const LarsParams& lp, StepScalars sc, bool check_finite, const double* full,
                               Scratch s, cudaStream_t stream) {
  LAMB_LAUNCH(lars_finalize_kernel<true>, 1, kBlockSize, stream)(n, lp, sc, check_finite ? 1 : 0, full, s);
  return cudaGetLastError();
}

cudaError_t lars_pass_a(const Batch& b, const LarsParams& lp, Scratch s, cudaStream_t stream) {
  LAMB_CUDA_DISPATCH(b.combo, return multi_tensor_apply<5>(kChunkSize, b.n, b.ptr, b.numel, b.chunk_base, b.id, stream,
                                                           LarsAFunctor<P, G, S, MASTER>(), lp, s))
  return cudaSuccess;
}

cudaError_t lars_pass_b(const Batch& b, const LarsParams& lp, Scratch s, cudaStream_t stream) {
  LAMB_CUDA_DISPATCH(b.combo, return multi_tensor_apply<5>(kChunkSize, b.n, b.ptr, b.numel, b.chunk_base, b.id, stream,
                                                           LarsBFunctor<P, G, S, MASTER>(), lp, s))
  return cudaSuccess;
}

}  // namespace lamb_cuda

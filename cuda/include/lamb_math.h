// Per-element and per-tensor math of the fused LAMB and LARS kernels, shared by the CUDA kernels
// (cuda/lamb_kernels.cu, cuda/lars_kernels.cu) and the CPU twin (cuda/lamb_cpu.cpp), so that the CPU
// tests exercise the arithmetic the GPU runs.  No torch headers: this file compiles with nvcc alone.
//
// Every hyperparameter switch of lamb.Lamb / lamb.Lars is folded into a few scalars on the host
// (LambParams / LarsParams), so the per-element code is branch-free:
//
//   LAMB pass A (per element):   g' = g * gscale + wd_l2 * w
//                                m  = beta1 * m + beta3 * g'          beta3 = 1 - beta1, or 1
//                                v  = beta2 * v + (1 - beta2) * g' * g'
//                                u  = (m * rbc1) / (sqrt(v * rbc2) + eps) + wd_ratio * w
//                                ||w||^2 += w*w,  ||u||^2 += u*u      (double accumulators)
//   per tensor:                  rho = trust ratio (zero-norm rule, phi clamp, min/max clamp)
//   LAMB pass B (per element):   w' = (w - s * u) - decay * w         s = lr_t * rho, decay = lr * wd
//
//   LARS pass A:                 ||w||^2, ||g||^2 (or ||g + wd w||^2)
//   LARS pass B:                 d = g + wd * w;  v = mu * v + (lr rho) * d;  w' = w - v (or nesterov)
//
// The order of the floating-point operations follows lamb/lamb.py's reference backend, so that the
// fused kernels agree with it to a few ulps; the CUDA build uses --fmad=false for the same reason.
#pragma once

#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define LAMB_HD __host__ __device__ __forceinline__
#else
#define LAMB_HD inline __attribute__((always_inline))
#endif

namespace lamb_math {

// ------------------------------------------------------------------------------------ storage types
// Raw 16-bit storage; the conversions below are bit-exact with torch's (round to nearest even).
struct bf16_t {
  uint16_t x;
};
struct fp16_t {
  uint16_t x;
};

LAMB_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LAMB_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

LAMB_HD float to_float(float x) { return x; }

LAMB_HD float to_float(bf16_t h) { return f32_from_bits(static_cast<uint32_t>(h.x) << 16); }

LAMB_HD float to_float(fp16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.x));
#else
  // fp16_ieee_to_fp32_value (Maratyszcza/FP16, as in c10::Half): exact for every input.
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float denormalized = f32_from_bits((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t cutoff = 1u << 27;
  const uint32_t result = sign | (two_w < cutoff ? f32_bits(denormalized) : f32_bits(normalized));
  return f32_from_bits(result);
#endif
}

template <typename T>
LAMB_HD T from_float(float f);

template <>
LAMB_HD float from_float<float>(float f) {
  return f;
}

template <>
LAMB_HD bf16_t from_float<bf16_t>(float f) {
  // Round to nearest even, NaN kept quiet (c10::BFloat16's round_to_nearest_even).
  uint32_t u = f32_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bf16_t h;
  h.x = static_cast<uint16_t>((f != f) ? 0x7FC0u : rounded);
  return h;
}

template <>
LAMB_HD fp16_t from_float<fp16_t>(float f) {
  fp16_t h;
#if defined(__CUDA_ARCH__)
  h.x = __half_as_ushort(__float2half_rn(f));
#else
  // fp16_ieee_from_fp32_value (Maratyszcza/FP16, as in c10::Half): round to nearest even.
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  h.x = static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
  return h;
}

// ------------------------------------------------------------------------------------ dtype combinations
// How a tensor's parameter, gradient and state are stored: every pass is instantiated once per combination
// (CPU: LAMB_CPU_COMBOS in cpu/lamb_cpu_kernels.inc; CUDA: LAMB_CUDA_DISPATCH in kernel_common.cuh).
//
//   combination                 parameter   gradient   m, v (LARS: momentum)   master weights
//   kF32                        fp32        fp32       fp32                    -
//   kBF16, kF16                 16-bit      16-bit     16-bit                  -
//   kBF16Master, kF16Master     16-bit      16-bit     fp32                    fp32
//   kBF16G32, kF16G32           16-bit      fp32       16-bit                  -
//   kBF16MasterG32, kF16MasterG32  16-bit   fp32       fp32                    fp32
//
// The G32 combinations take an fp32 gradient of a 16-bit parameter (torch's Tensor.grad_dtype) as it is:
// rounding it to the parameter's dtype first would cost 8 (bf16) or 11 (fp16) of its 24 bits before the
// moments, which the reference backend computes from the fp32 gradient.
enum Combo : int {
  kF32 = 0,
  kBF16,
  kF16,
  kBF16Master,
  kF16Master,
  kBF16G32,
  kF16G32,
  kBF16MasterG32,
  kF16MasterG32,
  kNumCombos
};

// The combination of the same parameter and state with an fp32 gradient.
LAMB_HD int with_fp32_grad(int combo) { return combo == kF32 ? kF32 : combo + (kBF16G32 - kBF16); }

// Moments stored in 16 bits (no master weights).
LAMB_HD bool moments_16bit(int combo) {
  return combo == kBF16 || combo == kF16 || combo == kBF16G32 || combo == kF16G32;
}

// ------------------------------------------------------------------------------------ LAMB
enum BiasCorrection : int { kBiasMoments = 0, kBiasLr = 1, kBiasNone = 2 };
enum WeightDecayMode : int { kDecayRatio = 0, kDecayL2 = 1, kDecayDecoupled = 2 };

// Per-call scalars, built on the host from the group's options (lamb_params() below).
struct LambParams {
  float lr;               // the group's learning rate (a tensor lr is read on the device: see kernels)
  float beta1, beta2;
  float beta3;            // 1 - beta1 (grad_averaging) or 1
  float one_minus_beta2;  // 1 - beta2
  float eps;
  float weight_decay;
  float wd_l2;            // weight_decay in "l2" mode, else 0
  float wd_ratio;         // weight_decay in "ratio" mode, else 0
  int decoupled;          // 1 in "decoupled" mode with weight_decay != 0
  float lr_wd;            // lr * weight_decay (rounded once from double), the decoupled decay
  int bias_correction;    // BiasCorrection
  int adapt;              // apply the trust ratio in this group
  int has_bounds;         // weight_norm_bounds given
  float wn_lo, wn_hi;     // phi(||x||) = clamp(||x||, wn_lo, wn_hi)
  int has_min, has_max;
  float min_ratio, max_ratio;
};

// Bias-correction terms for one tensor at step t (the incremented step), in float as the reference does
// (1 - beta**t with beta rounded to float).
struct LambStepCoef {
  float rbc1, rbc2;  // multipliers of m and v inside the update ("moments" mode; else 1)
  float lr_t;        // the step size before the trust ratio: lr, or lr * sqrt(bc2) / bc1 ("lr" mode)
};

LAMB_HD LambStepCoef lamb_step_coef(const LambParams& p, float lr, float t) {
  LambStepCoef c;
  c.rbc1 = 1.0f;
  c.rbc2 = 1.0f;
  c.lr_t = lr;
  if (p.bias_correction != kBiasNone) {
    const float bc1 = 1.0f - powf(p.beta1, t);
    const float bc2 = 1.0f - powf(p.beta2, t);
    if (p.bias_correction == kBiasMoments) {
      c.rbc1 = 1.0f / bc1;
      c.rbc2 = 1.0f / bc2;
    } else {
      c.lr_t = lr * sqrtf(bc2) / bc1;
    }
  }
  return c;
}

// m, v <- the new moments (in float: the update takes them so, and only their stores round to the storage type).  L2 = false skips
// the "l2" term where wd_l2 is 0, as the reference does (adding 0 * w only costs a multiply and an add).
template <bool L2 = true>
LAMB_HD void lamb_moments(float g, float w, float& m, float& v, const LambParams& p) {
  if (L2) g = g + p.wd_l2 * w;
  m = p.beta1 * m + p.beta3 * g;
  v = p.beta2 * v + p.one_minus_beta2 * g * g;
}

// u = r + wd * w ("ratio" mode), r = m_hat / (sqrt(v_hat) + eps).
LAMB_HD float lamb_update(float m, float v, float w, const LambParams& p, const LambStepCoef& c) {
  const float r = (m * c.rbc1) / (sqrtf(v * c.rbc2) + p.eps);
  return r + p.wd_ratio * w;
}

// w' = w - s * u - decay * w   (s = lr_t * rho; decay = lr * wd in "decoupled" mode, else 0; DECAY = false
// skips the decay term where decay is 0, as the reference does)
template <bool DECAY = true>
LAMB_HD float lamb_apply(float w, float u, float s, float decay) {
  const float x = w - s * u;
  return DECAY ? x - decay * w : x;
}

// The trust ratio from the squared norms: 1 where ||x|| or ||u|| is 0 (or the group does not adapt),
// else clamp(phi(||x||) / ||u||, min, max).  The clamp never applies to the zero-norm 1.
LAMB_HD float lamb_trust_ratio(float w_norm, float u_norm, const LambParams& p) {
  if (!p.adapt) return 1.0f;
  if (!(w_norm > 0.0f && u_norm > 0.0f)) return 1.0f;
  float phi = w_norm;
  if (p.has_bounds) phi = fminf(fmaxf(phi, p.wn_lo), p.wn_hi);
  float r = phi / u_norm;
  if (p.has_min) r = fmaxf(r, p.min_ratio);
  if (p.has_max) r = fminf(r, p.max_ratio);
  return r;
}

// ------------------------------------------------------------------------------------ LARS
struct LarsParams {
  float lr;
  float momentum;
  float weight_decay;
  float trust_coefficient;
  float eps;
  int nesterov;
  int denom_norm;  // 1: ||g + wd w|| ("norm"), 0: ||g|| + wd ||w|| ("sum")
  int trust_clip;
  int adapt;
};

// rho from ||w|| and ||g|| (or ||g + wd w||), as lamb/lars.py's _ratio.
LAMB_HD float lars_trust_ratio(float w_norm, float g_norm, float lr, const LarsParams& p) {
  if (!p.adapt) return 1.0f;
  float rho = 1.0f;
  if (w_norm > 0.0f && g_norm > 0.0f) {
    const float denom = p.denom_norm ? g_norm + p.eps : (g_norm + p.weight_decay * w_norm) + p.eps;
    rho = (p.trust_coefficient * w_norm) / denom;
    // LARC's clip applies to a computed ratio only: a zero norm keeps 1 even when lr > 1.
    if (p.trust_clip) rho = fminf(rho / lr, 1.0f);
  }
  return rho;
}

// d = g + wd w;  v = mu v + s d;  w' = w - v  (nesterov: w - (mu v + s d)),  s = lr * rho.
LAMB_HD void lars_apply(float g, float& w, float& v, float s, const LarsParams& p) {
  const float d = g + p.weight_decay * w;
  const float scaled = s * d;
  v = p.momentum * v + scaled;
  w = w - (p.nesterov ? p.momentum * v + scaled : v);
}

// The LARS statistic that pairs with ||w||: g itself ("sum"), or d = g + wd w ("norm").
LAMB_HD float lars_stat(float g, float w, const LarsParams& p) {
  return p.denom_norm ? g + p.weight_decay * w : g;
}

}  // namespace lamb_math

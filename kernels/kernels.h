// Plain C++ kernels of the optional extension minidiff._native (bound in module.cpp).
// Arrays are C-contiguous and already checked by the Python wrappers in minidiff/kernels/.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// The build targets baseline x86-64 (SSE2). MINIDIFF_VECTOR_CLONES on a function adds an AVX2
// clone of it, picked at load time on CPUs that have it (AVX2 only: no FMA, so no fused
// multiply-add changes the rounding: the kernels that match their reference to the bit use it).
// MINIDIFF_WIDE_CLONES adds an AVX-512 clone as well, for the kernels that agree with their
// reference to a rounding anyway (group norm + SiLU, softmax, the loss sum): twice the lanes,
// and fused multiply-adds where GCC forms them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MINIDIFF_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#define MINIDIFF_WIDE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MINIDIFF_VECTOR_CLONES
#define MINIDIFF_WIDE_CLONES
#endif

namespace minidiff {

// e^c in float for c in [-87.33654, 88] (the range where e^c and 2^n below are normal floats),
// with no checks: Cephes' expf, written so that it vectorizes (std::exp does not, without
// -ffast-math): c = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, then 2^n from the
// exponent bits. About 1 ulp.
inline float exp_in_range(float c) {
    const float t = c * 1.44269504088896341f;
    const int32_t n = static_cast<int32_t>(t + std::copysign(0.5f, t));  // round to nearest
    const float nf = static_cast<float>(n);
    const float r = (c - nf * 0.693359375f) + nf * 2.12194440e-4f;  // ln2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const int32_t bits = (n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return (p * r * r + r + 1.0f) * scale;
}

// e^v for every float v: results below the smallest normal float (v < -87.34) are flushed to 0,
// v > 88.72 gives inf, NaN stays NaN; near the top, e^v = e^(v-1) e keeps 2^n finite.
inline float exp_approx(float v) {
    const bool high = v > 88.0f;
    float e = exp_in_range(std::min(std::max(high ? v - 1.0f : v, -87.33654f), 88.0f));
    e = high ? e * 2.71828182845904524f : e;
    e = v < -87.33654f ? 0.0f : e;
    e = v > 88.72283f ? HUGE_VALF : e;
    return v != v ? v : e;
}

// 1 / (1 + e^-u) in float, twice as fast as through exp_approx: the clamp alone gives the limits.
// u > 87.3: e^-u about 1e-38, the sigmoid 1; u < -88: e^-u stays e^88, the sigmoid 6e-39 instead
// of less, so SiLU's u * sigmoid(u) is u * 6e-39 (-6e-37 at u = -100) where the exact value is
// nearer 0. A NaN passes through the clamp (std::max/min return their first argument then) and
// the polynomial.
inline float sigmoid_approx(float u) {
    return 1.0f / (1.0f + exp_in_range(std::min(std::max(-u, -87.33654f), 88.0f)));
}

inline double sigmoid_approx(double u) { return 1.0 / (1.0 + std::exp(-u)); }

// float64 keeps the library's exp: it is the precise path (gradient checks run in float64).
inline double exp_approx(double v) { return std::exp(v); }

// Geometry of a 2-D convolution over x (N, C, H, W) with zero padding; Ho, Wo the output size.
struct ConvGeometry {
    int64_t N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo;
};

// cols (N, C*kh*kw, Ho*Wo), row c*kh*kw + i*kw + j: cols[n, row, oh*Wo+ow] = xpad[n, c, oh*sh+i, ow*sw+j].
template <typename T>
void im2col(const T* x, T* cols, const ConvGeometry& g);

// The adjoint: x (N, C, H, W) = scatter-add of cols, padding dropped. Overwrites all of x.
template <typename T>
void col2im(const T* cols, T* x, const ConvGeometry& g);

// -- conv_direct.cpp: stride-1 convolution in float32, read in place (no columns) -------------

// y (N, O, Ho, Wo) = x (N, C, H, W) convolved with w (O, C, kh, kw) plus bias (O,) (or none:
// null), zero padding (ph, pw), stride (sh, sw): Ho = (H + 2ph - kh) / sh + 1 (>= 1), same for Wo.
void conv2d_direct(const float* x, const float* w, const float* bias, float* y, int64_t N, int64_t C,
                   int64_t H, int64_t W, int64_t O, int64_t kh, int64_t kw, int64_t ph, int64_t pw,
                   int64_t sh, int64_t sw);

// Its weight gradient: gw (O, C, kh, kw) from x (N, C, H, W) and gy (N, O, Ho, Wo).
void conv2d_direct_weight_grad(const float* x, const float* gy, float* gw, int64_t N, int64_t C,
                               int64_t H, int64_t W, int64_t O, int64_t kh, int64_t kw, int64_t ph,
                               int64_t pw, int64_t sh, int64_t sw);

// The instruction set the direct convolution runs with here: "avx512", "avx2" or "baseline".
const char* conv2d_direct_isa();

// Group norm over x (N, C, S): y, and mean, rstd (N, G). weight and bias may both be null.
template <typename T>
void group_norm_forward(const T* x, const T* weight, const T* bias, T* y, T* mean, T* rstd,
                        int64_t N, int64_t C, int64_t S, int64_t G, double eps);

// gx (N, C, S), and per-sample channel sums gw_part, gb_part (N, C) in double (the caller reduces
// them over N). weight may be null (meaning 1).
template <typename T>
void group_norm_backward(const T* gy, const T* x, const T* weight, const T* mean, const T* rstd,
                         T* gx, double* gw_part, double* gb_part,
                         int64_t N, int64_t C, int64_t S, int64_t G);

// Group norm + SiLU with an optional per-(sample, channel) shift of the input (N, C), one pass:
// u = group_norm(x + shift) * weight + bias, y = u * sigmoid(u). weight, bias, shift may be null
// (weight and bias both or neither). Statistics in double; the elementwise part in T.
template <typename T>
void group_norm_silu_forward(const T* x, const T* weight, const T* bias, const T* shift, T* y,
                             T* mean, T* rstd, int64_t N, int64_t C, int64_t S, int64_t G,
                             double eps);

// gx (N, C, S); per-sample channel sums gw_part, gb_part (N, C) in double (null without weight);
// gshift (N, C), the sum of gx over S (null without shift).
template <typename T>
void group_norm_silu_backward(const T* gy, const T* x, const T* weight, const T* bias,
                              const T* shift, const T* mean, const T* rstd, T* gx,
                              double* gw_part, double* gb_part, T* gshift, int64_t N, int64_t C,
                              int64_t S, int64_t G);

// -- attention.cpp: softmax along the rows of x (R, L), L >= 1 ---------------------------------

// y = softmax(scale * x) per row.
template <typename T>
void softmax_forward(const T* x, T scale, T* y, int64_t R, int64_t L, bool parallel);

// gx = y * (gy - sum(gy * y)) * scale per row (the sum in double).
template <typename T>
void softmax_backward(const T* gy, const T* y, T scale, T* gx, int64_t R, int64_t L, bool parallel);

// -- flash_attention.cpp: attention without the score matrix, float32 ---------------------------

// out (B, Lq, Dv) = softmax(scale * q k^T) v and lse (B, Lq), the log-sum-exp of each row's
// scaled scores, for q (B, Lq, D), k (B, Lk, D), v (B, Lk, Dv), Lk >= 1.
void attention_forward(const float* q, const float* k, const float* v, float scale, float* out,
                       float* lse, int64_t B, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv,
                       bool parallel);

// The instruction set it runs with here: "avx512", "avx2" or "baseline".
const char* attention_forward_isa();

// -- diffusion.cpp: elementwise kernels over flat arrays ---------------------------------------
// `parallel` says whether to split the work over OpenMP threads: the Python wrappers decide by
// size (waking the sleeping workers costs more than a small memory-bound pass takes).

// Elements per OpenMP task and per partial sum of squared_error_sum (CHUNK in
// minidiff/kernels/_cpu.py, which the loss sums of minidiff/kernels/loss.py use).
constexpr int64_t kChunk = 4096;

// out[n, k] = a[n] x0[n, k] + s[n] noise[n, k] over (N, M), with a[n] = T(sqrt_abar[t[n]]) and
// s[n] = T(sqrt_one_minus_abar[t[n]]) (rounded to T first). t must already lie in [0, T).
template <typename T>
void q_sample(const T* x0, const T* noise, const double* sqrt_abar,
              const double* sqrt_one_minus_abar, const int64_t* t, T* out, int64_t N, int64_t M,
              bool parallel);

// Sum of (pred - target)^2 in double over chunks of kChunk elements (each summed in vector
// lanes, an order fixed for a build and a CPU), the chunk sums added in order: the result does
// not depend on the number of threads.
template <typename T>
double squared_error_sum(const T* pred, const T* target, int64_t n, bool parallel);

// out = (pred - target) * scale, in T.
template <typename T>
void scaled_difference(const T* pred, const T* target, T scale, T* out, int64_t n, bool parallel);

}  // namespace minidiff

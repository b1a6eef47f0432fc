// Diffusion kernels on the CPU: q_sample and the MSE loss against the noise (forward sum and
// backward). Same semantics as the references in minidiff/kernels/diffusion.py (the loss: in
// minidiff/kernels/loss.py): coefficients
// rounded to T, then every product and sum in T, in the order of the formula.
//
// These are single memory-bound passes over small arrays, so two things matter: no OpenMP region
// unless asked for (`parallel`: waking the workers costs more than a small batch takes), and wide
// vectors. The build targets baseline x86-64 (SSE2); MINIDIFF_VECTOR_CLONES adds an AVX2 clone of
// each inner loop, picked at load time on CPUs that have it (AVX2 only: no FMA, so no fused
// multiply-add changes the rounding).
#include <vector>

#include "kernels.h"

namespace minidiff {

namespace {

template <typename T>
MINIDIFF_VECTOR_CLONES void q_sample_row(const T* __restrict x0, const T* __restrict noise, T a,
                                         T s, T* __restrict out, int64_t M) {
    for (int64_t k = 0; k < M; ++k) out[k] = a * x0[k] + s * noise[k];
}

// The float64 sum of squares of one chunk. `omp simd reduction` lets the compiler split the sum
// into vector lanes (an order fixed for a build and a CPU), as Numba's fastmath="reassoc" does;
// a build without OpenMP sums in plain order. The sum agrees with the reference to float64
// rounding, not to the bit (its order differs), so it may use AVX-512 lanes as well.
template <typename T>
MINIDIFF_WIDE_CLONES double squared_error_span(const T* __restrict pred,
                                                 const T* __restrict target, int64_t n) {
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; ++i) {
        const double d = double(pred[i]) - double(target[i]);
        total += d * d;
    }
    return total;
}

template <typename T>
MINIDIFF_VECTOR_CLONES void scaled_difference_span(const T* __restrict pred,
                                                   const T* __restrict target, T scale,
                                                   T* __restrict out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = (pred[i] - target[i]) * scale;
}

inline int64_t chunk_end(int64_t c, int64_t n) {
    return (c + 1) * kChunk < n ? (c + 1) * kChunk : n;
}

}  // namespace

template <typename T>
void q_sample(const T* x0, const T* noise, const double* sqrt_abar,
              const double* sqrt_one_minus_abar, const int64_t* t, T* out, int64_t N, int64_t M,
              bool parallel) {
    if (!parallel) {
        for (int64_t n = 0; n < N; ++n)
            q_sample_row(x0 + n * M, noise + n * M, T(sqrt_abar[t[n]]),
                         T(sqrt_one_minus_abar[t[n]]), out + n * M, M);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
        q_sample_row(x0 + n * M, noise + n * M, T(sqrt_abar[t[n]]), T(sqrt_one_minus_abar[t[n]]),
                     out + n * M, M);
}

template <typename T>
double squared_error_sum(const T* pred, const T* target, int64_t n, bool parallel) {
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks);
    if (parallel) {
#pragma omp parallel for schedule(static)
        for (int64_t c = 0; c < chunks; ++c)
            partial[c] =
                squared_error_span(pred + c * kChunk, target + c * kChunk, chunk_end(c, n) - c * kChunk);
    } else {
        for (int64_t c = 0; c < chunks; ++c)
            partial[c] =
                squared_error_span(pred + c * kChunk, target + c * kChunk, chunk_end(c, n) - c * kChunk);
    }
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[c];  // in order, whatever the threads
    return total;
}

template <typename T>
void scaled_difference(const T* pred, const T* target, T scale, T* out, int64_t n, bool parallel) {
    if (!parallel) {
        scaled_difference_span(pred, target, scale, out, n);
        return;
    }
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; ++c)
        scaled_difference_span(pred + c * kChunk, target + c * kChunk, scale, out + c * kChunk,
                               chunk_end(c, n) - c * kChunk);
}

template void q_sample<float>(const float*, const float*, const double*, const double*,
                              const int64_t*, float*, int64_t, int64_t, bool);
template void q_sample<double>(const double*, const double*, const double*, const double*,
                               const int64_t*, double*, int64_t, int64_t, bool);
template double squared_error_sum<float>(const float*, const float*, int64_t, bool);
template double squared_error_sum<double>(const double*, const double*, int64_t, bool);
template void scaled_difference<float>(const float*, const float*, float, float*, int64_t, bool);
template void scaled_difference<double>(const double*, const double*, double, double*, int64_t,
                                        bool);

}  // namespace minidiff

// Row softmax on the CPU (along the last axis), one OpenMP task per row. Same semantics as
// softmax_forward_reference / softmax_backward_reference in minidiff/kernels/attention.py; the
// exponentials in T (float32 through the vectorized exp_approx), the sums in double.
#include "kernels.h"

namespace minidiff {

namespace {

template <typename T>
MINIDIFF_WIDE_CLONES void softmax_row(const T* __restrict x, T scale, T* __restrict y, int64_t L) {
    T top = scale * x[0];  // the max of scale * x: scale may be negative
#pragma omp simd reduction(max : top)
    for (int64_t k = 1; k < L; ++k) top = std::max(top, scale * x[k]);
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t k = 0; k < L; ++k) {
        const T e = exp_approx(scale * x[k] - top);
        y[k] = e;
        total += double(e);
    }
    const T inv = T(1.0 / total);
#pragma omp simd
    for (int64_t k = 0; k < L; ++k) y[k] *= inv;
}

template <typename T>
MINIDIFF_WIDE_CLONES void softmax_grad_row(const T* __restrict gy, const T* __restrict y, T scale,
                                             T* __restrict gx, int64_t L) {
    double dot = 0.0;
#pragma omp simd reduction(+ : dot)
    for (int64_t k = 0; k < L; ++k) dot += double(gy[k]) * double(y[k]);
    const T d = T(dot);
#pragma omp simd
    for (int64_t k = 0; k < L; ++k) gx[k] = y[k] * (gy[k] - d) * scale;
}

}  // namespace

template <typename T>
void softmax_forward(const T* x, T scale, T* y, int64_t R, int64_t L, bool parallel) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < R; ++r) softmax_row(x + r * L, scale, y + r * L, L);
}

template <typename T>
void softmax_backward(const T* gy, const T* y, T scale, T* gx, int64_t R, int64_t L, bool parallel) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < R; ++r) softmax_grad_row(gy + r * L, y + r * L, scale, gx + r * L, L);
}

template void softmax_forward<float>(const float*, float, float*, int64_t, int64_t, bool);
template void softmax_forward<double>(const double*, double, double*, int64_t, int64_t, bool);
template void softmax_backward<float>(const float*, const float*, float, float*, int64_t, int64_t, bool);
template void softmax_backward<double>(const double*, const double*, double, double*, int64_t, int64_t,
                                       bool);

}  // namespace minidiff

// Group norm on the CPU, optionally fused with SiLU and a per-(sample, channel) shift of the
// input. One OpenMP task per (sample, group); a group (cpg * S values) stays in the cache between
// the passes, so the data is read from memory about once. The statistics and the sums of the
// backward are in double; the elementwise part runs in T, in vector lanes (SiLU through
// sigmoid_approx). Same semantics as the references in minidiff/kernels/norm.py.
#include <cmath>

#include "kernels.h"

namespace minidiff {

namespace {

template <typename T>
MINIDIFF_WIDE_CLONES double row_sum(const T* __restrict x, int64_t S) {
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < S; ++s) total += double(x[s]);
    return total;
}

template <typename T>
MINIDIFF_WIDE_CLONES double row_squared_deviation(const T* __restrict x, double center, int64_t S) {
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < S; ++s) {
        const double d = double(x[s]) - center;
        total += d * d;
    }
    return total;
}

// y = u = xhat * w + b with xhat = (x - center) * r, or silu(u): one channel's row. The double
// center comes as center_hi + center_lo (each a T): center rounded to T is off by up to half an
// ulp of |center|, much against the deviations when |mean| >> std, and x - center_hi is exact
// for the values near the center, so subtracting center_lo too keeps xhat accurate.
template <typename T, bool Silu>
MINIDIFF_WIDE_CLONES void norm_row(const T* __restrict x, T center_hi, T center_lo, T r, T w, T b,
                                   T* __restrict y, int64_t S) {
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
        const T u = ((x[s] - center_hi) - center_lo) * r * w + b;
        y[s] = Silu ? u * sigmoid_approx(u) : u;
    }
}

// gu = d loss / du (gy itself, or gy * silu'(u)) into gu; the row's sums of gu * xhat and of gu
// (in double) into sum_gu_xhat and sum_gu.
template <typename T, bool Silu>
MINIDIFF_WIDE_CLONES void upstream_grad_row(const T* __restrict gy, const T* __restrict x, T center,
                                            T r, T w, T b, T* __restrict gu, int64_t S,
                                            double* sum_gu_xhat, double* sum_gu) {
    double sgx = 0.0, sg = 0.0;
#pragma omp simd reduction(+ : sgx, sg)
    for (int64_t s = 0; s < S; ++s) {
        const T xhat = (x[s] - center) * r;
        T g = gy[s];
        if (Silu) {
            const T u = xhat * w + b;
            const T sig = sigmoid_approx(u);
            g = g * sig * (T(1) + u * (T(1) - sig));
        }
        gu[s] = g;
        sgx += double(g) * double(xhat);
        sg += double(g);
    }
    *sum_gu_xhat = sgx;
    *sum_gu = sg;
}

// gx = r ((gu w - mean_d) - xhat mean_dxhat) in place of gu (the group norm backward), in the
// reference's order: the difference is taken before the scaling by r, so its rounding is not
// amplified by r (which is large for a group of nearly equal values). Without contraction into
// fused multiply-adds: gu w - mean_d must be the difference of two rounded values (0 for a group
// of one value, as in the reference), not the product's own rounding error. Returns the row's sum.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
MINIDIFF_WIDE_CLONES double norm_grad_row(T* __restrict g, const T* __restrict x, T center, T r, T w,
                                          T mean_d, T mean_dxhat, int64_t S) {
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < S; ++s) {
        const T xhat = (x[s] - center) * r;
        const T v = r * ((g[s] * w - mean_d) - xhat * mean_dxhat);
        g[s] = v;
        total += double(v);
    }
    return total;
}
#pragma GCC pop_options

}  // namespace

// z = x + shift (shift (N, C) or null); u = group_norm(z) * weight + bias; y = silu(u) or u.
template <typename T, bool Silu>
void norm_forward(const T* x, const T* weight, const T* bias, const T* shift, T* y, T* mean,
                  T* rstd, int64_t N, int64_t C, int64_t S, int64_t G, double eps) {
    const int64_t cpg = C / G;
    const double m = static_cast<double>(cpg * S);
#pragma omp parallel for schedule(static)
    for (int64_t ng = 0; ng < N * G; ++ng) {
        const int64_t n = ng / G, c0 = (ng % G) * cpg;
        const T* xg = x + (n * C + c0) * S;  // the group's channels are contiguous
        T* yg = y + (n * C + c0) * S;
        const T* sh = shift ? shift + n * C + c0 : nullptr;
        double total = 0.0;
        for (int64_t cl = 0; cl < cpg; ++cl)
            total += row_sum(xg + cl * S, S) + (sh ? S * double(sh[cl]) : 0.0);
        const double mu = total / m;
        double sq = 0.0;  // second pass: no cancellation when |mean| >> std
        for (int64_t cl = 0; cl < cpg; ++cl)
            sq += row_squared_deviation(xg + cl * S, mu - (sh ? double(sh[cl]) : 0.0), S);
        const double r = 1.0 / std::sqrt(sq / m + eps);
        mean[ng] = T(mu);
        rstd[ng] = T(r);
        for (int64_t cl = 0; cl < cpg; ++cl) {
            const double center = mu - (sh ? double(sh[cl]) : 0.0);  // xhat = (x - center) * r
            const T w = weight ? weight[c0 + cl] : T(1), b = bias ? bias[c0 + cl] : T(0);
            const T center_hi = T(center);
            norm_row<T, Silu>(xg + cl * S, center_hi, T(center - double(center_hi)), T(r), w, b,
                              yg + cl * S, S);
        }
    }
}

template <typename T, bool Silu>
void norm_backward(const T* gy, const T* x, const T* weight, const T* bias, const T* shift,
                   const T* mean, const T* rstd, T* gx, double* gw_part, double* gb_part, T* gshift,
                   int64_t N, int64_t C, int64_t S, int64_t G) {
    const int64_t cpg = C / G;
    const double m = static_cast<double>(cpg * S);
#pragma omp parallel for schedule(static)
    for (int64_t ng = 0; ng < N * G; ++ng) {
        const int64_t n = ng / G, c0 = (ng % G) * cpg;
        const int64_t offset = (n * C + c0) * S;
        const T *xg = x + offset, *gyg = gy + offset;
        T* gxg = gx + offset;
        const T* sh = shift ? shift + n * C + c0 : nullptr;
        const double mu = mean[ng], r = rstd[ng];
        // First pass: gu = dloss/du into gx, and the sums of d = gu*w and d*xhat over the group.
        double sum_d = 0.0, sum_dxhat = 0.0;
        for (int64_t cl = 0; cl < cpg; ++cl) {
            const int64_t c = c0 + cl;
            const T w = weight ? weight[c] : T(1), b = bias ? bias[c] : T(0);
            const T center = T(mu - (sh ? double(sh[cl]) : 0.0));
            double gw, gb;
            upstream_grad_row<T, Silu>(gyg + cl * S, xg + cl * S, center, T(r), w, b, gxg + cl * S, S,
                                       &gw, &gb);
            if (gw_part) {
                gw_part[n * C + c] = gw;
                gb_part[n * C + c] = gb;
            }
            sum_d += gb * double(w);
            sum_dxhat += gw * double(w);
        }
        // Second pass: gx = r (gu w - mean(d) - xhat mean(d xhat)).
        const double mean_d = sum_d / m, mean_dxhat = sum_dxhat / m;
        for (int64_t cl = 0; cl < cpg; ++cl) {
            const int64_t c = c0 + cl;
            const T w = weight ? weight[c] : T(1);
            const T center = T(mu - (sh ? double(sh[cl]) : 0.0));
            const double total = norm_grad_row(gxg + cl * S, xg + cl * S, center, T(r), w, T(mean_d),
                                               T(mean_dxhat), S);
            if (gshift) gshift[n * C + c] = T(total);
        }
    }
}

template <typename T>
void group_norm_forward(const T* x, const T* weight, const T* bias, T* y, T* mean, T* rstd,
                        int64_t N, int64_t C, int64_t S, int64_t G, double eps) {
    norm_forward<T, false>(x, weight, bias, nullptr, y, mean, rstd, N, C, S, G, eps);
}

template <typename T>
void group_norm_backward(const T* gy, const T* x, const T* weight, const T* mean, const T* rstd,
                         T* gx, double* gw_part, double* gb_part, int64_t N, int64_t C, int64_t S,
                         int64_t G) {
    norm_backward<T, false>(gy, x, weight, nullptr, nullptr, mean, rstd, gx, gw_part, gb_part,
                            nullptr, N, C, S, G);
}

template <typename T>
void group_norm_silu_forward(const T* x, const T* weight, const T* bias, const T* shift, T* y,
                             T* mean, T* rstd, int64_t N, int64_t C, int64_t S, int64_t G,
                             double eps) {
    norm_forward<T, true>(x, weight, bias, shift, y, mean, rstd, N, C, S, G, eps);
}

template <typename T>
void group_norm_silu_backward(const T* gy, const T* x, const T* weight, const T* bias,
                              const T* shift, const T* mean, const T* rstd, T* gx,
                              double* gw_part, double* gb_part, T* gshift, int64_t N, int64_t C,
                              int64_t S, int64_t G) {
    norm_backward<T, true>(gy, x, weight, bias, shift, mean, rstd, gx, gw_part, gb_part, gshift, N,
                           C, S, G);
}

template void group_norm_forward<float>(const float*, const float*, const float*, float*, float*,
                                        float*, int64_t, int64_t, int64_t, int64_t, double);
template void group_norm_forward<double>(const double*, const double*, const double*, double*,
                                         double*, double*, int64_t, int64_t, int64_t, int64_t, double);
template void group_norm_backward<float>(const float*, const float*, const float*, const float*,
                                         const float*, float*, double*, double*, int64_t, int64_t,
                                         int64_t, int64_t);
template void group_norm_backward<double>(const double*, const double*, const double*,
                                          const double*, const double*, double*, double*, double*,
                                          int64_t, int64_t, int64_t, int64_t);

template void group_norm_silu_forward<float>(const float*, const float*, const float*, const float*,
                                             float*, float*, float*, int64_t, int64_t, int64_t,
                                             int64_t, double);
template void group_norm_silu_forward<double>(const double*, const double*, const double*,
                                              const double*, double*, double*, double*, int64_t,
                                              int64_t, int64_t, int64_t, double);
template void group_norm_silu_backward<float>(const float*, const float*, const float*, const float*,
                                              const float*, const float*, const float*, float*,
                                              double*, double*, float*, int64_t, int64_t, int64_t,
                                              int64_t);
template void group_norm_silu_backward<double>(const double*, const double*, const double*,
                                               const double*, const double*, const double*,
                                               const double*, double*, double*, double*, double*,
                                               int64_t, int64_t, int64_t, int64_t);

}  // namespace minidiff

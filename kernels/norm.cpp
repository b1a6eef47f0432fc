// Group norm on the CPU, one OpenMP task per (sample, group); statistics in double.
// Same semantics as group_norm_forward_reference / group_norm_backward_reference.
#include <cmath>

#include "kernels.h"

namespace minidiff {

template <typename T>
void group_norm_forward(const T* x, const T* weight, const T* bias, T* y, T* mean, T* rstd,
                        int64_t N, int64_t C, int64_t S, int64_t G, double eps) {
    const int64_t cpg = C / G, M = cpg * S;
    const double m = static_cast<double>(M);
#pragma omp parallel for schedule(static)
    for (int64_t ng = 0; ng < N * G; ++ng) {
        const int64_t n = ng / G, g = ng % G;
        const T* xg = x + (n * C + g * cpg) * S;  // the group's channels are contiguous
        T* yg = y + (n * C + g * cpg) * S;
        double total = 0.0;
        for (int64_t k = 0; k < M; ++k) total += xg[k];
        const double mu = total / m;
        double sq = 0.0;  // second pass: no cancellation when |mean| >> std
        for (int64_t k = 0; k < M; ++k) {
            const double d = xg[k] - mu;
            sq += d * d;
        }
        const double r = 1.0 / std::sqrt(sq / m + eps);
        mean[ng] = T(mu);
        rstd[ng] = T(r);
        for (int64_t cl = 0; cl < cpg; ++cl) {
            const int64_t c = g * cpg + cl;
            const double a = weight ? r * weight[c] : r;
            const double b = bias ? double(bias[c]) : 0.0;
            for (int64_t s = 0; s < S; ++s) yg[cl * S + s] = T((xg[cl * S + s] - mu) * a + b);
        }
    }
}

template <typename T>
void group_norm_backward(const T* gy, const T* x, const T* weight, const T* mean, const T* rstd,
                         T* gx, double* gw_part, double* gb_part,
                         int64_t N, int64_t C, int64_t S, int64_t G) {
    const int64_t cpg = C / G;
    const double m = static_cast<double>(cpg * S);
#pragma omp parallel for schedule(static)
    for (int64_t ng = 0; ng < N * G; ++ng) {
        const int64_t n = ng / G, g = ng % G;
        const int64_t offset = (n * C + g * cpg) * S;
        const T *xg = x + offset, *gyg = gy + offset;
        T* gxg = gx + offset;
        const double mu = mean[ng], r = rstd[ng];
        double sum_d = 0.0, sum_dxhat = 0.0;  // sums over the group of d = gy*w and d*xhat
        for (int64_t cl = 0; cl < cpg; ++cl) {
            const int64_t c = g * cpg + cl;
            double gw = 0.0, gb = 0.0;
            for (int64_t s = 0; s < S; ++s) {
                const double xhat = (xg[cl * S + s] - mu) * r;
                gw += gyg[cl * S + s] * xhat;
                gb += gyg[cl * S + s];
            }
            if (gw_part) {
                gw_part[n * C + c] = gw;
                gb_part[n * C + c] = gb;
            }
            const double w = weight ? double(weight[c]) : 1.0;
            sum_d += gb * w;
            sum_dxhat += gw * w;
        }
        const double mean_d = sum_d / m, mean_dxhat = sum_dxhat / m;
        for (int64_t cl = 0; cl < cpg; ++cl) {
            const int64_t c = g * cpg + cl;
            const double w = weight ? double(weight[c]) : 1.0;
            for (int64_t s = 0; s < S; ++s) {
                const double xhat = (xg[cl * S + s] - mu) * r;
                gxg[cl * S + s] = T(r * (gyg[cl * S + s] * w - mean_d - xhat * mean_dxhat));
            }
        }
    }
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

}  // namespace minidiff

// im2col / col2im on the CPU, one OpenMP task per (sample, channel).
#include "kernels.h"

namespace minidiff {

// The output columns ow whose input column ow*sw - pw + j lies inside [0, W): [lo, hi).
// Computing the range once per row keeps the inner loops free of bounds checks, so the
// compiler can vectorize them (stride 1 becomes a plain copy).
inline void valid_columns(const ConvGeometry& g, int64_t j, int64_t& lo, int64_t& hi) {
    const int64_t first = g.pw - j;  // ow * sw >= pw - j
    lo = first > 0 ? (first + g.sw - 1) / g.sw : 0;
    const int64_t last = g.W - 1 + g.pw - j;  // ow * sw <= W - 1 + pw - j
    hi = last < 0 ? 0 : last / g.sw + 1;
    if (hi > g.Wo) hi = g.Wo;
    if (lo > hi) lo = hi;
}

template <typename T>
void im2col(const T* x, T* cols, const ConvGeometry& g) {
    const int64_t K = g.kh * g.kw, L = g.Ho * g.Wo;
#pragma omp parallel for schedule(static)
    for (int64_t nc = 0; nc < g.N * g.C; ++nc) {  // (n, c) owns rows c*K ... c*K+K-1 of cols[n]
        const int64_t n = nc / g.C, c = nc % g.C;
        const T* xc = x + nc * g.H * g.W;
        T* out = cols + (n * g.C * K + c * K) * L;
        for (int64_t i = 0; i < g.kh; ++i) {
            for (int64_t j = 0; j < g.kw; ++j, out += L) {
                int64_t lo, hi;
                valid_columns(g, j, lo, hi);
                for (int64_t oh = 0; oh < g.Ho; ++oh) {
                    const int64_t h = oh * g.sh - g.ph + i;
                    T* row = out + oh * g.Wo;
                    if (h < 0 || h >= g.H) {
                        for (int64_t ow = 0; ow < g.Wo; ++ow) row[ow] = T(0);
                        continue;
                    }
                    const T* src = xc + h * g.W - g.pw + j;  // src[ow * sw] = x[h, ow*sw - pw + j]
                    for (int64_t ow = 0; ow < lo; ++ow) row[ow] = T(0);
                    if (g.sw == 1) {
                        for (int64_t ow = lo; ow < hi; ++ow) row[ow] = src[ow];
                    } else {
                        for (int64_t ow = lo; ow < hi; ++ow) row[ow] = src[ow * g.sw];
                    }
                    for (int64_t ow = hi; ow < g.Wo; ++ow) row[ow] = T(0);
                }
            }
        }
    }
}

template <typename T>
void col2im(const T* cols, T* x, const ConvGeometry& g) {
    const int64_t K = g.kh * g.kw, L = g.Ho * g.Wo;
#pragma omp parallel for schedule(static)
    for (int64_t nc = 0; nc < g.N * g.C; ++nc) {  // (n, c) writes only x[n, c]: no races
        const int64_t n = nc / g.C, c = nc % g.C;
        T* xc = x + nc * g.H * g.W;
        for (int64_t p = 0; p < g.H * g.W; ++p) xc[p] = T(0);
        const T* in = cols + (n * g.C * K + c * K) * L;
        for (int64_t i = 0; i < g.kh; ++i) {
            for (int64_t j = 0; j < g.kw; ++j, in += L) {
                int64_t lo, hi;
                valid_columns(g, j, lo, hi);
                for (int64_t oh = 0; oh < g.Ho; ++oh) {
                    const int64_t h = oh * g.sh - g.ph + i;
                    if (h < 0 || h >= g.H) continue;
                    const T* row = in + oh * g.Wo;
                    T* dst = xc + h * g.W - g.pw + j;  // dst[ow * sw] = x[h, ow*sw - pw + j]
                    if (g.sw == 1) {
                        for (int64_t ow = lo; ow < hi; ++ow) dst[ow] += row[ow];
                    } else {
                        for (int64_t ow = lo; ow < hi; ++ow) dst[ow * g.sw] += row[ow];
                    }
                }
            }
        }
    }
}

template void im2col<float>(const float*, float*, const ConvGeometry&);
template void im2col<double>(const double*, double*, const ConvGeometry&);
template void col2im<float>(const float*, float*, const ConvGeometry&);
template void col2im<double>(const double*, double*, const ConvGeometry&);

}  // namespace minidiff

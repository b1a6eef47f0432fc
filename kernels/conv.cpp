// im2col / col2im on the CPU, one OpenMP task per (sample, channel).
#include "kernels.h"

namespace minidiff {

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
                for (int64_t oh = 0; oh < g.Ho; ++oh) {
                    const int64_t h = oh * g.sh - g.ph + i;
                    T* row = out + oh * g.Wo;
                    if (h < 0 || h >= g.H) {
                        for (int64_t ow = 0; ow < g.Wo; ++ow) row[ow] = T(0);
                        continue;
                    }
                    for (int64_t ow = 0; ow < g.Wo; ++ow) {
                        const int64_t w = ow * g.sw - g.pw + j;
                        row[ow] = (w >= 0 && w < g.W) ? xc[h * g.W + w] : T(0);
                    }
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
                for (int64_t oh = 0; oh < g.Ho; ++oh) {
                    const int64_t h = oh * g.sh - g.ph + i;
                    if (h < 0 || h >= g.H) continue;
                    const T* row = in + oh * g.Wo;
                    for (int64_t ow = 0; ow < g.Wo; ++ow) {
                        const int64_t w = ow * g.sw - g.pw + j;
                        if (w >= 0 && w < g.W) xc[h * g.W + w] += row[ow];
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

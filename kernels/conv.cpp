// im2col / col2im on the CPU, one OpenMP task per (sample, channel).
#include <algorithm>

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

// A "same" convolution at stride 1 (Ho = H, Wo = W): row (i, j) of the columns is the whole
// plane shifted by (i - ph) rows and (j - pw) columns, so one contiguous copy of the flattened
// plane fills it, and only what wrapped around a border is zeroed after. Many short row copies
// become one long one (the 8x8 and 16x16 planes of a U-Net have rows of 8 and 16 values).
template <typename T>
void im2col_same_plane(const T* xc, T* out, const ConvGeometry& g) {
    const int64_t H = g.H, W = g.W, L = H * W;
    for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j, out += L) {
            const int64_t dh = i - g.ph, dw = j - g.pw;
            const int64_t shift = dh * W + dw;  // out[q] = x[q + shift] where valid
            const int64_t row_lo = std::max<int64_t>(0, -dh), row_hi = std::min<int64_t>(H, H - dh);
            if (row_lo >= row_hi) {
                std::fill(out, out + L, T(0));
                continue;
            }
            const int64_t q_lo = row_lo * W, q_hi = row_hi * W;
            std::fill(out, out + q_lo, T(0));
            // the copied range may start or end dw values outside the plane (only at its ends)
            const int64_t src_lo = std::max<int64_t>(q_lo, -shift);
            const int64_t src_hi = std::min<int64_t>(q_hi, L - shift);
            std::fill(out + q_lo, out + src_lo, T(0));
            std::copy(xc + src_lo + shift, xc + src_hi + shift, out + src_lo);
            std::fill(out + src_hi, out + q_hi, T(0));
            std::fill(out + q_hi, out + L, T(0));
            // values that wrapped across a row end belong to padding: columns [0, -dw) or [W-dw, W)
            if (dw != 0) {
                const int64_t c_lo = dw < 0 ? 0 : W - dw, c_hi = dw < 0 ? -dw : W;
                for (int64_t r = row_lo; r < row_hi; ++r)
                    for (int64_t ow = c_lo; ow < c_hi; ++ow) out[r * W + ow] = T(0);
            }
        }
    }
}

template <typename T>
void im2col(const T* x, T* cols, const ConvGeometry& g) {
    const int64_t K = g.kh * g.kw, L = g.Ho * g.Wo;
    const bool same = g.sh == 1 && g.sw == 1 && g.Ho == g.H && g.Wo == g.W && g.pw < g.W;
#pragma omp parallel for schedule(static)
    for (int64_t nc = 0; nc < g.N * g.C; ++nc) {  // (n, c) owns rows c*K ... c*K+K-1 of cols[n]
        const int64_t n = nc / g.C, c = nc % g.C;
        const T* xc = x + nc * g.H * g.W;
        T* out = cols + (n * g.C * K + c * K) * L;
        if (same) {
            im2col_same_plane(xc, out, g);
            continue;
        }
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

// Plain C++ kernels of the optional extension minidiff._native (bound in module.cpp).
// Arrays are C-contiguous and already checked by the Python wrappers in minidiff/kernels/.
#pragma once

#include <cstdint>

namespace minidiff {

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

}  // namespace minidiff

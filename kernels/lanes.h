// Vectors of VW floats as GCC vector types, and their unaligned loads and stores: what the
// register-tiled kernels (conv_direct.cpp, flash_attention.cpp) are written in. Each kernel is
// compiled for several widths (AVX-512: 16, AVX2: 8, baseline: 4) and picks one at load time.
#pragma once

#include <cstring>

// The helpers pass vectors by value; they are always inlined into a function compiled for the
// vectors' width, so the ABI note about wide vectors in baseline code does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#define MINIDIFF_INLINE inline __attribute__((always_inline))

namespace minidiff {

template <int VW>
struct Lanes {
    typedef float type __attribute__((vector_size(VW * sizeof(float))));
};

template <int VW>
MINIDIFF_INLINE typename Lanes<VW>::type load(const float* p) {
    typename Lanes<VW>::type v;
    std::memcpy(&v, p, sizeof v);  // an unaligned vector load
    return v;
}

template <int VW>
MINIDIFF_INLINE void store(float* p, typename Lanes<VW>::type v) {
    std::memcpy(p, &v, sizeof v);
}

}  // namespace minidiff

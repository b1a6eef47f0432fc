// Direct 2-D convolution in float32: no columns, the input is read in place.
//
// The trick is a flat padded plane. xpad[c] is x[c] zero-padded and flattened with a row stride
// S = W + gap (plus zeroed rows above and below, and a zeroed tail): the zeros after one row's
// data are the right padding of that row and the left padding of the next, so gap = pw is
// enough (more only when pw >= kw). At the flat output position q = oy*S + ox, kernel tap
// t = (i, j) reads xpad[c, q + shift_t] with shift_t = i*S + j, one constant per tap:
//
//     y[o, q] = sum_c sum_t w[o, c, t] * xpad[c, q + shift_t]
//
// This is the convolution wherever ox < Wo. The S - Wo positions per row with ox >= Wo read
// across the row end and are dropped: the price of inner loops with no borders at all (1/33 of
// the work for a 32-wide image with a 3x3 kernel, 1/9 for an 8-wide one). So a run of VW
// consecutive outputs of one channel is a plain vector load of the input per tap, whatever the
// image width.
//
// A register tile puts the vector lanes on one of two axes:
//  - positions: OB output channels x PV vectors of positions; per (c, tap), PV loads and OB
//    broadcast weights feed OB*PV fused multiply-adds. The last tile of a plane has only the
//    vectors it needs. Stride 1 only, any O.
//  - output channels, where O is a multiple of the vector width or the stride is not 1: R kept
//    positions x V vectors of channels; per (c, tap), R broadcasts of the input and V loads of
//    the transposed weight (see "The forward pass with the lanes on output channels" below).
//    Nothing is dropped; at stride s the position (oy, ox) reads from oy*s*S + ox*s on.
// The accumulators start from the bias. The input gradient of a stride-1 convolution is the same
// computation (gy convolved with the kernel flipped, padded k - 1 - p; minidiff/ops/conv.py
// splits a strided one into stride-1 ones, one per phase). The weight gradient (below) uses the
// channels-as-lanes tile with the sum running over positions instead.
//
// The readable reference is im2col followed by a matrix product (minidiff/kernels/conv.py).
// Each tile is compiled for AVX-512, AVX2 and baseline vectors; the CPU picks one at load time.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "lanes.h"

namespace minidiff {
namespace {

// Zeroed floats after each padded plane: the last vector of a plane reads up to 15 positions
// past the outputs, plus the kernel width and the padding below.
constexpr int64_t kTailFloats = 32;

struct FlatGeometry {
    int64_t C, H, W, O, kh, kw, ph, pw, sh, sw;
    int64_t Hp, S, Ho, Wo;
    int64_t taps;     // kh * kw
    int64_t outputs;  // Ho * S flat output positions per plane, dropped columns included
    int64_t plane;    // floats per padded input plane, tail included (a multiple of 16)
    std::vector<int64_t> shift;

    FlatGeometry(int64_t C_, int64_t H_, int64_t W_, int64_t O_, int64_t kh_, int64_t kw_,
                 int64_t ph_, int64_t pw_, int64_t sh_ = 1, int64_t sw_ = 1)
        : C(C_), H(H_), W(W_), O(O_), kh(kh_), kw(kw_), ph(ph_), pw(pw_), sh(sh_), sw(sw_) {
        Hp = H + 2 * ph;
        Ho = (Hp - kh) / sh + 1;
        Wo = (W + 2 * pw - kw) / sw + 1;
        // Row r's last read is at most column W + 2pw - 1 of the padded row, which must be a
        // zero before row r+1's data: gap >= pw. And at stride 1 the Wo outputs must fit in a
        // row (the positions-as-lanes tile computes whole rows of S).
        S = W + std::max(pw, 2 * pw - kw + 1);
        taps = kh * kw;
        outputs = Ho * S;
        plane = (Hp * S + pw + kw + kTailFloats + 15) / 16 * 16;
        for (int64_t i = 0; i < kh; ++i)
            for (int64_t j = 0; j < kw; ++j) shift.push_back(i * S + j);
    }
};

// x[c] (H, W) -> its flat padded plane: ph zero rows and pw zeros, then each row's data
// followed by S - W zeros, then zeros to the end of the plane.
void pad_plane(const float* src, float* dst, const FlatGeometry& g) {
    float* row = dst + g.ph * g.S + g.pw;
    std::fill(dst, row, 0.0f);
    for (int64_t h = 0; h < g.H; ++h, row += g.S, src += g.W) {
        std::memcpy(row, src, g.W * sizeof(float));
        std::fill(row + g.W, row + g.S, 0.0f);
    }
    std::fill(row, dst + g.plane, 0.0f);
}

// Sample n of x (N, C, H, W) -> its C flat padded planes in xpad.
void pad_sample(const float* x, int64_t n, float* xpad, const FlatGeometry& g) {
    for (int64_t c = 0; c < g.C; ++c) pad_plane(x + (n * g.C + c) * g.H * g.W, xpad + c * g.plane, g);
}

// Output channels come in blocks of OB (the forward tile's height), then single channels for
// the remainder. packed[o0*C*T + (c*T + t)*b + k] = w[o0 + k, c, t] for the block [o0, o0 + b):
// a tile's OB weights for one (c, tap) lie side by side.
std::vector<float> pack_weight(const float* w, const FlatGeometry& g, int64_t OB) {
    const int64_t C = g.C, T = g.taps, full = g.O / OB * OB;
    std::vector<float> packed(g.O * C * T);
    for (int64_t o0 = 0; o0 < g.O; o0 += (o0 < full ? OB : 1)) {
        const int64_t b = o0 < full ? OB : 1;
        for (int64_t k = 0; k < b; ++k)
            for (int64_t c = 0; c < C; ++c)
                for (int64_t t = 0; t < T; ++t)
                    packed[o0 * C * T + (c * T + t) * b + k] = w[((o0 + k) * C + c) * T + t];
    }
    return packed;
}

// Copy the kept outputs of flat positions [p0, p1) of one channel from buf to y (Ho, Wo).
MINIDIFF_INLINE void store_kept(const float* buf, int64_t p0, int64_t p1, float* y,
                                const FlatGeometry& g) {
    for (int64_t q = p0; q < p1;) {
        const int64_t oy = q / g.S, ox = q - oy * g.S;
        if (ox < g.Wo) {
            const int64_t end = std::min(p1, oy * g.S + g.Wo);
            std::memcpy(y + oy * g.Wo + ox, buf + (q - p0), (end - q) * sizeof(float));
        }
        q = (oy + 1) * g.S;
    }
}

// y[o0 .. o0+OB, positions p0 .. p0 + PV*VW) of one sample, from its padded planes xpad;
// bias: the block's OB biases, or null.
template <int VW, int OB, int PV>
MINIDIFF_INLINE void forward_tile(const float* xpad, const float* wblock, const float* bias,
                                  int64_t p0, float* y, const FlatGeometry& g) {
    typedef typename Lanes<VW>::type V;
    V acc[OB][PV];
    for (int o = 0; o < OB; ++o) {
        const V start = (bias ? bias[o] : 0.0f) - V{};
        for (int v = 0; v < PV; ++v) acc[o][v] = start;
    }
    const int64_t T = g.taps;
    const int64_t* shift = g.shift.data();
    for (int64_t c = 0; c < g.C; ++c) {
        const float* xc = xpad + c * g.plane + p0;
        const float* wc = wblock + c * T * OB;
        for (int64_t t = 0; t < T; ++t) {
            const float* src = xc + shift[t];
            V xv[PV];
#pragma GCC unroll 8
            for (int v = 0; v < PV; ++v) xv[v] = load<VW>(src + v * VW);
#pragma GCC unroll 8
            for (int o = 0; o < OB; ++o) {
                const V wv = wc[t * OB + o] - V{};  // a broadcast: s - 0 is s, also for -0
#pragma GCC unroll 8
                for (int v = 0; v < PV; ++v) acc[o][v] += wv * xv[v];
            }
        }
    }
    const int64_t p1 = std::min(g.outputs, p0 + PV * VW);
    if (g.S == g.Wo && p1 == p0 + PV * VW) {  // no dropped columns (a 1x1 kernel): y is the flat plane
        for (int o = 0; o < OB; ++o) std::memcpy(y + o * g.Ho * g.Wo + p0, acc[o], sizeof acc[o]);
        return;
    }
    alignas(64) float buf[PV * VW];
    for (int o = 0; o < OB; ++o) {
        std::memcpy(buf, acc[o], sizeof buf);
        store_kept(buf, p0, p1, y + o * g.Ho * g.Wo, g);
    }
}

// All positions of OB output channels: tiles of PV vectors, then one of the vectors left.
template <int VW, int OB, int PV>
MINIDIFF_INLINE void forward_channels(const float* xpad, const float* wblock, const float* bias,
                                      float* y, const FlatGeometry& g) {
    int64_t p0 = 0;
    for (; p0 + PV * VW <= g.outputs; p0 += PV * VW) forward_tile<VW, OB, PV>(xpad, wblock, bias, p0, y, g);
    const int64_t left = (g.outputs - p0 + VW - 1) / VW;  // 0 to PV vectors
    static_assert(PV <= 5, "the remainder switch covers up to 5 vectors");
    switch (left) {
        case 1: forward_tile<VW, OB, 1>(xpad, wblock, bias, p0, y, g); break;
        case 2: if constexpr (PV >= 2) forward_tile<VW, OB, 2>(xpad, wblock, bias, p0, y, g); break;
        case 3: if constexpr (PV >= 3) forward_tile<VW, OB, 3>(xpad, wblock, bias, p0, y, g); break;
        case 4: if constexpr (PV >= 4) forward_tile<VW, OB, 4>(xpad, wblock, bias, p0, y, g); break;
        case 5: if constexpr (PV >= 5) forward_tile<VW, OB, 5>(xpad, wblock, bias, p0, y, g); break;
    }
}

// Output channels [o_lo, o_hi) of sample n, from its padded planes xpad.
template <int VW, int OB, int PV>
MINIDIFF_INLINE void forward_task(const float* packed, const float* bias, float* y, const FlatGeometry& g,
                                  int64_t n, int64_t o_lo, int64_t o_hi, const float* xpad) {
    float* yn = y + n * g.O * g.Ho * g.Wo;
    const int64_t CT = g.C * g.taps, full = g.O / OB * OB, plane = g.Ho * g.Wo;
    int64_t o = o_lo;
    for (; o + OB <= std::min(o_hi, full); o += OB)
        forward_channels<VW, OB, PV>(xpad, packed + o * CT, bias ? bias + o : nullptr, yn + o * plane, g);
    for (; o < o_hi; ++o)  // the remainder, one channel at a time
        forward_channels<VW, 1, PV>(xpad, packed + o * CT, bias ? bias + o : nullptr, yn + o * plane, g);
}

// -- The weight gradient ----------------------------------------------------------------------
//
//     gw[o, c, t] = sum_n sum_{oy < Ho, ox < Wo} gy[n, o, oy, ox] * xpad[n, c, oy*sh*S + ox*sw + shift_t]
//
// a matrix product (O x positions) @ (positions x C*T) whose right operand is never built: its
// row (c, t) is the padded plane c read from shift_t on. Here the vector lanes run over output
// channels, so gy is transposed per sample to gyt (positions, Opad), Opad = O rounded up to the
// vector width, zeros above O. A register tile holds R rows (c, t) x V vectors of channels; per
// kept output position it takes V loads of gyt, R broadcasts of xpad and R*V fused multiply-adds,
// and it only visits kept positions (ox < Wo), so nothing is computed to be dropped. Each thread
// runs its samples one after another (the sample's gyt stays in the core's cache), every tile
// adding the sample's sum into its block of the thread's own gwt (C*T, Opad).

// Rows per tile for V vectors: as many accumulators as the registers hold (R*V + V + 1 of 32
// with AVX-512, of 16 otherwise). With two vectors the forward pass runs best with 12 rows, the
// weight gradient with 8.
template <int VW, int V, bool Forward = false>
constexpr int lane_rows() {
    return VW == 16 ? (V == 1 ? 12 : V == 2 ? (Forward ? 12 : 8) : 6) : (V == 1 ? 6 : 4);
}

template <int VW>
constexpr int lane_max_vectors() {
    return VW == 16 ? 4 : 2;
}

// A tile of a (rows x channels) result whose vector lanes run over channels: R rows from
// `first` on (weight gradient: rows c*T + t of gwt; forward: kept output positions) x V vectors
// of VW channels from channel vector*VW on.
struct LaneTile {
    int64_t first;
    int64_t vector;
    int vectors;
};

struct WeightGradPlan {
    const FlatGeometry& g;
    int64_t Opad;
    const float* xpad;    // the sample's C padded planes
    const float* zeros;   // a zero plane, read by the rows past C*T of the last row block
    const float* gyt;     // the sample's (Ho*Wo, Opad)
    float* gwt;           // (C*T, Opad), accumulated over samples
};

template <int VW, int V>
MINIDIFF_INLINE void weight_grad_tile(const WeightGradPlan& pl, int64_t row0, int64_t vec0) {
    typedef typename Lanes<VW>::type Vec;
    constexpr int R = lane_rows<VW, V>();
    const FlatGeometry& g = pl.g;
    const int64_t K = g.C * g.taps;
    const float* rows[R];
    for (int r = 0; r < R; ++r) {
        const int64_t k = row0 + r;
        rows[r] = k < K ? pl.xpad + k / g.taps * g.plane + g.shift[k % g.taps] : pl.zeros;
    }
    Vec acc[R][V];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
    const float* gy_row = pl.gyt + vec0 * VW;
    for (int64_t oy = 0; oy < g.Ho; ++oy, gy_row += g.Wo * pl.Opad) {
        const int64_t base = oy * g.sh * g.S;
        for (int64_t ox = 0; ox < g.Wo; ++ox) {
            Vec gv[V];
#pragma GCC unroll 8
            for (int v = 0; v < V; ++v) gv[v] = load<VW>(gy_row + ox * pl.Opad + v * VW);
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) {
                const Vec xv = rows[r][base + ox * g.sw] - Vec{};  // a broadcast
#pragma GCC unroll 8
                for (int v = 0; v < V; ++v) acc[r][v] += xv * gv[v];
            }
        }
    }
    for (int r = 0; r < R && row0 + r < K; ++r) {
        float* out = pl.gwt + (row0 + r) * pl.Opad + vec0 * VW;
        for (int v = 0; v < V; ++v) {
            Vec sum = load<VW>(out + v * VW) + acc[r][v];
            std::memcpy(out + v * VW, &sum, sizeof sum);
        }
    }
}

// dst (cols, ld) = src (rows, cols).T, in 4x4 blocks transposed in registers (the plain double
// loop writes one float per cache line it touches).
void transpose(const float* src, int64_t rows, int64_t cols, float* dst, int64_t ld) {
    int64_t r0 = 0;
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
    typedef float V4 __attribute__((vector_size(16)));
    for (; r0 + 4 <= rows; r0 += 4) {
        int64_t c0 = 0;
        for (; c0 + 4 <= cols; c0 += 4) {
            V4 a, b, c, d;
            std::memcpy(&a, src + (r0 + 0) * cols + c0, sizeof a);
            std::memcpy(&b, src + (r0 + 1) * cols + c0, sizeof b);
            std::memcpy(&c, src + (r0 + 2) * cols + c0, sizeof c);
            std::memcpy(&d, src + (r0 + 3) * cols + c0, sizeof d);
            const V4 ab_lo = __builtin_shufflevector(a, b, 0, 4, 1, 5), ab_hi = __builtin_shufflevector(a, b, 2, 6, 3, 7);
            const V4 cd_lo = __builtin_shufflevector(c, d, 0, 4, 1, 5), cd_hi = __builtin_shufflevector(c, d, 2, 6, 3, 7);
            const V4 col[4] = {__builtin_shufflevector(ab_lo, cd_lo, 0, 1, 4, 5),
                               __builtin_shufflevector(ab_lo, cd_lo, 2, 3, 6, 7),
                               __builtin_shufflevector(ab_hi, cd_hi, 0, 1, 4, 5),
                               __builtin_shufflevector(ab_hi, cd_hi, 2, 3, 6, 7)};
            for (int j = 0; j < 4; ++j) std::memcpy(dst + (c0 + j) * ld + r0, &col[j], sizeof col[j]);
        }
        for (; c0 < cols; ++c0)
            for (int64_t r = r0; r < r0 + 4; ++r) dst[c0 * ld + r] = src[r * cols + c0];
    }
#endif
#endif
    for (; r0 < rows; ++r0)
        for (int64_t c0 = 0; c0 < cols; ++c0) dst[c0 * ld + r0] = src[r0 * cols + c0];
}

template <int VW>
MINIDIFF_INLINE void weight_grad_task(const WeightGradPlan& pl, const LaneTile& tile) {
    switch (tile.vectors) {
        case 1: weight_grad_tile<VW, 1>(pl, tile.first, tile.vector); break;
        case 2: weight_grad_tile<VW, 2>(pl, tile.first, tile.vector); break;
        case 3: if constexpr (lane_max_vectors<VW>() >= 3) weight_grad_tile<VW, 3>(pl, tile.first, tile.vector); break;
        case 4: if constexpr (lane_max_vectors<VW>() >= 4) weight_grad_tile<VW, 4>(pl, tile.first, tile.vector); break;
    }
}

// -- The forward pass with the lanes on output channels ----------------------------------------
//
// Where O is a multiple of the vector width, or the stride is not 1 (O then rounded up with zero
// weights), the forward pass runs the weight gradient's tile shape: R kept output positions x V
// vectors of output channels, summed over the rows (c, t), each a broadcast of xpad at the
// position's flat offset plus shift_t times V loads of the transposed weight wt (C*T, Opad). No
// position is computed to be dropped (the tile walks kept positions only, across row ends, at
// any stride) and every load is a contiguous run of wt: on 8x8 planes the positions-as-lanes
// tile computes 80 outputs for 64 kept. The tile's R x O block of y is stored through a small
// buffer (y is (O, positions)).
//
// The sum over rows runs in blocks of input channels (kLaneBlockRows rows c*T + t): a task sweeps
// all its tiles over one block, then over the next, each tile resuming from the partial sums it
// stored in y. A tile reads V vectors of wt per row, so over all C*T rows it would read a slice of
// wt larger than L2 (1.2 MB at C = 512, 3x3, 64 channels) for each of its R positions; per block
// the slice (at most 128 KiB) stays in L2 while the task's positions stream past it. Stored and
// reloaded float32 partial sums are exact: the same additions in the same order as one sweep.
constexpr int64_t kLaneBlockRows = 512;

struct ChannelLanesPlan {
    const FlatGeometry& g;
    int64_t Opad;
    const float* xpad;  // the sample's C padded planes
    const float* wt;    // (C*T, Opad): wt[c*T + t, o] = w[o, c, t], zeros past O
    const float* bias;  // (Opad), zeros past O, or null
    float* y;           // the sample's (O, Ho*Wo)
};

template <int VW, int V>
MINIDIFF_INLINE void forward_lanes_tile(const ChannelLanesPlan& pl, int64_t q0, int64_t vec0, int64_t c_lo,
                                        int64_t c_hi) {
    typedef typename Lanes<VW>::type Vec;
    constexpr int R = lane_rows<VW, V, true>();
    const FlatGeometry& g = pl.g;
    const int64_t L = g.Ho * g.Wo, kept = std::min<int64_t>(R, L - q0);
    int64_t off[R];  // flat offsets of the tile's positions (past the last: the last again)
    for (int r = 0; r < R; ++r) {
        const int64_t q = q0 + std::min<int64_t>(r, kept - 1);
        off[r] = q / g.Wo * g.sh * g.S + q % g.Wo * g.sw;
    }
    const int64_t o_end = std::min<int64_t>(g.O, (vec0 + V) * VW);
    Vec acc[R][V];
    alignas(64) float buf[R][V * VW];
    if (c_lo == 0) {
        for (int v = 0; v < V; ++v) {
            const Vec start = pl.bias ? load<VW>(pl.bias + (vec0 + v) * VW) : Vec{};
            for (int r = 0; r < R; ++r) acc[r][v] = start;
        }
    } else {  // resume from the partial sums over the channels before c_lo
        std::memset(buf, 0, sizeof buf);
        for (int64_t o = vec0 * VW; o < o_end; ++o) {
            const float* yo = pl.y + o * L + q0;
            for (int64_t r = 0; r < kept; ++r) buf[r][o - vec0 * VW] = yo[r];
        }
        for (int r = 0; r < R; ++r)
            for (int v = 0; v < V; ++v) acc[r][v] = load<VW>(buf[r] + v * VW);
    }
    const int64_t T = g.taps;
    const int64_t* shift = g.shift.data();
    for (int64_t c = c_lo; c < c_hi; ++c) {
        const float* xc = pl.xpad + c * g.plane;
        const float* wc = pl.wt + c * T * pl.Opad + vec0 * VW;
        for (int64_t t = 0; t < T; ++t) {
            const float* src = xc + shift[t];
            Vec wv[V];
#pragma GCC unroll 8
            for (int v = 0; v < V; ++v) wv[v] = load<VW>(wc + t * pl.Opad + v * VW);
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) {
                const Vec xv = src[off[r]] - Vec{};  // a broadcast
#pragma GCC unroll 8
                for (int v = 0; v < V; ++v) acc[r][v] += xv * wv[v];
            }
        }
    }
    for (int r = 0; r < R; ++r) std::memcpy(buf[r], acc[r], sizeof buf[r]);
    for (int64_t o = vec0 * VW; o < o_end; ++o) {
        float* yo = pl.y + o * L + q0;
        for (int64_t r = 0; r < kept; ++r) yo[r] = buf[r][o - vec0 * VW];
    }
}

template <int VW>
MINIDIFF_INLINE void forward_lanes_task(const ChannelLanesPlan& pl, const LaneTile& tile, int64_t c_lo,
                                        int64_t c_hi) {
    const int64_t q0 = tile.first, v0 = tile.vector;
    switch (tile.vectors) {
        case 1: forward_lanes_tile<VW, 1>(pl, q0, v0, c_lo, c_hi); break;
        case 2: forward_lanes_tile<VW, 2>(pl, q0, v0, c_lo, c_hi); break;
        case 3: if constexpr (lane_max_vectors<VW>() >= 3) forward_lanes_tile<VW, 3>(pl, q0, v0, c_lo, c_hi); break;
        case 4: if constexpr (lane_max_vectors<VW>() >= 4) forward_lanes_tile<VW, 4>(pl, q0, v0, c_lo, c_hi); break;
    }
}

// Tiles [lo, hi) of one sample, block of input channels by block (see kLaneBlockRows).
template <int VW>
MINIDIFF_INLINE void forward_lanes_tiles(const ChannelLanesPlan& pl, const LaneTile* tiles, int64_t lo,
                                         int64_t hi) {
    const int64_t block = std::max<int64_t>(1, kLaneBlockRows / pl.g.taps);
    for (int64_t c_lo = 0; c_lo < pl.g.C; c_lo += block)
        for (int64_t i = lo; i < hi; ++i)
            forward_lanes_task<VW>(pl, tiles[i], c_lo, std::min(pl.g.C, c_lo + block));
}

// The tiles of a (rows x Opad) result: channel vectors in blocks of the widest tile, then the
// remainder; each block's rows in runs of that tile's R.
template <int VW, bool Forward>
std::vector<LaneTile> lane_tiles(int64_t K, int64_t Opad) {
    constexpr int kRows[5] = {0, lane_rows<VW, 1, Forward>(), lane_rows<VW, 2, Forward>(),
                              lane_rows<VW, std::min(3, lane_max_vectors<VW>()), Forward>(),
                              lane_rows<VW, std::min(4, lane_max_vectors<VW>()), Forward>()};
    std::vector<LaneTile> tiles;
    const int64_t nv = Opad / VW;
    for (int64_t v0 = 0; v0 < nv;) {
        const int V = static_cast<int>(std::min<int64_t>(lane_max_vectors<VW>(), nv - v0));
        for (int64_t k0 = 0; k0 < K; k0 += kRows[V]) tiles.push_back({k0, v0, V});
        v0 += V;
    }
    return tiles;
}

using ForwardTask = void (*)(const float*, const float*, float*, const FlatGeometry&, int64_t, int64_t,
                             int64_t, const float*);

// One instruction set's kernel and tile height (output channels per tile).
using WeightGradTiles = void (*)(const WeightGradPlan&, const LaneTile*, int64_t, int64_t);
using ForwardLanesTiles = void (*)(const ChannelLanesPlan&, const LaneTile*, int64_t, int64_t);
using LaneTilePlanner = std::vector<LaneTile> (*)(int64_t, int64_t);

struct DirectConvKernels {
    const char* isa;
    int64_t block;
    ForwardTask forward;
    int64_t lanes;  // the vector width (floats) of the channel-lanes tiles
    LaneTilePlanner weight_grad_tiles;
    WeightGradTiles weight_grad;
    LaneTilePlanner forward_lanes_tiles;
    ForwardLanesTiles forward_lanes;
};

// Tiles: AVX-512 has 32 vector registers (20 accumulators + 5 inputs + a weight); AVX2 and
// baseline SSE have 16 (9 + 3 + 1).
#if defined(__GNUC__) && defined(__x86_64__)
#define MINIDIFF_DIRECT_ISA(name, target_attr, VW, OB, PV)                                      \
    __attribute__((target(target_attr))) void forward_##name(                                     \
        const float* p, const float* b, float* y, const FlatGeometry& g, int64_t n, int64_t lo,   \
        int64_t hi, const float* xpad) {                                                          \
        forward_task<VW, OB, PV>(p, b, y, g, n, lo, hi, xpad);                                    \
    }                                                                                             \
    __attribute__((target(target_attr))) void weight_grad_##name(                                 \
        const WeightGradPlan& pl, const LaneTile* tiles, int64_t lo, int64_t hi) {                \
        for (int64_t i = lo; i < hi; ++i) weight_grad_task<VW>(pl, tiles[i]);                     \
    }                                                                                             \
    __attribute__((target(target_attr))) void forward_lanes_##name(                               \
        const ChannelLanesPlan& pl, const LaneTile* tiles, int64_t lo, int64_t hi) {              \
        forward_lanes_tiles<VW>(pl, tiles, lo, hi);                                               \
    }
MINIDIFF_DIRECT_ISA(avx512, "avx512f,fma", 16, 4, 5)
MINIDIFF_DIRECT_ISA(avx2, "avx2,fma", 8, 3, 3)
#endif

void forward_baseline(const float* p, const float* b, float* y, const FlatGeometry& g, int64_t n,
                      int64_t lo, int64_t hi, const float* xpad) {
    forward_task<4, 3, 3>(p, b, y, g, n, lo, hi, xpad);
}

void weight_grad_baseline(const WeightGradPlan& pl, const LaneTile* tiles, int64_t lo,
                          int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) weight_grad_task<4>(pl, tiles[i]);
}

void forward_lanes_baseline(const ChannelLanesPlan& pl, const LaneTile* tiles, int64_t lo,
                            int64_t hi) {
    forward_lanes_tiles<4>(pl, tiles, lo, hi);
}

// The widest the CPU has; MINIDIFF_CONV_ISA=avx2 or =baseline picks a narrower one (so that
// the tests can check every version on one machine).
const DirectConvKernels& direct_conv_kernels() {
    static const DirectConvKernels chosen = [] {
        const char* forced = std::getenv("MINIDIFF_CONV_ISA");
        const std::string cap = forced ? forced : "";
#if defined(__GNUC__) && defined(__x86_64__)
        __builtin_cpu_init();
        const bool fma = __builtin_cpu_supports("fma");
        if (cap.empty() && fma && __builtin_cpu_supports("avx512f"))
            return DirectConvKernels{"avx512", 4, forward_avx512, 16, lane_tiles<16, false>, weight_grad_avx512, lane_tiles<16, true>, forward_lanes_avx512};
        if ((cap.empty() || cap == "avx2") && fma && __builtin_cpu_supports("avx2"))
            return DirectConvKernels{"avx2", 3, forward_avx2, 8, lane_tiles<8, false>, weight_grad_avx2, lane_tiles<8, true>, forward_lanes_avx2};
#endif
        return DirectConvKernels{"baseline", 3, forward_baseline, 4, lane_tiles<4, false>, weight_grad_baseline, lane_tiles<4, true>, forward_lanes_baseline};
    }();
    return chosen;
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int thread_index() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Work splits into tasks (sample, group of `items`): whole samples (1 group) when the N samples
// make at least `wanted` tasks, else each sample's items split into enough groups to make them.
int64_t task_groups(int64_t N, int64_t items, int64_t wanted) {
    return N >= wanted ? 1 : std::min(items, (wanted + N - 1) / std::max<int64_t>(N, 1));
}

// Runs the N * groups tasks (sample n, group grp) over the threads in static order, as
// work(n, grp, xpad): each thread pads a sample's planes into its own xpad once for its run of
// that sample's tasks.
template <typename Work>
void run_padded_sample_tasks(const float* x, int64_t N, int64_t groups, const FlatGeometry& g,
                             Work work) {
#pragma omp parallel
    {
        std::vector<float> xpad(g.C * g.plane);
        int64_t padded = -1;  // the sample whose planes xpad holds
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * groups; ++task) {
            const int64_t n = task / groups;
            if (n != padded) {
                pad_sample(x, n, xpad.data(), g);
                padded = n;
            }
            work(n, task % groups, xpad.data());
        }
    }
}

}  // namespace

const char* conv2d_direct_isa() { return direct_conv_kernels().isa; }

namespace {

// The forward pass with the lanes on output channels (O rounded up to the vector width with
// zero weights). Tasks are (sample, run of tiles), as in the positions-as-lanes pass.
void conv2d_direct_channel_lanes(const float* x, const float* w, const float* bias, float* y,
                                 int64_t N, const FlatGeometry& g, const DirectConvKernels& k) {
    const int64_t C = g.C, O = g.O, K = C * g.taps, L = g.Ho * g.Wo;
    const int64_t Opad = (O + k.lanes - 1) / k.lanes * k.lanes;
    std::vector<float> wt(K * Opad, 0.0f), bias_pad(bias ? Opad : 0, 0.0f);
    transpose(w, O, K, wt.data(), Opad);  // the columns past O stay zero
    if (bias) std::copy(bias, bias + O, bias_pad.begin());
    const std::vector<LaneTile> tiles = k.forward_lanes_tiles(L, Opad);
    const int64_t ntiles = static_cast<int64_t>(tiles.size());
    const int64_t groups = task_groups(N, ntiles, 4 * static_cast<int64_t>(max_threads()));
    run_padded_sample_tasks(x, N, groups, g, [&](int64_t n, int64_t grp, const float* xpad) {
        const ChannelLanesPlan plan{g, Opad, xpad, wt.data(), bias ? bias_pad.data() : nullptr, y + n * O * L};
        k.forward_lanes(plan, tiles.data(), ntiles * grp / groups, ntiles * (grp + 1) / groups);
    });
}

}  // namespace

void conv2d_direct(const float* x, const float* w, const float* bias, float* y, int64_t N, int64_t C,
                   int64_t H, int64_t W, int64_t O, int64_t kh, int64_t kw, int64_t ph, int64_t pw,
                   int64_t sh, int64_t sw) {
    const FlatGeometry g(C, H, W, O, kh, kw, ph, pw, sh, sw);
    const DirectConvKernels& k = direct_conv_kernels();
    // Channels as lanes where no lane is wasted, and at any stride (the positions-as-lanes tile
    // computes runs of consecutive flat positions: stride 1 only).
    if (O % k.lanes == 0 || sh != 1 || sw != 1) return conv2d_direct_channel_lanes(x, w, bias, y, N, g, k);
    const std::vector<float> packed = pack_weight(w, g, k.block);
    // Tasks are (sample, group of output-channel blocks): whole samples when the batch keeps
    // every thread busy, else the channels are split too (a thread pads a sample's planes once
    // for its run of that sample's tasks).
    const int64_t blocks = (O + k.block - 1) / k.block;
    const int64_t groups = task_groups(N, blocks, 4 * static_cast<int64_t>(max_threads()));
    run_padded_sample_tasks(x, N, groups, g, [&](int64_t n, int64_t grp, const float* xpad) {
        const int64_t lo = std::min(O, blocks * grp / groups * k.block);
        const int64_t hi = std::min(O, blocks * (grp + 1) / groups * k.block);
        if (lo < hi) k.forward(packed.data(), bias, y, g, n, lo, hi, xpad);
    });
}

void conv2d_direct_weight_grad(const float* x, const float* gy, float* gw, int64_t N, int64_t C,
                               int64_t H, int64_t W, int64_t O, int64_t kh, int64_t kw, int64_t ph,
                               int64_t pw, int64_t sh, int64_t sw) {
    const FlatGeometry g(C, H, W, O, kh, kw, ph, pw, sh, sw);
    const DirectConvKernels& k = direct_conv_kernels();
    const int64_t K = C * g.taps, L = g.Ho * g.Wo;
    const int64_t Opad = (O + k.lanes - 1) / k.lanes * k.lanes;
    const std::vector<LaneTile> tiles = k.weight_grad_tiles(K, Opad);
    const int64_t ntiles = static_cast<int64_t>(tiles.size());
    // Tasks are (sample, run of tiles): whole samples when the batch keeps every thread busy,
    // else the tiles are split too. Each thread adds into its own partial sum gwt and keeps the
    // sample it prepared last (its padded planes and gy transposed); the partial sums are added
    // in thread order at the end. No thread waits for another on the way (a barrier per sample
    // cost more than the sample's arithmetic at 8x8).
    const int64_t threads = max_threads();
    const int64_t groups = task_groups(N, ntiles, threads);
    std::vector<float> gwt(threads * K * Opad, 0.0f);
    const std::vector<float> zeros(g.plane, 0.0f);
#pragma omp parallel
    {
        std::vector<float> xpad(C * g.plane), gyt(L * Opad, 0.0f);
        const WeightGradPlan plan{g, Opad, xpad.data(), zeros.data(), gyt.data(),
                                  gwt.data() + thread_index() * K * Opad};
        int64_t prepared = -1;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * groups; ++task) {
            const int64_t n = task / groups, grp = task % groups;
            if (n != prepared) {
                pad_sample(x, n, xpad.data(), g);
                transpose(gy + n * O * L, O, L, gyt.data(), Opad);  // the columns past O stay zero
                prepared = n;
            }
            k.weight_grad(plan, tiles.data(), ntiles * grp / groups, ntiles * (grp + 1) / groups);
        }
    }
    for (int64_t o = 0; o < O; ++o)
        for (int64_t r = 0; r < K; ++r) {
            float sum = 0.0f;
            for (int64_t t = 0; t < threads; ++t) sum += gwt[(t * K + r) * Opad + o];
            gw[o * K + r] = sum;
        }
}

}  // namespace minidiff

// Attention in float32 without the score matrix: out = softmax(scale * q k^T) v, tile by tile.
//
// One task is (batch b, a block of QB query rows). It walks the keys in tiles of KB and keeps,
// per query row i, the running maximum m_i of the scaled scores seen so far, the running sum
// l_i = sum_j exp(s_ij - m_i) and the unnormalised output o_i = sum_j exp(s_ij - m_i) v_j. A tile
// with a larger maximum m' rescales both by exp(m_i - m') before adding its own terms (the
// "online softmax" of FlashAttention), so at the end out_i = o_i / l_i, and the log-sum-exp
// m_i + log l_i is what the backward pass needs to rebuild any tile of probabilities. A task
// holds QB x KB scores, never Lq x Lk.
//
// The two products of a tile run in register tiles whose vector lanes lie on the keys (scores:
// R query rows x SV vectors of keys, summed over the head dimension, from k transposed) and on
// the value columns (output: R rows x V vectors of v's columns, summed over the tile's keys).
// k is transposed and v padded to whole vectors once per call. The readable reference is
// attention_forward_reference in minidiff/kernels/attention.py.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels.h"
#include "lanes.h"

namespace minidiff {
namespace {

constexpr int64_t QB = 64;   // query rows per task
constexpr int64_t KB = 256;  // keys per tile: QB * KB scores (64 KiB) stay in the core's L2
constexpr int R = 4;         // query rows per register tile
constexpr int SV = 4;        // key vectors per score tile

// What one call works on. kt (B, D, LkP): k transposed, zero keys up to LkP (a multiple of the
// score tile's SV * VW keys);
// vp (B, LkP, DvP): v with its columns padded to whole vectors and zero rows past Lk.
struct Plan {
    const float* q;
    const float* kt;
    const float* vp;
    float* out;
    float* lse;
    float scale;
    int64_t B, Lq, Lk, LkP, D, Dv, DvP;
};

// s[r, :SV*VW] = sum_d q[r, d] * kt[d, :] for R rows of q (row stride D) and SV key vectors.
template <int VW>
MINIDIFF_INLINE void score_tile(const float* q, const float* kt, int64_t D, int64_t ldk, float* s) {
    typedef typename Lanes<VW>::type V;
    V acc[R][SV];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < SV; ++c) acc[r][c] = V{};
    for (int64_t d = 0; d < D; ++d) {
        V kv[SV];
#pragma GCC unroll 8
        for (int c = 0; c < SV; ++c) kv[c] = load<VW>(kt + d * ldk + c * VW);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const V qv = q[r * D + d] - V{};  // a broadcast
#pragma GCC unroll 8
            for (int c = 0; c < SV; ++c) acc[r][c] += qv * kv[c];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < SV; ++c) store<VW>(s + r * KB + c * VW, acc[r][c]);
}

// o[r, :NV*VW] += sum_j p[r, j] * v[j, :] for R rows of p (row stride KB), over nk keys.
template <int VW, int NV>
MINIDIFF_INLINE void output_tile(const float* p, const float* v, int64_t nk, int64_t ldv, float* o,
                                 int64_t ldo) {
    typedef typename Lanes<VW>::type V;
    V acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NV; ++c) acc[r][c] = load<VW>(o + r * ldo + c * VW);
    for (int64_t j = 0; j < nk; ++j) {
        V vv[NV];
#pragma GCC unroll 8
        for (int c = 0; c < NV; ++c) vv[c] = load<VW>(v + j * ldv + c * VW);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const V pv = p[r * KB + j] - V{};
#pragma GCC unroll 8
            for (int c = 0; c < NV; ++c) acc[r][c] += pv * vv[c];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < NV; ++c) store<VW>(o + r * ldo + c * VW, acc[r][c]);
}

template <int VW>
MINIDIFF_INLINE void output_tiles(const float* p, const float* v, int64_t nk, int64_t DvP, float* o) {
    // the value columns in runs of up to 4 vectors (4 x R accumulators fit every register file)
    for (int64_t c0 = 0; c0 < DvP; c0 += 4 * VW) {
        switch (std::min<int64_t>(4, (DvP - c0) / VW)) {
            case 1: output_tile<VW, 1>(p, v + c0, nk, DvP, o + c0, DvP); break;
            case 2: output_tile<VW, 2>(p, v + c0, nk, DvP, o + c0, DvP); break;
            case 3: output_tile<VW, 3>(p, v + c0, nk, DvP, o + c0, DvP); break;
            case 4: output_tile<VW, 4>(p, v + c0, nk, DvP, o + c0, DvP); break;
        }
    }
}

// Query rows [i0, i0 + QB) of batch b. q rows past Lq are zeros in qblk and never stored.
template <int VW>
MINIDIFF_INLINE void attention_task(const Plan& pl, int64_t b, int64_t i0, float* qblk, float* s,
                                    float* o) {
    const int64_t rows = std::min(QB, pl.Lq - i0), D = pl.D, DvP = pl.DvP;
    std::memcpy(qblk, pl.q + (b * pl.Lq + i0) * D, rows * D * sizeof(float));
    std::fill(qblk + rows * D, qblk + QB * D, 0.0f);
    std::fill(o, o + QB * DvP, 0.0f);
    float m[QB], l[QB];
    std::fill(m, m + QB, -std::numeric_limits<float>::infinity());
    std::fill(l, l + QB, 0.0f);
    const float* kt = pl.kt + b * D * pl.LkP;
    const float* vp = pl.vp + b * pl.LkP * DvP;
    for (int64_t j0 = 0; j0 < pl.Lk; j0 += KB) {
        const int64_t nk = std::min(KB, pl.Lk - j0);
        const int64_t nk_vec = (nk + SV * VW - 1) / (SV * VW) * (SV * VW);  // zero keys to a whole tile
        for (int64_t r0 = 0; r0 < rows; r0 += R)  // rows past Lq in the last tile: zero queries
            for (int64_t c0 = 0; c0 < nk_vec; c0 += SV * VW)
                score_tile<VW>(qblk + r0 * D, kt + j0 + c0, D, pl.LkP, s + r0 * KB + c0);
        for (int64_t i = 0; i < rows; ++i) {
            float* si = s + i * KB;
            float top = m[i];
            for (int64_t j = 0; j < nk; ++j) top = std::max(top, pl.scale * si[j]);
            const float rescale = exp_approx(m[i] - top);  // 0 on the first tile (m = -inf)
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < nk; ++j) {
                const float e = exp_approx(pl.scale * si[j] - top);
                si[j] = e;
                sum += e;
            }
            l[i] = l[i] * rescale + sum;
            m[i] = top;
            float* oi = o + i * DvP;
#pragma omp simd
            for (int64_t c = 0; c < DvP; ++c) oi[c] *= rescale;
        }
        for (int64_t r0 = 0; r0 < rows; r0 += R) output_tiles<VW>(s + r0 * KB, vp + j0 * DvP, nk, DvP, o + r0 * DvP);
    }
    for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.0f / l[i];
        float* dst = pl.out + (b * pl.Lq + i0 + i) * pl.Dv;
        for (int64_t c = 0; c < pl.Dv; ++c) dst[c] = o[i * DvP + c] * inv;
        pl.lse[b * pl.Lq + i0 + i] = m[i] + std::log(l[i]);
    }
}

using TaskFn = void (*)(const Plan&, int64_t, int64_t, float*, float*, float*);

// The per-ISA task functions. The OpenMP loop stays outside them: GCC outlines a parallel
// region's body into a function of its own, which would not inherit the target attribute.
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("avx512f,fma"))) void task_avx512(const Plan& pl, int64_t b, int64_t i0,
                                                        float* qblk, float* s, float* o) {
    attention_task<16>(pl, b, i0, qblk, s, o);
}
__attribute__((target("avx2,fma"))) void task_avx2(const Plan& pl, int64_t b, int64_t i0, float* qblk,
                                                   float* s, float* o) {
    attention_task<8>(pl, b, i0, qblk, s, o);
}
#endif
void task_baseline(const Plan& pl, int64_t b, int64_t i0, float* qblk, float* s, float* o) {
    attention_task<4>(pl, b, i0, qblk, s, o);
}

struct AttentionKernels {
    const char* isa;
    int64_t lanes;
    TaskFn task;
};

// The widest the CPU has; MINIDIFF_ATTENTION_ISA=avx2 or =baseline picks a narrower one (so
// that the tests can check every version on one machine).
const AttentionKernels& attention_kernels() {
    static const AttentionKernels chosen = [] {
        const char* forced = std::getenv("MINIDIFF_ATTENTION_ISA");
        const std::string cap = forced ? forced : "";
#if defined(__GNUC__) && defined(__x86_64__)
        __builtin_cpu_init();
        const bool fma = __builtin_cpu_supports("fma");
        if (cap.empty() && fma && __builtin_cpu_supports("avx512f")) return AttentionKernels{"avx512", 16, task_avx512};
        if ((cap.empty() || cap == "avx2") && fma && __builtin_cpu_supports("avx2"))
            return AttentionKernels{"avx2", 8, task_avx2};
#endif
        return AttentionKernels{"baseline", 4, task_baseline};
    }();
    return chosen;
}

}  // namespace

const char* attention_forward_isa() { return attention_kernels().isa; }

void attention_forward(const float* q, const float* k, const float* v, float scale, float* out,
                       float* lse, int64_t B, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv,
                       bool parallel) {
    const AttentionKernels& kern = attention_kernels();
    // keys padded to whole score tiles (SV vectors), not to whole KB tiles: short key sequences
    // (a text condition of 77 tokens or fewer) would otherwise copy mostly zeros
    const int64_t tile = SV * kern.lanes;
    const int64_t LkP = (Lk + tile - 1) / tile * tile, DvP = (Dv + kern.lanes - 1) / kern.lanes * kern.lanes;
    std::vector<float> kt(B * D * LkP, 0.0f), vp(B * LkP * DvP, 0.0f);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = 0; j < Lk; ++j) {
            const float* kj = k + (b * Lk + j) * D;
            for (int64_t d = 0; d < D; ++d) kt[(b * D + d) * LkP + j] = kj[d];
            std::memcpy(vp.data() + (b * LkP + j) * DvP, v + (b * Lk + j) * Dv, Dv * sizeof(float));
        }
    }
    const Plan plan{q, kt.data(), vp.data(), out, lse, scale, B, Lq, Lk, LkP, D, Dv, DvP};
    const int64_t blocks = (Lq + QB - 1) / QB;
#pragma omp parallel if (parallel)
    {
        // per thread: a block of queries, its scores and its unnormalised outputs
        std::vector<float> qblk(QB * D), s(QB * KB), o(QB * DvP);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < B * blocks; ++task)
            kern.task(plan, task / blocks, task % blocks * QB, qblk.data(), s.data(), o.data());
    }
}

}  // namespace minidiff

// pybind11 module pymerge._task_vectors: the task-vector family of merges (task arithmetic,
// TIES, DARE, Model Breadcrumbs, DELLA) over many CPU tensors in one call.
//
//   merge(models, base, out, sparsify, consensus, weights, densities, gammas, epsilons,
//         lambdas, normalize, rescale, streams, rows, inner, in_dtype, out_dtype, threads=1)
//
// For every tensor t (T of them) and model k (K of them), with n = numel(base_t):
//   tau_k   = rnd(x_k - b)                 fp32 difference rounded to the storage dtype (as
//                                         mergekit's task vector is a tensor of that dtype)
//   keep_k  = the sparsification mask (below); s_k the L1 rescale (1 unless rescale[t])
//   d_k     = ((tau_k * keep_k) * s_k) * w_k                      (fp32, in this order)
//   consensus: e = (sum_k d_k >= 0 ? +1 : -1); m_k = sign(d_k) == e;
//              mixed = sum_k m_k d_k, div = sum_k m_k w_k (0 -> 1)
//   otherwise: mixed = sum_k d_k, div = sum_k w_k (|div| < 1e-8 -> 1)
//   out_t   = rnd(b + lam_t * (normalize_t ? mixed / div : mixed))
// Sparsification (per model: density d, gamma g, epsilon e; d >= 1 keeps everything):
//   "none"               keep all (task arithmetic)
//   "magnitude"          the kc = max(1, int(d n)) largest |tau| (TIES)
//   "magnitude_outliers" drop the n_top = int(g n) largest and the smallest, keeping
//                        int(d n) (Model Breadcrumbs)
//   "random"             keep where u < d (DARE); u from the counter-based stream
//   "della_magprune"     keep where u < (d - e) + 2 e rank / (C - 1), rank of |tau| in its
//                        row (dim 1; C = the row length; C = 1: probability d) (DELLA)
// Orders of magnitudes are by (|tau| bit pattern, flat index): ties go by position, so the
// selection is exact and the same on every backend. Selection is a radix select: one
// histogram pass over the 15-bit magnitude patterns of fp16/bf16 task vectors (exact), two
// for fp32 (the top 16 bits, then the low 15 bits inside the chosen buckets); per-chunk
// histograms are kept to give each chunk its count of tied elements before it. Tensors of
// at most kSmall elements sort (key, index) pairs instead. DELLA's ranks come from a stable
// LSD radix sort (8-bit digits, histogram passes) of each row.
// Random draws: element i of model k of tensor t is u = (splitmix64(streams[t] +
// (k n + i + 1) * GOLDEN) >> 40) * 2^-24, the definition of pymerge/ops/rng.py.
// L1 rescale: s_k = S / S' with S = sum |tau_k|, S' = sum |tau_k keep_k| (double sums), 1
// when either is below 1e-7 (mergekit's RescaleNorm.l1).
//
// Passes over memory (each reads the K + 1 inputs of every tensor): task arithmetic and
// DARE/DELLA without rescale 1; TIES and breadcrumbs 2 (fp32: 3); rescale adds 1.
//
// Everything is checked before any work; the GIL is released for the work; `threads`
// threads take chunks (kChunk elements, fixed, so results do not depend on the thread
// count) from a shared counter. __simd__ names the loop set: "scalar" (the portable loops),
// "avx2" (the same loops compiled for AVX2, the hot ones written with intrinsics) or
// "avx512" ("avx2" plus 16-lane copies of the window pass and of the TIES merge: ranges with
// no upper boundary, K <= 4; CPUs with AVX-512 F/BW/VL/DQ). The best the CPU has is picked at
// import; $PYMERGE_TV_SIMD=avx2 or =scalar caps it, `_set_simd` switches it (tests). No FMA
// contraction and no reassociation: every set gives the same bits. The window pass counts
// the keys above a window with vector compares and left-packs the keys inside it (a few
// percent) into a buffer that is histogrammed in bulk; the merge keeps the tie ordinals as
// vector counts (8 lanes) or mask popcounts (16 lanes), without branches per group.
// $PYMERGE_TV_PROFILE set: each call prints the wall time of its selection steps (sampling,
// window pass, ...) and of its selection and merge phases to stderr.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "checked_buffers.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYMERGE_TV_X86 1
#define PYMERGE_TV_AVX2 __attribute__((target("avx2,f16c")))
#else
#define PYMERGE_TV_X86 0
#define PYMERGE_TV_AVX2
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PYMERGE_TV_INLINE inline __attribute__((always_inline))
#else
#define PYMERGE_TV_INLINE inline
#endif

namespace py = pybind11;

namespace pymerge_tv {
using namespace pymerge_buf;
namespace {

// ------------------------------------------------------------------ the random stream
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

PYMERGE_TV_INLINE uint64_t splitmix64(uint64_t x) {
    x += kGolden;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

PYMERGE_TV_INLINE float uniform_at(uint64_t stream, uint64_t i) {
    return static_cast<float>(splitmix64(stream + i * kGolden) >> 40) * 5.9604644775390625e-8f;
}

// ------------------------------------------------------------------ the plan
enum class Sp : int { kNone, kMagnitude, kOutliers, kRandom, kDella };

constexpr int64_t kBlk = 256;          // elements staged in fp32 at a time
constexpr int64_t kChunk = 1 << 21;    // elements per work item (fixed: deterministic sums)
constexpr int64_t kSmall = 1 << 15;    // tensors up to this size select by sorting
constexpr int kLanes = 8;              // partial sums per L1 norm (fixed association)

// The kept set of one model's task vector in (key, index) order: ascending positions
// [P0, P1), i.e. keys strictly between v0 and v1, ties at v0 with ordinal >= a0 and ties at
// v1 with ordinal < b1 (ordinal: the count of equal keys earlier in flat order).
enum class Keep : uint8_t { kAll, kNothing, kRange, kRandom, kDella };
struct Sel {
    Keep mode = Keep::kAll;
    int64_t P0 = 0, P1 = 0;   // positions (kRange)
    uint32_t v0 = 0, v1 = 0;  // boundary keys
    int64_t a0 = 0, b1 = 0;
    bool lo_open = false;  // P0 == 0: no lower boundary (v0, a0 unused)
    bool hi_open = false;  // P1 == n: no upper boundary (v1 = 0xFFFFFFFF matches no key)
    bool full = false;     // selected by full histograms (else a window, or a sort)
    bool win = false;      // selected by a sampled window of keys (fp16/bf16, large tensors)
    uint32_t wlo[2] = {0, 0}, whi[2] = {0, 0};  // the windows of the two boundaries
    uint32_t bucket[2] = {0xFFFFFFFFu, 0xFFFFFFFFu};  // fp32: level-0 buckets of P0, P1 - 1
    int64_t rem[2] = {0, 0};      // fp32: their positions inside the buckets
    float d = 1.0f, lo = 0.0f, eps = 0.0f;  // random / della probabilities
    float scale = 1.0f;
};

struct Plan {
    int64_t T = 0;
    int K = 0;
    Sp sp = Sp::kNone;
    bool consensus = false;
    bool wide = false;  // fp32 storage: 31-bit keys, two histogram levels
    std::vector<const char*> x;  // [K * T] k-major
    std::vector<const char*> b;  // [T]
    std::vector<char*> out;      // [T]
    std::vector<int64_t> n;      // [T]
    std::vector<float> w;        // [T * K]
    std::vector<float> lam;      // [T]
    std::vector<float> wsum;     // [T] sum_k w (fp32, k order)
    std::vector<uint8_t> norm, resc;  // [T]
    std::vector<uint64_t> stream;     // [T]
    std::vector<int64_t> rows, inner;  // [T] della: row length C and inner stride B
    std::vector<Sel> sel;              // [T * K]
    std::vector<double> s_all, s_kept;  // [T * K] L1 sums (rescale)
};

// A work item: elements [lo, hi) of tensor t, the `index`-th chunk of that tensor.
struct Chunk {
    int64_t t, lo, hi, index;
    bool small;  // the whole tensor, selected by sorting
};

// ------------------------------------------------------------------ task vectors
// tau[i] = rnd_storage(fp32(x[i]) - fp32(b[i])), key[i] = its magnitude bit pattern.
template <class I>
struct Tau;

template <>
struct Tau<F32> {
    static constexpr bool kWide = true;
    static PYMERGE_TV_INLINE void run(const float* x, const float* bf, float* tau,
                                      uint32_t* key, int64_t m) {
        for (int64_t i = 0; i < m; ++i) {
            const float v = x[i] - bf[i];
            tau[i] = v;
            key[i] = bits_of(v) & 0x7FFFFFFFu;
        }
    }
};

template <class H>  // BF16 or F16: round to storage, keys are 15-bit patterns
struct Tau16 {
    static constexpr bool kWide = false;
    static PYMERGE_TV_INLINE void run(const uint16_t* x, const float* bf, float* tau,
                                      uint32_t* key, int64_t m) {
        for (int64_t i = 0; i < m; ++i) {
            const uint16_t s = H::store(H::load(x[i]) - bf[i]);
            tau[i] = H::load(s);
            key[i] = s & 0x7FFFu;
        }
    }
};
template <>
struct Tau<BF16> : Tau16<BF16> {};
template <>
struct Tau<F16> : Tau16<F16> {};

template <class I>
PYMERGE_TV_INLINE void widen(const typename I::S* p, float* dst, int64_t m) {
    for (int64_t i = 0; i < m; ++i) dst[i] = I::load(p[i]);
}

// ------------------------------------------------------------------ per-thread scratch
struct Scratch {
    std::vector<float> bf, tau, keep, delta, acc, div, sign;
    std::vector<uint32_t> key;
    std::vector<uint8_t> tie;
    std::vector<int32_t> rank;
    std::vector<uint32_t> rk, rk2;
    std::vector<int32_t> ri, ri2;
    void ensure(int K) {
        bf.resize(kBlk);
        acc.resize(kBlk);
        div.resize(kBlk);
        sign.resize(kBlk);
        tie.assign(kBlk + 8, 0);
        tau.resize(static_cast<size_t>(K) * kBlk);
        keep.resize(static_cast<size_t>(K) * kBlk);
        delta.resize(static_cast<size_t>(K) * kBlk);
        key.resize(static_cast<size_t>(K) * kBlk);
    }
};

// ------------------------------------------------------------------ masks
// Running tie ordinals of one chunk and model.
struct Ties {
    int64_t c0 = 0, c1 = 0;
};

PYMERGE_TV_INLINE void range_mask(const Sel& s, const uint32_t* key, float* keep, int64_t m,
                                  Ties& ties, uint8_t* tie) {
    const uint32_t v0 = s.v0, v1 = s.v1;
    const bool open = s.lo_open;
    for (int64_t i = 0; i < m; ++i) {
        const uint32_t k = key[i];
        keep[i] = ((k > v0) | open) & (k < v1) ? 1.0f : 0.0f;
        tie[i] = static_cast<uint8_t>(((k == v0) & !open) | (k == v1));
    }
    // ties, in flat order: scan the flags 8 at a time (a block holds a few at most)
    for (int64_t w = 0; w < m; w += 8) {
        uint64_t word;
        std::memcpy(&word, tie + w, 8);
        while (word != 0) {
            const int64_t i = w + (__builtin_ctzll(word) >> 3);
            word &= word - 1;  // the flag bytes are 0 or 1: one set bit each
            if (i >= m) break;
            const uint32_t k = key[i];
            if (open) {  // only v1 ties are flagged
                keep[i] = ties.c1 < s.b1 ? 1.0f : 0.0f;
                ++ties.c1;
            } else if (k == v0 && k == v1) {
                keep[i] = (ties.c0 >= s.a0 && ties.c0 < s.b1) ? 1.0f : 0.0f;
                ++ties.c0;
            } else if (k == v0) {
                keep[i] = ties.c0 >= s.a0 ? 1.0f : 0.0f;
                ++ties.c0;
            } else {
                keep[i] = ties.c1 < s.b1 ? 1.0f : 0.0f;
                ++ties.c1;
            }
        }
    }
}

// u[i] = uniform_at(stream, first + i): portable loop, and 4 lanes of 64-bit arithmetic per
// AVX2 register (the same integer operations, so the same bits)
PYMERGE_TV_INLINE void uniform_block(uint64_t stream, uint64_t first, float* u, int64_t m) {
    for (int64_t i = 0; i < m; ++i) u[i] = uniform_at(stream, first + static_cast<uint64_t>(i));
}

#if PYMERGE_TV_X86
// a * b modulo 2^64 for 4 lanes: lo*lo + ((hi_a*lo_b + lo_a*hi_b) << 32)
PYMERGE_TV_AVX2 inline __m256i mul64(__m256i a, __m256i b) {
    const __m256i lolo = _mm256_mul_epu32(a, b);
    const __m256i hilo = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
    const __m256i lohi = _mm256_mul_epu32(a, _mm256_srli_epi64(b, 32));
    return _mm256_add_epi64(lolo, _mm256_slli_epi64(_mm256_add_epi64(hilo, lohi), 32));
}

PYMERGE_TV_AVX2 inline void uniform_block_avx2(uint64_t stream, uint64_t first, float* u,
                                               int64_t m) {
    const __m256i g = _mm256_set1_epi64x(static_cast<long long>(kGolden));
    const __m256i m1 = _mm256_set1_epi64x(static_cast<long long>(0xBF58476D1CE4E5B9ULL));
    const __m256i m2 = _mm256_set1_epi64x(static_cast<long long>(0x94D049BB133111EBULL));
    const __m256i g4 = _mm256_set1_epi64x(static_cast<long long>(4 * kGolden));
    // x_i = stream + (first + i + 1) * GOLDEN (splitmix64's first step folded in)
    const uint64_t x0 = stream + (first + 1) * kGolden;
    __m256i x = _mm256_add_epi64(
        _mm256_set1_epi64x(static_cast<long long>(x0)),
        mul64(_mm256_setr_epi64x(0, 1, 2, 3), g));
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        __m256i z = x;
        z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), m1);
        z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), m2);
        z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
        z = _mm256_srli_epi64(z, 40);  // 24 bits: exact as int32 and as float
        const __m128i lo32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(
            z, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
        _mm_storeu_ps(u + i, _mm_mul_ps(_mm_cvtepi32_ps(lo32), _mm_set1_ps(5.9604644775390625e-8f)));
        x = _mm256_add_epi64(x, g4);
    }
    uniform_block(stream, first + static_cast<uint64_t>(i), u + i, m - i);
}
#endif

template <bool V>
PYMERGE_TV_INLINE void uniforms(uint64_t stream, uint64_t first, float* u, int64_t m) {
#if PYMERGE_TV_X86
    if constexpr (V) return uniform_block_avx2(stream, first, u, m);
#endif
    uniform_block(stream, first, u, m);
}

template <bool V>
PYMERGE_TV_INLINE void random_mask(uint64_t stream, uint64_t first, float d, float* keep,
                                   int64_t m) {
    uniforms<V>(stream, first, keep, m);
    for (int64_t i = 0; i < m; ++i) keep[i] = keep[i] < d ? 1.0f : 0.0f;
}

// rank_norm = rank / (C - 1) in fp32; p = lo + (rank_norm * 2) * eps; keep where u < p
template <bool V>
PYMERGE_TV_INLINE void della_mask(uint64_t stream, uint64_t first, const Sel& s,
                                  const int32_t* rank, int64_t C, float* keep, int64_t m) {
    uniforms<V>(stream, first, keep, m);
    if (C <= 1) {
        for (int64_t i = 0; i < m; ++i) keep[i] = keep[i] < s.d ? 1.0f : 0.0f;
        return;
    }
    const float den = static_cast<float>(C - 1);
    for (int64_t i = 0; i < m; ++i) {
        const float p = s.lo + ((static_cast<float>(rank[i]) / den) * 2.0f) * s.eps;
        keep[i] = keep[i] < p ? 1.0f : 0.0f;
    }
}

// ------------------------------------------------------------------ DELLA ranks
// Stable LSD radix sort of the C keys of one row (8-bit digits; a digit all keys share is
// skipped), then rank[c] = position of element c. Ties keep index order.
void row_ranks(const uint32_t* keys, int64_t C, int64_t stride, int32_t* rank, Scratch& s,
               int digits) {
    s.rk.resize(static_cast<size_t>(C));
    s.rk2.resize(static_cast<size_t>(C));
    s.ri.resize(static_cast<size_t>(C));
    s.ri2.resize(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) {
        s.rk[c] = keys[c * stride];
        s.ri[c] = static_cast<int32_t>(c);
    }
    int64_t cnt[256];
    for (int d = 0; d < digits; ++d) {
        const int sh = 8 * d;
        std::memset(cnt, 0, sizeof cnt);
        for (int64_t c = 0; c < C; ++c) ++cnt[(s.rk[c] >> sh) & 0xFF];
        if (cnt[(s.rk[0] >> sh) & 0xFF] == C) continue;  // one digit value: nothing moves
        int64_t pos = 0;
        for (int v = 0; v < 256; ++v) {
            const int64_t c = cnt[v];
            cnt[v] = pos;
            pos += c;
        }
        for (int64_t c = 0; c < C; ++c) {
            const int64_t p = cnt[(s.rk[c] >> sh) & 0xFF]++;
            s.rk2[p] = s.rk[c];
            s.ri2[p] = s.ri[c];
        }
        s.rk.swap(s.rk2);
        s.ri.swap(s.ri2);
    }
    for (int64_t p = 0; p < C; ++p) rank[s.ri[p] * stride] = static_cast<int32_t>(p);
}

// ------------------------------------------------------------------ the passes
enum class Pass { kWindow, kHist0, kHist1, kSums, kMerge };

struct Shared {
    Plan* P;
    std::vector<Chunk> chunks;
    // per chunk: histogram base offsets (level 0: [K][B0]; level 1: [K][2][32768])
    std::vector<int64_t> h0_off, h1_off;
    std::vector<uint32_t> h0, h1;
    int64_t B0 = 32768;
    // per chunk, model and boundary: window histograms (offsets) and counts above the window
    std::vector<int64_t> hw_off;
    std::vector<uint32_t> hw;
    std::vector<int64_t> above;
    // per chunk and model: tie ordinals at v0 / v1 before the chunk
    std::vector<int64_t> tie0, tie1;
    // per chunk and model: L1 partial sums
    std::vector<double> sum_all, sum_kept;
};

template <class I>
using SPtr = const typename I::S*;

// Task vectors of block [lo, lo + m) of tensor t into s.tau / s.key (and s.bf = base).
template <class I, bool V = false>
PYMERGE_TV_INLINE void load_block(const Plan& P, int64_t t, int64_t lo, int64_t m, Scratch& s);

// keep masks of one block for every model
#if PYMERGE_TV_X86
PYMERGE_TV_AVX2 inline void range_mask_avx2(const Sel& s, const uint32_t* key, float* keep,
                                            int64_t m, Ties& ties);
#endif

template <bool V>
PYMERGE_TV_INLINE void masks(const Plan& P, int64_t t, int64_t lo, int64_t m, Scratch& s,
                             Ties* ties, const int32_t* rank /* [K][m] or null */) {
    const int64_t n = P.n[t];
    for (int k = 0; k < P.K; ++k) {
        const Sel& sl = P.sel[static_cast<size_t>(t) * P.K + k];
        float* keep = s.keep.data() + k * kBlk;
        switch (sl.mode) {
            case Keep::kAll:
                for (int64_t i = 0; i < m; ++i) keep[i] = 1.0f;
                break;
            case Keep::kNothing:
                for (int64_t i = 0; i < m; ++i) keep[i] = 0.0f;
                break;
            case Keep::kRange:
#if PYMERGE_TV_X86
                if constexpr (V) {
                    range_mask_avx2(sl, s.key.data() + k * kBlk, keep, m, ties[k]);
                    break;
                }
#endif
                range_mask(sl, s.key.data() + k * kBlk, keep, m, ties[k], s.tie.data());
                break;
            case Keep::kRandom:
                random_mask<V>(P.stream[t], static_cast<uint64_t>(k * n + lo), sl.d, keep, m);
                break;
            case Keep::kDella:
                della_mask<V>(P.stream[t], static_cast<uint64_t>(k * n + lo), sl, rank + k * m,
                           P.rows[t], keep, m);
                break;
        }
    }
}

template <class O>
PYMERGE_TV_INLINE void merge_store(const Plan& P, int64_t t, int64_t m, Scratch& s,
                                   typename O::S* out) {
    const int K = P.K;
    float* acc = s.acc.data();
    float* div = s.div.data();
    for (int k = 0; k < K; ++k) {
        const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
        const float w = P.w[static_cast<size_t>(t) * K + k], sc = sl.scale;
        const float* tau = s.tau.data() + k * kBlk;
        const float* keep = s.keep.data() + k * kBlk;
        float* d = s.delta.data() + k * kBlk;
        for (int64_t i = 0; i < m; ++i) d[i] = ((tau[i] * keep[i]) * sc) * w;
    }
    if (P.consensus) {
        for (int64_t i = 0; i < m; ++i) acc[i] = 0.0f;
        for (int k = 0; k < K; ++k) {
            const float* d = s.delta.data() + k * kBlk;
            for (int64_t i = 0; i < m; ++i) acc[i] += d[i];
        }
        float* e = s.sign.data();  // the elected sign: 1 for +, 0 for -
        for (int64_t i = 0; i < m; ++i) e[i] = acc[i] >= 0.0f ? 1.0f : 0.0f;
        for (int64_t i = 0; i < m; ++i) {
            acc[i] = 0.0f;
            div[i] = 0.0f;
        }
        for (int k = 0; k < K; ++k) {
            const float w = P.w[static_cast<size_t>(t) * K + k];
            const float* d = s.delta.data() + k * kBlk;
            // on = sign(d) == elected, as 1 / 0; summed as d * on (mergekit's deltas * mask)
            for (int64_t i = 0; i < m; ++i) {
                const float pos = d[i] > 0.0f ? 1.0f : 0.0f;
                const float neg = d[i] < 0.0f ? 1.0f : 0.0f;
                const float on = e[i] != 0.0f ? pos : neg;
                acc[i] += d[i] * on;
                div[i] += w * on;
            }
        }
        for (int64_t i = 0; i < m; ++i) div[i] = div[i] == 0.0f ? 1.0f : div[i];
    } else {
        for (int64_t i = 0; i < m; ++i) acc[i] = 0.0f;
        for (int k = 0; k < K; ++k) {
            const float* d = s.delta.data() + k * kBlk;
            for (int64_t i = 0; i < m; ++i) acc[i] += d[i];
        }
        const float ws = P.wsum[t];
        const float dv = std::fabs(ws) < 1e-8f ? 1.0f : ws;
        for (int64_t i = 0; i < m; ++i) div[i] = dv;
    }
    if (P.norm[t])
        for (int64_t i = 0; i < m; ++i) acc[i] = acc[i] / div[i];
    const float lam = P.lam[t];
    if (lam != 1.0f)
        for (int64_t i = 0; i < m; ++i) acc[i] = acc[i] * lam;
    const float* bf = s.bf.data();
    for (int64_t i = 0; i < m; ++i) out[i] = O::store(bf[i] + acc[i]);
}

// The same arithmetic as merge_store in one loop for K <= 4 (values stay in registers).
// Dividing by 1 and multiplying by lam = 1 are exact, so both are done unconditionally.
template <int K, class O>
PYMERGE_TV_INLINE void merge_store_k(const Plan& P, int64_t t, int64_t m, Scratch& s,
                                     typename O::S* out, int64_t i0 = 0) {
    float w[K], sc[K];
    const float* tau[K];
    const float* keep[K];
    for (int k = 0; k < K; ++k) {
        w[k] = P.w[static_cast<size_t>(t) * K + k];
        sc[k] = P.sel[static_cast<size_t>(t) * K + k].scale;
        tau[k] = s.tau.data() + k * kBlk;
        keep[k] = s.keep.data() + k * kBlk;
    }
    const bool cons = P.consensus, norm = P.norm[t] != 0;
    const float lam = P.lam[t];
    const float ws = P.wsum[t];
    const float flat_div = norm ? (std::fabs(ws) < 1e-8f ? 1.0f : ws) : 1.0f;
    const float* bf = s.bf.data();
    if (cons) {
        for (int64_t i = i0; i < m; ++i) {
            float d[K];
            float tot = 0.0f;
            for (int k = 0; k < K; ++k) {
                d[k] = ((tau[k][i] * keep[k][i]) * sc[k]) * w[k];
                tot += d[k];
            }
            const bool up = tot >= 0.0f;
            float acc = 0.0f, dv = 0.0f;
            for (int k = 0; k < K; ++k) {
                const float pos = d[k] > 0.0f ? 1.0f : 0.0f;
                const float neg = d[k] < 0.0f ? 1.0f : 0.0f;
                const float on = up ? pos : neg;
                acc += d[k] * on;
                dv += w[k] * on;
            }
            dv = dv == 0.0f ? 1.0f : dv;
            acc = acc / (norm ? dv : 1.0f);
            out[i] = O::store(bf[i] + acc * lam);
        }
    } else {
        for (int64_t i = i0; i < m; ++i) {
            float acc = 0.0f;
            for (int k = 0; k < K; ++k) acc += ((tau[k][i] * keep[k][i]) * sc[k]) * w[k];
            acc = acc / flat_div;
            out[i] = O::store(bf[i] + acc * lam);
        }
    }
}


#if PYMERGE_TV_X86
// ------------------------------------------------------------------ AVX2 loops
// The same operations as the portable loops, 8 lanes at a time (the conversions are the
// multi-tensor module's: bit ops for bf16, F16C for binary16), so the results are the same
// bits; tails finish in the portable loops.
template <class T>
struct Vec8;

template <>
struct Vec8<F32> {
    static PYMERGE_TV_AVX2 inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
    static PYMERGE_TV_AVX2 inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
};

PYMERGE_TV_AVX2 inline __m256i bf16_round_bits(__m256 v) {  // BF16::store in 32-bit lanes
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, quiet, nan);
}

template <>
struct Vec8<BF16> {
    static PYMERGE_TV_AVX2 inline __m256 load(const uint16_t* p) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static PYMERGE_TV_AVX2 inline void store(uint16_t* p, __m256 v) {
        const __m256i r = bf16_round_bits(v);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    }
};

template <>
struct Vec8<F16> {
    static PYMERGE_TV_AVX2 inline __m256 load(const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static PYMERGE_TV_AVX2 inline void store(uint16_t* p, __m256 v) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
};

template <class I>
PYMERGE_TV_AVX2 inline void tau8(const typename I::S* x, __m256 bv, __m256& tv, __m256i& kv) {
    const __m256 v = _mm256_sub_ps(Vec8<I>::load(x), bv);
    if constexpr (std::is_same_v<I, F32>) {
        tv = v;
        kv = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF));
    } else if constexpr (std::is_same_v<I, BF16>) {
        const __m256i r = bf16_round_bits(v);
        tv = _mm256_castsi256_ps(_mm256_slli_epi32(r, 16));
        kv = _mm256_and_si256(r, _mm256_set1_epi32(0x7FFF));
    } else {
        const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        tv = _mm256_cvtph_ps(h);
        kv = _mm256_and_si256(_mm256_cvtepu16_epi32(h), _mm256_set1_epi32(0x7FFF));
    }
}

template <class I>
PYMERGE_TV_AVX2 inline void tau_avx2(const typename I::S* x, const float* bf, float* tau,
                                     uint32_t* key, int64_t m) {
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
        __m256 tv;
        __m256i kv;
        tau8<I>(x + i, _mm256_loadu_ps(bf + i), tv, kv);
        _mm256_storeu_ps(tau + i, tv);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(key + i), kv);
    }
    if (i < m) Tau<I>::run(x + i, bf + i, tau + i, key + i, m - i);
}

// inclusive prefix sum of 8 int32 lanes
PYMERGE_TV_AVX2 inline __m256i prefix8(__m256i x) {
    x = _mm256_add_epi32(x, _mm256_slli_si256(x, 4));
    x = _mm256_add_epi32(x, _mm256_slli_si256(x, 8));
    const __m256i low_total = _mm256_shuffle_epi32(_mm256_permute2x128_si256(x, x, 0x08), 0xFF);
    return _mm256_add_epi32(x, low_total);
}

// range_mask with the tie ordinals as vector prefix sums (dense ties: quantised bf16 task
// vectors put a few percent of a tensor on the boundary key)
struct Range8 {
    __m256i v0, v1, e0raw, e1raw, open;
};

PYMERGE_TV_AVX2 inline Range8 range8(const Sel& s) {
    // unsigned compares as signed ones on keys with the sign bit flipped
    return Range8{_mm256_set1_epi32(static_cast<int>(s.v0 ^ 0x80000000u)),
                  _mm256_set1_epi32(static_cast<int>(s.v1 ^ 0x80000000u)),
                  _mm256_set1_epi32(static_cast<int>(s.v0)),
                  _mm256_set1_epi32(static_cast<int>(s.v1)),
                  _mm256_set1_epi32(s.lo_open ? -1 : 0)};
}

PYMERGE_TV_AVX2 inline __m256 keep8(const Sel& s, const Range8& r, __m256i k, Ties& ties) {
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i ks = _mm256_xor_si256(k, sign);
    const __m256i gt0 = _mm256_or_si256(_mm256_cmpgt_epi32(ks, r.v0), r.open);
    const __m256i lt1 = _mm256_cmpgt_epi32(r.v1, ks);
    __m256i kept = _mm256_and_si256(gt0, lt1);
    const __m256i e0 = _mm256_andnot_si256(r.open, _mm256_cmpeq_epi32(k, r.e0raw));
    const __m256i e1 = _mm256_cmpeq_epi32(k, r.e1raw);
    const __m256i any = _mm256_or_si256(e0, e1);
    if (!_mm256_testz_si256(any, any)) {
        // ordinals: count before the group + exclusive prefix inside it; the bounds are
        // relative to the count before the group, clamped into int32
        const __m256i p0 = prefix8(_mm256_and_si256(e0, one));
        const __m256i p1 = prefix8(_mm256_and_si256(e1, one));
        const int64_t ra = std::clamp<int64_t>(s.a0 - ties.c0, -1, 16);
        const int64_t rb0 = std::clamp<int64_t>(s.b1 - ties.c0, -1, 16);
        const int64_t rb1 = std::clamp<int64_t>(s.b1 - ties.c1, -1, 16);
        // exclusive ordinal o = p - 1 (on tied lanes); o >= ra  <=>  p > ra
        const __m256i ge_a0 = _mm256_cmpgt_epi32(p0, _mm256_set1_epi32(static_cast<int>(ra)));
        const __m256i lt_b0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rb0)),
                                                 _mm256_sub_epi32(p0, one));
        const __m256i lt_b1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rb1)),
                                                 _mm256_sub_epi32(p1, one));
        // v0 tie (not v1): o0 >= a0; both: a0 <= o0 < b1; v1 tie (not v0): o1 < b1
        const __m256i t0 = _mm256_and_si256(
            _mm256_and_si256(e0, ge_a0), _mm256_or_si256(_mm256_andnot_si256(e1, e0), lt_b0));
        const __m256i t1 = _mm256_and_si256(_mm256_andnot_si256(e0, e1), lt_b1);
        kept = _mm256_or_si256(kept, _mm256_or_si256(t0, t1));
        ties.c0 += _mm256_extract_epi32(p0, 7);
        ties.c1 += _mm256_extract_epi32(p1, 7);
    }
    return _mm256_and_ps(_mm256_castsi256_ps(kept), _mm256_set1_ps(1.0f));
}

PYMERGE_TV_AVX2 inline void range_mask_avx2(const Sel& s, const uint32_t* key, float* keep,
                                            int64_t m, Ties& ties) {
    const Range8 r = range8(s);
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
        const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + i));
        _mm256_storeu_ps(keep + i, keep8(s, r, k, ties));
    }
    if (i < m) {
        uint8_t tie[kBlk + 8] = {};
        range_mask(s, key + i, keep + i, m - i, ties, tie);
    }
}

template <int K, class O>
PYMERGE_TV_AVX2 inline void merge_store_k_avx2(const Plan& P, int64_t t, int64_t m,
                                               Scratch& s, typename O::S* out) {
    __m256 w[K], sc[K];
    const float* tau[K];
    const float* keep[K];
    for (int k = 0; k < K; ++k) {
        w[k] = _mm256_set1_ps(P.w[static_cast<size_t>(t) * K + k]);
        sc[k] = _mm256_set1_ps(P.sel[static_cast<size_t>(t) * K + k].scale);
        tau[k] = s.tau.data() + k * kBlk;
        keep[k] = s.keep.data() + k * kBlk;
    }
    const bool cons = P.consensus, norm = P.norm[t] != 0;
    const __m256 lam = _mm256_set1_ps(P.lam[t]);
    const float ws = P.wsum[t];
    const __m256 flat_div = _mm256_set1_ps(norm ? (std::fabs(ws) < 1e-8f ? 1.0f : ws) : 1.0f);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const float* bf = s.bf.data();
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
        __m256 acc = zero;
        if (cons) {
            __m256 d[K];
            __m256 tot = zero;
            for (int k = 0; k < K; ++k) {
                d[k] = _mm256_mul_ps(
                    _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(tau[k] + i),
                                                _mm256_loadu_ps(keep[k] + i)),
                                  sc[k]),
                    w[k]);
                tot = _mm256_add_ps(tot, d[k]);
            }
            const __m256 up = _mm256_cmp_ps(tot, zero, _CMP_GE_OQ);
            __m256 dv = zero;
            for (int k = 0; k < K; ++k) {
                const __m256 pos = _mm256_and_ps(_mm256_cmp_ps(d[k], zero, _CMP_GT_OQ), one);
                const __m256 neg = _mm256_and_ps(_mm256_cmp_ps(d[k], zero, _CMP_LT_OQ), one);
                const __m256 on = _mm256_blendv_ps(neg, pos, up);
                acc = _mm256_add_ps(acc, _mm256_mul_ps(d[k], on));
                dv = _mm256_add_ps(dv, _mm256_mul_ps(w[k], on));
            }
            dv = _mm256_blendv_ps(dv, one, _mm256_cmp_ps(dv, zero, _CMP_EQ_OQ));
            acc = _mm256_div_ps(acc, norm ? dv : one);
        } else {
            for (int k = 0; k < K; ++k)
                acc = _mm256_add_ps(
                    acc, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(tau[k] + i),
                                                                   _mm256_loadu_ps(keep[k] + i)),
                                                     sc[k]),
                                       w[k]));
            acc = _mm256_div_ps(acc, flat_div);
        }
        Vec8<O>::store(out + i, _mm256_add_ps(_mm256_loadu_ps(bf + i), _mm256_mul_ps(acc, lam)));
    }
    if (i < m) merge_store_k<K, O>(P, t, m, s, out, i);
}
#endif

PYMERGE_TV_INLINE void sums_block(const Plan& P, int64_t m, Scratch& s, double* all,
                                  double* kept) {
    // lane j accumulates elements i = j (mod kLanes): a fixed association on every path
    for (int k = 0; k < P.K; ++k) {
        const float* tau = s.tau.data() + k * kBlk;
        const float* keep = s.keep.data() + k * kBlk;
        double* a = all + k * kLanes;
        double* b = kept + k * kLanes;
        for (int64_t i = 0; i < m; ++i) {
            const double v = std::fabs(static_cast<double>(tau[i]));
            a[i % kLanes] += v;
            b[i % kLanes] += keep[i] != 0.0f ? v : 0.0;
        }
    }
}

template <bool V, int K, class O>
PYMERGE_TV_INLINE void merge_k(const Plan& P, int64_t t, int64_t m, Scratch& s,
                               typename O::S* out) {
#if PYMERGE_TV_X86
    if constexpr (V) return merge_store_k_avx2<K, O>(P, t, m, s, out);
#endif
    merge_store_k<K, O>(P, t, m, s, out);
}

template <bool V, class I>
PYMERGE_TV_INLINE void tau_block(const typename I::S* x, const float* bf, float* tau,
                                 uint32_t* key, int64_t m) {
#if PYMERGE_TV_X86
    if constexpr (V) return tau_avx2<I>(x, bf, tau, key, m);
#endif
    Tau<I>::run(x, bf, tau, key, m);
}

template <class I, bool V>
PYMERGE_TV_INLINE void load_block(const Plan& P, int64_t t, int64_t lo, int64_t m, Scratch& s) {
    widen<I>(reinterpret_cast<SPtr<I>>(P.b[t]) + lo, s.bf.data(), m);
    for (int k = 0; k < P.K; ++k) {
        const auto* x = reinterpret_cast<SPtr<I>>(P.x[static_cast<size_t>(k) * P.T + t]) + lo;
        tau_block<V, I>(x, s.bf.data(), s.tau.data() + k * kBlk, s.key.data() + k * kBlk, m);
    }
}

#if PYMERGE_TV_X86
// The merge pass in registers for K <= 4 models whose masks are keep-all, keep-nothing or a
// range (task arithmetic, TIES, breadcrumbs): per 8 elements the base and each model are
// loaded once, and nothing is staged in memory. The same operations as the staged loops
// (merge_store_k_avx2, keep8), so the same bits; the last < 8 elements take the staged path.
template <int K, class I, class O>
PYMERGE_TV_AVX2 inline void fused_merge(const Plan& P, int64_t t, int64_t lo, int64_t hi,
                                        Ties* ties, Scratch& s) {
    using SI = typename I::S;
    const SI* b = reinterpret_cast<const SI*>(P.b[t]);
    const SI* x[K];
    Range8 r[K];
    __m256 w[K], sc[K];
    int mode[K];  // 0 all, 1 range, 2 nothing
    const Sel* sel[K];
    for (int k = 0; k < K; ++k) {
        x[k] = reinterpret_cast<const SI*>(P.x[static_cast<size_t>(k) * P.T + t]);
        sel[k] = &P.sel[static_cast<size_t>(t) * K + k];
        mode[k] = sel[k]->mode == Keep::kRange ? 1 : sel[k]->mode == Keep::kNothing ? 2 : 0;
        r[k] = range8(*sel[k]);
        w[k] = _mm256_set1_ps(P.w[static_cast<size_t>(t) * K + k]);
        sc[k] = _mm256_set1_ps(sel[k]->scale);
    }
    auto* out = reinterpret_cast<typename O::S*>(P.out[t]);
    const bool cons = P.consensus, norm = P.norm[t] != 0;
    const __m256 lam = _mm256_set1_ps(P.lam[t]);
    const float ws = P.wsum[t];
    const __m256 flat_div = _mm256_set1_ps(norm ? (std::fabs(ws) < 1e-8f ? 1.0f : ws) : 1.0f);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        const __m256 bv = Vec8<I>::load(b + i);
        __m256 d[K];
        __m256 tot = zero;
        for (int k = 0; k < K; ++k) {
            __m256 tv;
            __m256i kv;
            tau8<I>(x[k] + i, bv, tv, kv);
            const __m256 keep =
                mode[k] == 0 ? one : mode[k] == 2 ? zero : keep8(*sel[k], r[k], kv, ties[k]);
            d[k] = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(tv, keep), sc[k]), w[k]);
            tot = _mm256_add_ps(tot, d[k]);
        }
        __m256 acc = zero;
        if (cons) {
            const __m256 up = _mm256_cmp_ps(tot, zero, _CMP_GE_OQ);
            __m256 dv = zero;
            for (int k = 0; k < K; ++k) {
                const __m256 pos = _mm256_and_ps(_mm256_cmp_ps(d[k], zero, _CMP_GT_OQ), one);
                const __m256 neg = _mm256_and_ps(_mm256_cmp_ps(d[k], zero, _CMP_LT_OQ), one);
                const __m256 on = _mm256_blendv_ps(neg, pos, up);
                acc = _mm256_add_ps(acc, _mm256_mul_ps(d[k], on));
                dv = _mm256_add_ps(dv, _mm256_mul_ps(w[k], on));
            }
            dv = _mm256_blendv_ps(dv, one, _mm256_cmp_ps(dv, zero, _CMP_EQ_OQ));
            acc = _mm256_div_ps(acc, norm ? dv : one);
        } else {
            acc = _mm256_div_ps(tot, flat_div);  // tot = 0 + d_0 + ... : the same sum
        }
        Vec8<O>::store(out + i, _mm256_add_ps(bv, _mm256_mul_ps(acc, lam)));
    }
    if (i < hi) {
        const int64_t m = hi - i;
        load_block<I, true>(P, t, i, m, s);
        masks<true>(P, t, i, m, s, ties, nullptr);
        merge_store_k_avx2<K, O>(P, t, m, s, out + i);
    }
}

// fused_merge for tensors whose K models all keep a range with a lower boundary (TIES;
// breadcrumbs when Hi): the models' loops unrolled, and the tie ordinals kept as vector
// counts inside the chunk (all lanes equal), so the keep mask has no branch. The bounds are
// relative to the chunk's counts before it, clamped into int32 (a chunk holds < 2^30
// elements, so the comparisons are those of keep8); the same bits as fused_merge.
template <int K, class I, class O, bool Hi>
PYMERGE_TV_AVX2 inline void fused_range(const Plan& P, int64_t t, int64_t lo, int64_t hi,
                                        Ties* ties, Scratch& s) {
    using SI = typename I::S;
    const SI* b = reinterpret_cast<const SI*>(P.b[t]);
    const SI* x[K];
    __m256i v0[K], v1[K], e0r[K], e1r[K], c0[K], c1[K], ra[K], rb0[K], rb1[K];
    __m256 w[K], sc[K];
    constexpr int64_t kBig = int64_t{1} << 30;
    for (int k = 0; k < K; ++k) {
        const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
        x[k] = reinterpret_cast<const SI*>(P.x[static_cast<size_t>(k) * P.T + t]);
        v0[k] = _mm256_set1_epi32(static_cast<int>(sl.v0 ^ 0x80000000u));
        v1[k] = _mm256_set1_epi32(static_cast<int>(sl.v1 ^ 0x80000000u));
        e0r[k] = _mm256_set1_epi32(static_cast<int>(sl.v0));
        e1r[k] = _mm256_set1_epi32(static_cast<int>(sl.v1));
        c0[k] = _mm256_setzero_si256();
        c1[k] = _mm256_setzero_si256();
        // p: the inclusive count of ties in the chunk up to a lane, o = before + p - 1;
        // o >= a0 <=> p > a0 - before; o < b1 <=> b1 - before + 1 > p
        ra[k] = _mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(sl.a0 - ties[k].c0, -1, kBig)));
        rb0[k] = _mm256_set1_epi32(
            static_cast<int>(std::clamp<int64_t>(sl.b1 - ties[k].c0 + 1, -1, kBig)));
        rb1[k] = _mm256_set1_epi32(
            static_cast<int>(std::clamp<int64_t>(sl.b1 - ties[k].c1 + 1, -1, kBig)));
        w[k] = _mm256_set1_ps(P.w[static_cast<size_t>(t) * K + k]);
        sc[k] = _mm256_set1_ps(sl.scale);
    }
    auto* out = reinterpret_cast<typename O::S*>(P.out[t]);
    const bool cons = P.consensus, norm = P.norm[t] != 0;
    const __m256 lam = _mm256_set1_ps(P.lam[t]);
    const float ws = P.wsum[t];
    const __m256 flat_div = _mm256_set1_ps(norm ? (std::fabs(ws) < 1e-8f ? 1.0f : ws) : 1.0f);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m256i ione = _mm256_set1_epi32(1), seven = _mm256_set1_epi32(7);
    auto body = [&](auto cons_tag) PYMERGE_TV_AVX2 {
        constexpr bool kCons = decltype(cons_tag)::value;
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            const __m256 bv = Vec8<I>::load(b + i);
            __m256 d[K];
            __m256 tot = zero;
#pragma GCC unroll 4
            for (int k = 0; k < K; ++k) {
                __m256 tv;
                __m256i kv;
                tau8<I>(x[k] + i, bv, tv, kv);
                const __m256i ks = _mm256_xor_si256(kv, sign);
                __m256i kept = _mm256_cmpgt_epi32(ks, v0[k]);
                if constexpr (Hi) kept = _mm256_and_si256(kept, _mm256_cmpgt_epi32(v1[k], ks));
                const __m256i e0 = _mm256_cmpeq_epi32(kv, e0r[k]);
                const __m256i q0 = prefix8(_mm256_and_si256(e0, ione));
                const __m256i p0 = _mm256_add_epi32(q0, c0[k]);
                c0[k] = _mm256_add_epi32(c0[k], _mm256_permutevar8x32_epi32(q0, seven));
                const __m256i ge_a0 = _mm256_cmpgt_epi32(p0, ra[k]);
                if constexpr (Hi) {
                    const __m256i e1 = _mm256_cmpeq_epi32(kv, e1r[k]);
                    const __m256i q1 = prefix8(_mm256_and_si256(e1, ione));
                    const __m256i p1 = _mm256_add_epi32(q1, c1[k]);
                    c1[k] = _mm256_add_epi32(c1[k], _mm256_permutevar8x32_epi32(q1, seven));
                    const __m256i lt_b0 = _mm256_cmpgt_epi32(rb0[k], p0);
                    const __m256i lt_b1 = _mm256_cmpgt_epi32(rb1[k], p1);
                    const __m256i t0 = _mm256_and_si256(
                        _mm256_and_si256(e0, ge_a0),
                        _mm256_or_si256(_mm256_andnot_si256(e1, e0), lt_b0));
                    const __m256i t1 = _mm256_and_si256(_mm256_andnot_si256(e0, e1), lt_b1);
                    kept = _mm256_or_si256(kept, _mm256_or_si256(t0, t1));
                } else {
                    kept = _mm256_or_si256(kept, _mm256_and_si256(e0, ge_a0));
                }
                const __m256 keep = _mm256_and_ps(_mm256_castsi256_ps(kept), one);
                d[k] = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(tv, keep), sc[k]), w[k]);
                tot = _mm256_add_ps(tot, d[k]);
            }
            __m256 acc;
            if constexpr (kCons) {
                const __m256 up = _mm256_cmp_ps(tot, zero, _CMP_GE_OQ);
                __m256 dv = zero;
                acc = zero;
#pragma GCC unroll 4
                for (int k = 0; k < K; ++k) {
                    const __m256 onm = _mm256_blendv_ps(_mm256_cmp_ps(d[k], zero, _CMP_LT_OQ),
                                                        _mm256_cmp_ps(d[k], zero, _CMP_GT_OQ), up);
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(d[k], _mm256_and_ps(onm, one)));
                    // w * on: w or a zero, and a zero's sign cannot change a sum that starts
                    // at +0, so the mask gives the same dv as the product
                    dv = _mm256_add_ps(dv, _mm256_and_ps(w[k], onm));
                }
                dv = _mm256_blendv_ps(dv, one, _mm256_cmp_ps(dv, zero, _CMP_EQ_OQ));
                acc = _mm256_div_ps(acc, norm ? dv : one);
            } else {
                acc = _mm256_div_ps(tot, flat_div);
            }
            Vec8<O>::store(out + i, _mm256_add_ps(bv, _mm256_mul_ps(acc, lam)));
        }
        return i;
    };
    const int64_t i = cons ? body(std::true_type{}) : body(std::false_type{});
    for (int k = 0; k < K; ++k) {
        ties[k].c0 += _mm256_extract_epi32(c0[k], 0);
        ties[k].c1 += _mm256_extract_epi32(c1[k], 0);
    }
    if (i < hi) {
        const int64_t m = hi - i;
        load_block<I, true>(P, t, i, m, s);
        masks<true>(P, t, i, m, s, ties, nullptr);
        merge_store_k_avx2<K, O>(P, t, m, s, out + i);
    }
}

// fused_range without an upper boundary (TIES), 8 lanes, with the tie ordinals of
// fused_ties512: no prefix sums. While a model's count of ties before the lanes is below
// a0, a group whose count stays at most a0 keeps none of its ties and only its popcount
// (of the equal-key movemask) is added; the one group that crosses a0 drops its first
// a0 - count ties; after it every tie is kept (an all-ones mask, no more counting). Keys
// are below 2^31, so the compares are signed ones without the sign flip. The same bits as
// fused_range; returns the first element not done (the < 8 left over).
template <int K, class I, class O>
PYMERGE_TV_AVX2 inline int64_t fused_ties8(const Plan& P, int64_t t, int64_t lo, int64_t hi,
                                           Ties* ties) {
    using SI = typename I::S;
    const SI* b = reinterpret_cast<const SI*>(P.b[t]);
    const SI* x[K];
    __m256i v0g[K], v0e[K], all[K];
    __m256 w[K], sc[K];
    int64_t c0[K], a0[K];
    bool counting[K];
    for (int k = 0; k < K; ++k) {
        const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
        x[k] = reinterpret_cast<const SI*>(P.x[static_cast<size_t>(k) * P.T + t]);
        // key > v0 with keys < 2^31: v0 clamped to 2^31 - 1 keeps the unsigned compare
        v0g[k] = _mm256_set1_epi32(static_cast<int>(std::min<uint32_t>(sl.v0, 0x7FFFFFFFu)));
        v0e[k] = _mm256_set1_epi32(static_cast<int>(sl.v0));
        w[k] = _mm256_set1_ps(P.w[static_cast<size_t>(t) * K + k]);
        sc[k] = _mm256_set1_ps(sl.scale);
        c0[k] = ties[k].c0;
        a0[k] = sl.a0;
        counting[k] = c0[k] < a0[k];
        all[k] = _mm256_set1_epi32(counting[k] ? 0 : -1);
    }
    auto* out = reinterpret_cast<typename O::S*>(P.out[t]);
    const bool cons = P.consensus, norm = P.norm[t] != 0;
    const __m256 lam = _mm256_set1_ps(P.lam[t]);
    const float ws = P.wsum[t];
    const __m256 flat_div = _mm256_set1_ps(norm ? (std::fabs(ws) < 1e-8f ? 1.0f : ws) : 1.0f);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    auto body = [&](auto cons_tag) PYMERGE_TV_AVX2 {
        constexpr bool kCons = decltype(cons_tag)::value;
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            const __m256 bv = Vec8<I>::load(b + i);
            __m256 d[K];
            __m256 tot = zero;
#pragma GCC unroll 4
            for (int k = 0; k < K; ++k) {
                __m256 tv;
                __m256i kv;
                tau8<I>(x[k] + i, bv, tv, kv);
                const __m256i eq = _mm256_cmpeq_epi32(kv, v0e[k]);
                __m256i kept = _mm256_or_si256(_mm256_cmpgt_epi32(kv, v0g[k]),
                                               _mm256_and_si256(eq, all[k]));
                if (counting[k]) {
                    const unsigned em =
                        static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(eq)));
                    const int64_t c = __builtin_popcount(em);
                    if (__builtin_expect(c0[k] + c > a0[k], 0)) {  // the crossing group
                        unsigned m = em;
                        for (int64_t j = a0[k] - c0[k]; j > 0; --j) m &= m - 1;
                        const __m256i mv = _mm256_and_si256(
                            _mm256_set1_epi32(static_cast<int>(m)), bits);
                        kept = _mm256_or_si256(kept, _mm256_cmpeq_epi32(mv, bits));
                        counting[k] = false;
                        all[k] = _mm256_set1_epi32(-1);
                    }
                    c0[k] += c;
                }
                const __m256 keep = _mm256_and_ps(_mm256_castsi256_ps(kept), one);
                d[k] = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(tv, keep), sc[k]), w[k]);
                tot = _mm256_add_ps(tot, d[k]);
            }
            __m256 acc;
            if constexpr (kCons) {
                const __m256 up = _mm256_cmp_ps(tot, zero, _CMP_GE_OQ);
                // on: d > 0 where up, else d < 0, i.e. -d > 0 (NaN and zeros: false both ways)
                const __m256 flip = _mm256_andnot_ps(up, _mm256_set1_ps(-0.0f));
                __m256 dv = zero;
                acc = zero;
#pragma GCC unroll 4
                for (int k = 0; k < K; ++k) {
                    const __m256 onm =
                        _mm256_cmp_ps(_mm256_xor_ps(d[k], flip), zero, _CMP_GT_OQ);
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(d[k], _mm256_and_ps(onm, one)));
                    dv = _mm256_add_ps(dv, _mm256_and_ps(w[k], onm));  // as fused_range
                }
                dv = _mm256_blendv_ps(dv, one, _mm256_cmp_ps(dv, zero, _CMP_EQ_OQ));
                acc = _mm256_div_ps(acc, norm ? dv : one);
            } else {
                acc = _mm256_div_ps(tot, flat_div);
            }
            Vec8<O>::store(out + i, _mm256_add_ps(bv, _mm256_mul_ps(acc, lam)));
        }
        return i;
    };
    const int64_t i = cons ? body(std::true_type{}) : body(std::false_type{});
    for (int k = 0; k < K; ++k) ties[k].c0 = c0[k];  // exact while counting; else >= a0 + 1
    return i;
}

// ------------------------------------------------------------------ AVX-512 TIES merge
// (GCC 12 warns of _mm512_undefined_* inside its own intrinsics: silenced here)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// fused_range without an upper boundary (TIES) 16 lanes at a time, where the CPU has
// AVX-512 (F, BW, VL, DQ): the same operations, so the same bits (masks select 1 or +0 as
// the AVX2 and-masks do). The tie ordinals need no prefix sums: while a model's count of
// ties before the lanes is below a0, a group of ties whose count stays at most a0 keeps none
// and only its popcount is added; the one group that crosses a0 drops its first a0 - count
// ties; after it every tie is kept.
#define PYMERGE_TV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,popcnt"), noinline))
#define PYMERGE_TV_AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,popcnt")))
#define PYMERGE_TV_AVX512_INLINE PYMERGE_TV_AVX512_ATTR inline

template <class T>
struct Vec16;

template <>
struct Vec16<F32> {
    static PYMERGE_TV_AVX512_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
    static PYMERGE_TV_AVX512_INLINE void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
};

PYMERGE_TV_AVX512_INLINE __m512i bf16_round_bits16(__m512 v) {  // BF16::store, 32-bit lanes
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, quiet);
}

template <>
struct Vec16<BF16> {
    static PYMERGE_TV_AVX512_INLINE __m512 load(const uint16_t* p) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    static PYMERGE_TV_AVX512_INLINE void store(uint16_t* p, __m512 v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                            _mm512_cvtepi32_epi16(bf16_round_bits16(v)));
    }
};

template <>
struct Vec16<F16> {
    static PYMERGE_TV_AVX512_INLINE __m512 load(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static PYMERGE_TV_AVX512_INLINE void store(uint16_t* p, __m512 v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                            _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
};

template <class I>
PYMERGE_TV_AVX512_INLINE void tau16(const typename I::S* x, __m512 bv, __m512& tv, __m512i& kv) {
    const __m512 v = _mm512_sub_ps(Vec16<I>::load(x), bv);
    if constexpr (std::is_same_v<I, F32>) {
        tv = v;
        kv = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
    } else if constexpr (std::is_same_v<I, BF16>) {
        const __m512i r = bf16_round_bits16(v);
        tv = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
        kv = _mm512_and_si512(r, _mm512_set1_epi32(0x7FFF));
    } else {
        const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        tv = _mm512_cvtph_ps(h);
        kv = _mm512_and_si512(_mm512_cvtepu16_epi32(h), _mm512_set1_epi32(0x7FFF));
    }
}

// Elements [lo, hi) of tensor t; returns the first element not done (the < 16 left over).
template <int K, class I, class O>
PYMERGE_TV_AVX512 int64_t fused_ties512(const Plan& P, int64_t t, int64_t lo, int64_t hi,
                                        Ties* ties) {
    using SI = typename I::S;
    const SI* b = reinterpret_cast<const SI*>(P.b[t]);
    const SI* x[K];
    __m512i v0[K];
    __m512 w[K], sc[K];
    int64_t c0[K], a0[K];
    bool counting[K];
    for (int k = 0; k < K; ++k) {
        const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
        x[k] = reinterpret_cast<const SI*>(P.x[static_cast<size_t>(k) * P.T + t]);
        v0[k] = _mm512_set1_epi32(static_cast<int>(sl.v0));
        w[k] = _mm512_set1_ps(P.w[static_cast<size_t>(t) * K + k]);
        sc[k] = _mm512_set1_ps(sl.scale);
        c0[k] = ties[k].c0;
        a0[k] = sl.a0;
        counting[k] = c0[k] < a0[k];
    }
    auto* out = reinterpret_cast<typename O::S*>(P.out[t]);
    const bool cons = P.consensus, norm = P.norm[t] != 0;
    const __m512 lam = _mm512_set1_ps(P.lam[t]);
    const float ws = P.wsum[t];
    const __m512 flat_div = _mm512_set1_ps(norm ? (std::fabs(ws) < 1e-8f ? 1.0f : ws) : 1.0f);
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    auto body = [&](auto cons_tag) PYMERGE_TV_AVX512_ATTR {
        constexpr bool kCons = decltype(cons_tag)::value;
        int64_t i = lo;
        for (; i + 16 <= hi; i += 16) {
            const __m512 bv = Vec16<I>::load(b + i);
            __m512 d[K];
            __m512 tot = zero;
#pragma GCC unroll 4
            for (int k = 0; k < K; ++k) {
                __m512 tv;
                __m512i kv;
                tau16<I>(x[k] + i, bv, tv, kv);
                __mmask16 kept = _mm512_cmpgt_epu32_mask(kv, v0[k]);
                const __mmask16 eq = _mm512_cmpeq_epi32_mask(kv, v0[k]);
                if (!counting[k]) {
                    kept = static_cast<__mmask16>(kept | eq);
                } else if (eq != 0) {
                    const int64_t c = __builtin_popcount(static_cast<unsigned>(eq));
                    if (c0[k] + c > a0[k]) {  // the crossing group: drop its first ties
                        unsigned m = eq;
                        for (int64_t j = a0[k] - c0[k]; j > 0; --j) m &= m - 1;
                        kept = static_cast<__mmask16>(kept | m);
                        counting[k] = false;
                    }
                    c0[k] += c;
                }
                const __m512 keep = _mm512_maskz_mov_ps(kept, one);
                d[k] = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(tv, keep), sc[k]), w[k]);
                tot = _mm512_add_ps(tot, d[k]);
            }
            __m512 acc;
            if constexpr (kCons) {
                const __mmask16 up = _mm512_cmp_ps_mask(tot, zero, _CMP_GE_OQ);
                __m512 dv = zero;
                acc = zero;
#pragma GCC unroll 4
                for (int k = 0; k < K; ++k) {
                    const __mmask16 onm = static_cast<__mmask16>(
                        (up & _mm512_cmp_ps_mask(d[k], zero, _CMP_GT_OQ)) |
                        (~up & _mm512_cmp_ps_mask(d[k], zero, _CMP_LT_OQ)));
                    acc = _mm512_add_ps(acc, _mm512_mul_ps(d[k], _mm512_maskz_mov_ps(onm, one)));
                    dv = _mm512_add_ps(dv, _mm512_maskz_mov_ps(onm, w[k]));  // as fused_range
                }
                dv = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(dv, zero, _CMP_EQ_OQ), dv, one);
                acc = _mm512_div_ps(acc, norm ? dv : one);
            } else {
                acc = _mm512_div_ps(tot, flat_div);
            }
            Vec16<O>::store(out + i, _mm512_add_ps(bv, _mm512_mul_ps(acc, lam)));
        }
        return i;
    };
    const int64_t i = cons ? body(std::true_type{}) : body(std::false_type{});
    for (int k = 0; k < K; ++k) ties[k].c0 = c0[k];  // exact while counting; else >= a0 + 1
    return i;
}

bool avx512_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

// The AVX-512 copies run inside the AVX2 loop set when the CPU has them, unless
// $PYMERGE_TV_SIMD is "avx2" or "scalar" (or _set_simd picks another level).
bool initial_avx512() {
    const char* env = std::getenv("PYMERGE_TV_SIMD");
    if (env != nullptr && (std::string(env) == "avx2" || std::string(env) == "scalar"))
        return false;
    return avx512_supported();
}

std::atomic<bool> g_avx512{false};

// The window pass in registers: per 8 elements the base once and each model's key once, the
// count above each window as lane counters, and histogram increments only for the lanes
// inside a window. Up to kFusedK models (more: the staged loop).
constexpr int kFusedK = 16;

struct Win8 {
    const void* x;
    bool act[2];
    __m256i wl[2], wh[2], above[2], base[2];  // wl: the window's width - 1, sign flipped
    uint32_t* h[2];
    uint32_t* buf[2];  // the offsets (key - wlo) of inside keys, left-packed, kPack + 8
    int64_t nbuf[2];
};

constexpr int64_t kPack = 2048;

// kLeftPack[m]: the lanes of the set bits of m in ascending order, as bytes (then zeros)
struct LeftPack {
    alignas(64) uint8_t idx[256][8];
    constexpr LeftPack() : idx() {
        for (int m = 0; m < 256; ++m) {
            int n = 0;
            for (int l = 0; l < 8; ++l)
                if (m & (1 << l)) idx[m][n++] = static_cast<uint8_t>(l);
        }
    }
};
constexpr LeftPack kLeftPack{};

// fused_window for NM models whose windows are all of the lower boundary (TIES): the same
// counts and packed offsets, with the models unrolled and their counters in registers.
template <class I, int NM>
PYMERGE_TV_AVX2 inline void fused_window_lo(Shared& S, size_t ci, int64_t t, int64_t lo,
                                            int64_t hi, Scratch& s, const int* models) {
    using SI = typename I::S;
    Plan& P = *S.P;
    const int K = P.K;
    const SI* b = reinterpret_cast<const SI*>(P.b[t]);
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const SI* x[NM];
    __m256i wd[NM], wh[NM], above[NM], base[NM];
    uint32_t* h[NM];
    uint32_t* buf[NM];
    int64_t nbuf[NM];
    s.rk.resize(static_cast<size_t>(NM) * (kPack + 8));
    for (int q = 0; q < NM; ++q) {
        const Sel& sl = P.sel[static_cast<size_t>(t) * K + models[q]];
        wd[q] = _mm256_set1_epi32(static_cast<int>((sl.whi[0] - sl.wlo[0]) ^ 0x80000000u));
        wh[q] = _mm256_set1_epi32(static_cast<int>(std::min<uint32_t>(sl.whi[0], 0x7FFFFFFFu)));
        base[q] = _mm256_set1_epi32(static_cast<int>(sl.wlo[0]));
        above[q] = _mm256_setzero_si256();
        h[q] = S.hw.data() + S.hw_off[(ci * K + models[q]) * 2];
        buf[q] = s.rk.data() + static_cast<size_t>(q) * (kPack + 8);
        nbuf[q] = 0;
        x[q] = reinterpret_cast<const SI*>(P.x[static_cast<size_t>(models[q]) * P.T + t]);
    }
    auto flush = [&](int q) {
        uint32_t* hq = h[q];
        const uint32_t* p = buf[q];
        for (int64_t e = 0, m = nbuf[q]; e < m; ++e) ++hq[p[e]];
        nbuf[q] = 0;
    };
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        const __m256 bv = Vec8<I>::load(b + i);
#pragma GCC unroll 16
        for (int q = 0; q < NM; ++q) {
            __m256 tv;
            __m256i kv;
            tau8<I>(x[q] + i, bv, tv, kv);
            above[q] = _mm256_sub_epi32(above[q], _mm256_cmpgt_epi32(kv, wh[q]));
            const __m256i off = _mm256_sub_epi32(kv, base[q]);
            const __m256i outside = _mm256_cmpgt_epi32(_mm256_xor_si256(off, sign), wd[q]);
            const unsigned in =
                ~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(outside))) & 0xFFu;
            const __m256i perm = _mm256_cvtepu8_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kLeftPack.idx[in])));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf[q] + nbuf[q]),
                                _mm256_permutevar8x32_epi32(off, perm));
            nbuf[q] += __builtin_popcount(in);
            if (__builtin_expect(nbuf[q] >= kPack, 0)) flush(q);
        }
    }
    for (int q = 0; q < NM; ++q) {
        flush(q);
        const size_t slot = (ci * K + models[q]) * 2;
        const Sel& sl = P.sel[static_cast<size_t>(t) * K + models[q]];
        for (int64_t e = i; e < hi; ++e) {  // the tail, one element at a time
            const float bf = I::load(b[e]);
            float tau;
            uint32_t key;
            Tau<I>::run(x[q] + e, &bf, &tau, &key, 1);
            if (key > sl.whi[0])
                ++S.above[slot];
            else if (key >= sl.wlo[0])
                ++h[q][key - sl.wlo[0]];
        }
        alignas(32) uint32_t a[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(a), above[q]);
        int64_t tot = 0;
        for (int l = 0; l < 8; ++l) tot += a[l];
        S.above[slot] += tot;
    }
}

template <class I>
PYMERGE_TV_AVX2 inline void fused_window(Shared& S, size_t ci, int64_t t, int64_t lo,
                                         int64_t hi, Scratch& s) {
    using SI = typename I::S;
    Plan& P = *S.P;
    const int K = P.K;
    const SI* b = reinterpret_cast<const SI*>(P.b[t]);
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    Win8 win[kFusedK];
    int models[kFusedK];
    int nm = 0;
    s.rk.resize(static_cast<size_t>(2 * kFusedK) * (kPack + 8));
    for (int k = 0; k < K; ++k) {
        const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
        if (sl.mode != Keep::kRange || !sl.win) continue;
        Win8& wv = win[nm];
        for (int j = 0; j < 2; ++j) {
            wv.act[j] = !(j == 0 ? sl.lo_open : sl.hi_open);
            // keys < 2^31: "above" is a signed compare with whi clamped to 2^31 - 1;
            // inside: key - wlo <= whi - wlo unsigned (a signed compare, sign flipped)
            wv.wl[j] = _mm256_set1_epi32(
                static_cast<int>((sl.whi[j] - sl.wlo[j]) ^ 0x80000000u));
            wv.wh[j] = _mm256_set1_epi32(
                static_cast<int>(std::min<uint32_t>(sl.whi[j], 0x7FFFFFFFu)));
            wv.above[j] = _mm256_setzero_si256();
            wv.h[j] = S.hw.data() + S.hw_off[(ci * K + k) * 2 + j];
            wv.base[j] = _mm256_set1_epi32(static_cast<int>(sl.wlo[j]));
            wv.buf[j] = s.rk.data() + static_cast<size_t>(2 * nm + j) * (kPack + 8);
            wv.nbuf[j] = 0;
        }
        models[nm++] = k;
        wv.x = P.x[static_cast<size_t>(k) * P.T + t];
    }
    bool lo_only = nm <= 4;
    for (int q = 0; q < nm && lo_only; ++q) lo_only = win[q].act[0] && !win[q].act[1];
    if (lo_only) {
        switch (nm) {
            case 0: break;
            case 1: return fused_window_lo<I, 1>(S, ci, t, lo, hi, s, models);
            case 2: return fused_window_lo<I, 2>(S, ci, t, lo, hi, s, models);
            case 3: return fused_window_lo<I, 3>(S, ci, t, lo, hi, s, models);
            default: return fused_window_lo<I, 4>(S, ci, t, lo, hi, s, models);
        }
    }
    auto flush = [](Win8& wv, int j) {
        uint32_t* h = wv.h[j];
        const uint32_t* q = wv.buf[j];
        for (int64_t e = 0, m = wv.nbuf[j]; e < m; ++e) ++h[q[e]];
        wv.nbuf[j] = 0;
    };
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8) {
        const __m256 bv = Vec8<I>::load(b + i);
        for (int q = 0; q < nm; ++q) {
            Win8& wv = win[q];
            __m256 tv;
            __m256i kv;
            tau8<I>(reinterpret_cast<const SI*>(wv.x) + i, bv, tv, kv);
            for (int j = 0; j < 2; ++j) {
                if (!wv.act[j]) continue;
                const __m256i gt = _mm256_cmpgt_epi32(kv, wv.wh[j]);
                wv.above[j] = _mm256_sub_epi32(wv.above[j], gt);
                const __m256i off = _mm256_sub_epi32(kv, wv.base[j]);
                const __m256i outside =
                    _mm256_cmpgt_epi32(_mm256_xor_si256(off, sign), wv.wl[j]);
                // inside lanes (a few percent): left-pack their offsets into the buffer
                const unsigned in = ~static_cast<unsigned>(
                                        _mm256_movemask_ps(_mm256_castsi256_ps(outside))) & 0xFFu;
                const __m256i perm = _mm256_cvtepu8_epi32(
                    _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kLeftPack.idx[in])));
                _mm256_storeu_si256(
                    reinterpret_cast<__m256i*>(wv.buf[j] + wv.nbuf[j]),
                    _mm256_permutevar8x32_epi32(off, perm));
                wv.nbuf[j] += __builtin_popcount(in);
                if (wv.nbuf[j] >= kPack) flush(wv, j);
            }
        }
    }
    for (int q = 0; q < nm; ++q)
        for (int j = 0; j < 2; ++j)
            if (win[q].act[j]) flush(win[q], j);
    for (int q = 0; q < nm; ++q) {
        Win8& wv = win[q];
        const size_t slot = (ci * K + models[q]) * 2;
        const SI* x = reinterpret_cast<const SI*>(wv.x);
        for (int64_t e = i; e < hi; ++e) {  // the tail, one element at a time
            const float bf = I::load(b[e]);
            float tau;
            uint32_t key;
            Tau<I>::run(x + e, &bf, &tau, &key, 1);
            for (int j = 0; j < 2; ++j) {
                if (!wv.act[j]) continue;
                const Sel& sl = P.sel[static_cast<size_t>(t) * K + models[q]];
                if (key > sl.whi[j])
                    ++S.above[slot + j];
                else if (key >= sl.wlo[j])
                    ++wv.h[j][key - sl.wlo[j]];
            }
        }
        for (int j = 0; j < 2; ++j) {
            if (!wv.act[j]) continue;
            alignas(32) uint32_t a[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(a), wv.above[j]);
            int64_t tot = 0;
            for (int l = 0; l < 8; ++l) tot += a[l];
            S.above[slot + j] += tot;
        }
    }
}

// fused_window 16 lanes at a time (AVX-512): the inside lanes left-packed by a compress.
template <class I>
PYMERGE_TV_AVX512 void fused_window512(Shared& S, size_t ci, int64_t t, int64_t lo,
                                       int64_t hi, Scratch& s) {
    using SI = typename I::S;
    Plan& P = *S.P;
    const int K = P.K;
    const SI* b = reinterpret_cast<const SI*>(P.b[t]);
    struct W {
        const SI* x;
        bool act[2];
        __m512i wl[2], wh[2], base[2];
        int64_t above[2];
        uint32_t* h[2];
        uint32_t* buf[2];
        int64_t nbuf[2];
    };
    W win[kFusedK];
    int models[kFusedK];
    int nm = 0;
    s.rk.resize(static_cast<size_t>(2 * kFusedK) * (kPack + 16));
    for (int k = 0; k < K; ++k) {
        const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
        if (sl.mode != Keep::kRange || !sl.win) continue;
        W& wv = win[nm];
        for (int j = 0; j < 2; ++j) {
            wv.act[j] = !(j == 0 ? sl.lo_open : sl.hi_open);
            wv.wl[j] = _mm512_set1_epi32(static_cast<int>(sl.wlo[j]));
            wv.wh[j] = _mm512_set1_epi32(static_cast<int>(sl.whi[j]));
            wv.base[j] = _mm512_set1_epi32(static_cast<int>(sl.wlo[j]));
            wv.above[j] = 0;
            wv.h[j] = S.hw.data() + S.hw_off[(ci * K + k) * 2 + j];
            wv.buf[j] = s.rk.data() + static_cast<size_t>(2 * nm + j) * (kPack + 16);
            wv.nbuf[j] = 0;
        }
        wv.x = reinterpret_cast<const SI*>(P.x[static_cast<size_t>(k) * P.T + t]);
        models[nm++] = k;
    }
    auto flush = [](W& wv, int j) {
        uint32_t* h = wv.h[j];
        const uint32_t* q = wv.buf[j];
        for (int64_t e = 0, m = wv.nbuf[j]; e < m; ++e) ++h[q[e]];
        wv.nbuf[j] = 0;
    };
    int64_t i = lo;
    for (; i + 16 <= hi; i += 16) {
        const __m512 bv = Vec16<I>::load(b + i);
        for (int q = 0; q < nm; ++q) {
            W& wv = win[q];
            __m512 tv;
            __m512i kv;
            tau16<I>(wv.x + i, bv, tv, kv);
            for (int j = 0; j < 2; ++j) {
                if (!wv.act[j]) continue;
                const __mmask16 gt = _mm512_cmpgt_epu32_mask(kv, wv.wh[j]);
                const __mmask16 in = static_cast<__mmask16>(
                    _mm512_cmpge_epu32_mask(kv, wv.wl[j]) & ~gt);
                wv.above[j] += __builtin_popcount(static_cast<unsigned>(gt));
                _mm512_storeu_si512(wv.buf[j] + wv.nbuf[j],
                                    _mm512_maskz_compress_epi32(in, _mm512_sub_epi32(kv, wv.base[j])));
                wv.nbuf[j] += __builtin_popcount(static_cast<unsigned>(in));
                if (wv.nbuf[j] >= kPack) flush(wv, j);
            }
        }
    }
    for (int q = 0; q < nm; ++q) {
        W& wv = win[q];
        const size_t slot = (ci * K + models[q]) * 2;
        for (int j = 0; j < 2; ++j) {
            if (!wv.act[j]) continue;
            flush(wv, j);
            S.above[slot + j] += wv.above[j];
        }
        const Sel& sl = P.sel[static_cast<size_t>(t) * K + models[q]];
        for (int64_t e = i; e < hi; ++e) {  // the tail, one element at a time
            const float bf = I::load(b[e]);
            float tau;
            uint32_t key;
            Tau<I>::run(wv.x + e, &bf, &tau, &key, 1);
            for (int j = 0; j < 2; ++j) {
                if (!wv.act[j]) continue;
                if (key > sl.whi[j])
                    ++S.above[slot + j];
                else if (key >= sl.wlo[j])
                    ++wv.h[j][key - sl.wlo[j]];
            }
        }
    }
}
#pragma GCC diagnostic pop
#else
bool avx512_supported() { return false; }
bool initial_avx512() { return false; }
std::atomic<bool> g_avx512{false};
#endif

// One chunk for one pass. `rank_buf` holds the DELLA ranks of the slab being processed.
template <bool V, class I, class O>
PYMERGE_TV_INLINE void run_chunk(Shared& S, size_t ci, Pass pass, Scratch& s) {
    Plan& P = *S.P;
    const Chunk& c = S.chunks[ci];
    const int K = P.K;
    const int64_t t = c.t;
    s.ensure(K);
    std::vector<Ties> ties(static_cast<size_t>(K));
    for (int k = 0; k < K; ++k) {
        ties[k].c0 = S.tie0.empty() ? 0 : S.tie0[ci * K + k];
        ties[k].c1 = S.tie1.empty() ? 0 : S.tie1[ci * K + k];
    }
    uint32_t* h0 = pass == Pass::kHist0 ? S.h0.data() + S.h0_off[ci] : nullptr;
    uint32_t* h1 = pass == Pass::kHist1 ? S.h1.data() + S.h1_off[ci] : nullptr;
    double lanes_all[64 * kLanes], lanes_kept[64 * kLanes];
    std::vector<double> many_all, many_kept;
    double* la = lanes_all;
    double* lk = lanes_kept;
    if (K > 64) {
        many_all.resize(static_cast<size_t>(K) * kLanes);
        many_kept.resize(static_cast<size_t>(K) * kLanes);
        la = many_all.data();
        lk = many_kept.data();
    }
    std::fill(la, la + K * kLanes, 0.0);
    std::fill(lk, lk + K * kLanes, 0.0);
    const bool della = P.sp == Sp::kDella;
    // DELLA: slabs [C, B] of C * B elements; ranks along C for each of the B columns
    const int64_t C = P.rows[t], B = P.inner[t];
    const int64_t slab = della ? C * B : (c.hi - c.lo);
    auto* out = pass == Pass::kMerge ? reinterpret_cast<typename O::S*>(P.out[t]) : nullptr;
#if PYMERGE_TV_X86
    if constexpr (V) {
        if (pass == Pass::kWindow && K <= kFusedK) {
            if (g_avx512.load()) return fused_window512<I>(S, ci, t, c.lo, c.hi, s);
            return fused_window<I>(S, ci, t, c.lo, c.hi, s);
        }
        bool simple = pass == Pass::kMerge && !della && K <= 4;
        for (int k = 0; k < K && simple; ++k) {
            const Keep md = P.sel[static_cast<size_t>(t) * K + k].mode;
            simple = md == Keep::kAll || md == Keep::kRange || md == Keep::kNothing;
        }
        // every model a range with a lower boundary, all with or all without an upper one
        bool ranged = simple;
        for (int k = 0; k < K && ranged; ++k) {
            const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
            const Sel& s0 = P.sel[static_cast<size_t>(t) * K];
            ranged = sl.mode == Keep::kRange && !sl.lo_open && sl.hi_open == s0.hi_open;
        }
        if (ranged) {
            const bool h = !P.sel[static_cast<size_t>(t) * K].hi_open;
            if (!h && g_avx512.load() && K <= 4) {
                int64_t i = c.lo;
                switch (K) {
                    case 1: i = fused_ties512<1, I, O>(P, t, c.lo, c.hi, ties.data()); break;
                    case 2: i = fused_ties512<2, I, O>(P, t, c.lo, c.hi, ties.data()); break;
                    case 3: i = fused_ties512<3, I, O>(P, t, c.lo, c.hi, ties.data()); break;
                    default: i = fused_ties512<4, I, O>(P, t, c.lo, c.hi, ties.data()); break;
                }
                if (i < c.hi) {  // the last < 16 elements: the 8-lane loop and its tail
                    switch (K) {
                        case 1: return fused_range<1, I, O, false>(P, t, i, c.hi, ties.data(), s);
                        case 2: return fused_range<2, I, O, false>(P, t, i, c.hi, ties.data(), s);
                        case 3: return fused_range<3, I, O, false>(P, t, i, c.hi, ties.data(), s);
                        default: return fused_range<4, I, O, false>(P, t, i, c.hi, ties.data(), s);
                    }
                }
                return;
            }
            if (!h) {  // 8 lanes: the same ordinals by popcounts, then the tail
                int64_t i = c.lo;
                switch (K) {
                    case 1: i = fused_ties8<1, I, O>(P, t, c.lo, c.hi, ties.data()); break;
                    case 2: i = fused_ties8<2, I, O>(P, t, c.lo, c.hi, ties.data()); break;
                    case 3: i = fused_ties8<3, I, O>(P, t, c.lo, c.hi, ties.data()); break;
                    default: i = fused_ties8<4, I, O>(P, t, c.lo, c.hi, ties.data()); break;
                }
                if (i < c.hi) {
                    switch (K) {
                        case 1: return fused_range<1, I, O, false>(P, t, i, c.hi, ties.data(), s);
                        case 2: return fused_range<2, I, O, false>(P, t, i, c.hi, ties.data(), s);
                        case 3: return fused_range<3, I, O, false>(P, t, i, c.hi, ties.data(), s);
                        default: return fused_range<4, I, O, false>(P, t, i, c.hi, ties.data(), s);
                    }
                }
                return;
            }
            switch (K * 2 + (h ? 1 : 0)) {
                case 2: return fused_range<1, I, O, false>(P, t, c.lo, c.hi, ties.data(), s);
                case 3: return fused_range<1, I, O, true>(P, t, c.lo, c.hi, ties.data(), s);
                case 4: return fused_range<2, I, O, false>(P, t, c.lo, c.hi, ties.data(), s);
                case 5: return fused_range<2, I, O, true>(P, t, c.lo, c.hi, ties.data(), s);
                case 6: return fused_range<3, I, O, false>(P, t, c.lo, c.hi, ties.data(), s);
                case 7: return fused_range<3, I, O, true>(P, t, c.lo, c.hi, ties.data(), s);
                case 8: return fused_range<4, I, O, false>(P, t, c.lo, c.hi, ties.data(), s);
                default: return fused_range<4, I, O, true>(P, t, c.lo, c.hi, ties.data(), s);
            }
        }
        if (simple) {
            switch (K) {
                case 1:
                    return fused_merge<1, I, O>(P, t, c.lo, c.hi, ties.data(), s);
                case 2:
                    return fused_merge<2, I, O>(P, t, c.lo, c.hi, ties.data(), s);
                case 3:
                    return fused_merge<3, I, O>(P, t, c.lo, c.hi, ties.data(), s);
                default:
                    return fused_merge<4, I, O>(P, t, c.lo, c.hi, ties.data(), s);
            }
        }
    }
#endif
    for (int64_t s0 = c.lo; s0 < c.hi; s0 += std::max<int64_t>(slab, 1)) {
        const int64_t s1 = std::min(c.hi, s0 + std::max<int64_t>(slab, 1));
        const int32_t* rank_slab = nullptr;
        if (della && (pass == Pass::kMerge || pass == Pass::kSums)) {
            // keys of the slab for every model, then row ranks
            const int64_t ne = s1 - s0;
            std::vector<uint32_t> keys(static_cast<size_t>(K) * ne);
            s.rank.resize(static_cast<size_t>(K) * ne);
            for (int64_t e = s0; e < s1; e += kBlk) {
                const int64_t m = std::min(kBlk, s1 - e);
                load_block<I, V>(P, t, e, m, s);
                for (int k = 0; k < K; ++k)
                    std::memcpy(keys.data() + k * ne + (e - s0), s.key.data() + k * kBlk,
                                static_cast<size_t>(m) * 4);
            }
            const int digits = P.wide ? 4 : 2;
            for (int k = 0; k < K; ++k) {
                if (P.sel[static_cast<size_t>(t) * K + k].mode != Keep::kDella) continue;
                for (int64_t bcol = 0; bcol < B; ++bcol)
                    row_ranks(keys.data() + k * ne + bcol, C, B, s.rank.data() + k * ne + bcol, s,
                              digits);
            }
            rank_slab = s.rank.data();
        }
        for (int64_t e = s0; e < s1; e += kBlk) {
            const int64_t m = std::min(kBlk, s1 - e);
            load_block<I, V>(P, t, e, m, s);
            if (pass == Pass::kWindow) {
                for (int k = 0; k < K; ++k) {
                    const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
                    if (sl.mode != Keep::kRange || !sl.win) continue;
                    const uint32_t* key = s.key.data() + k * kBlk;
                    for (int j = 0; j < 2; ++j) {
                        if (j == 0 ? sl.lo_open : sl.hi_open) continue;
                        const uint32_t lo = sl.wlo[j], hi = sl.whi[j];
                        const size_t slot = (ci * K + k) * 2 + j;
                        uint32_t* h = S.hw.data() + S.hw_off[slot];
                        uint8_t* f = s.tie.data();
                        uint32_t above = 0;
                        for (int64_t i = 0; i < m; ++i) {
                            above += key[i] > hi ? 1u : 0u;
                            f[i] = static_cast<uint8_t>((key[i] >= lo) & (key[i] <= hi));
                        }
                        S.above[slot] += above;
                        for (int64_t w = 0; w < m; w += 8) {
                            uint64_t word;
                            std::memcpy(&word, f + w, 8);
                            while (word != 0) {
                                const int64_t i = w + (__builtin_ctzll(word) >> 3);
                                word &= word - 1;
                                if (i >= m) break;
                                ++h[key[i] - lo];
                            }
                        }
                    }
                }
                continue;
            }
            if (pass == Pass::kHist0) {
                const int sh = P.wide ? 15 : 0;
                for (int k = 0; k < K; ++k) {
                    const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
                    if (sl.mode != Keep::kRange || !sl.full) continue;
                    uint32_t* h = h0 + k * S.B0;
                    const uint32_t* key = s.key.data() + k * kBlk;
                    for (int64_t i = 0; i < m; ++i) ++h[key[i] >> sh];
                }
                continue;
            }
            if (pass == Pass::kHist1) {
                for (int k = 0; k < K; ++k) {
                    const Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
                    if (sl.mode != Keep::kRange || !sl.full) continue;
                    uint32_t* ha = h1 + (k * 2 + 0) * 32768;
                    uint32_t* hb = h1 + (k * 2 + 1) * 32768;
                    const uint32_t* key = s.key.data() + k * kBlk;
                    for (int64_t i = 0; i < m; ++i) {
                        const uint32_t hi = key[i] >> 15, low = key[i] & 0x7FFFu;
                        if (hi == sl.bucket[0]) ++ha[low];
                        if (hi == sl.bucket[1]) ++hb[low];
                    }
                }
                continue;
            }
            // rank pointer for this block: [K][m] staged from the slab's [K][ne]
            const int32_t* rk = nullptr;
            std::vector<int32_t> rblock;
            if (rank_slab != nullptr) {
                const int64_t ne = s1 - s0;
                rblock.resize(static_cast<size_t>(K) * m);
                for (int k = 0; k < K; ++k)
                    std::memcpy(rblock.data() + k * m, rank_slab + k * ne + (e - s0),
                                static_cast<size_t>(m) * 4);
                rk = rblock.data();
            }
            masks<V>(P, t, e, m, s, ties.data(), rk);
            if (pass == Pass::kSums)
                sums_block(P, m, s, la, lk);
            else
                switch (K) {
                    case 1:
                        merge_k<V, 1, O>(P, t, m, s, out + e);
                        break;
                    case 2:
                        merge_k<V, 2, O>(P, t, m, s, out + e);
                        break;
                    case 3:
                        merge_k<V, 3, O>(P, t, m, s, out + e);
                        break;
                    case 4:
                        merge_k<V, 4, O>(P, t, m, s, out + e);
                        break;
                    default:
                        merge_store<O>(P, t, m, s, out + e);
                }
        }
    }
    if (pass == Pass::kSums) {
        for (int k = 0; k < K; ++k) {
            double a = 0.0, b = 0.0;
            for (int j = 0; j < kLanes; ++j) {
                a += la[k * kLanes + j];
                b += lk[k * kLanes + j];
            }
            S.sum_all[ci * K + k] = a;
            S.sum_kept[ci * K + k] = b;
        }
    }
}

using ChunkFn = void (*)(Shared&, size_t, Pass, Scratch&);

template <class I, class O>
void chunk_scalar(Shared& S, size_t ci, Pass pass, Scratch& s) {
    run_chunk<false, I, O>(S, ci, pass, s);
}

#if PYMERGE_TV_X86
template <class I, class O>
PYMERGE_TV_AVX2 void chunk_avx2(Shared& S, size_t ci, Pass pass, Scratch& s) {
    run_chunk<true, I, O>(S, ci, pass, s);
}
#endif

template <class I, class O>
ChunkFn pick_isa(bool avx2) {
#if PYMERGE_TV_X86
    if (avx2) return &chunk_avx2<I, O>;
#endif
    (void)avx2;
    return &chunk_scalar<I, O>;
}

template <class I>
ChunkFn pick_out(Dt out, bool avx2) {
    switch (out) {
        case Dt::kF32:
            return pick_isa<I, F32>(avx2);
        case Dt::kF16:
            return pick_isa<I, F16>(avx2);
        default:
            return pick_isa<I, BF16>(avx2);
    }
}

ChunkFn pick(Dt in, Dt out, bool avx2) {
    switch (in) {
        case Dt::kF32:
            return pick_out<F32>(out, avx2);
        case Dt::kF16:
            return pick_out<F16>(out, avx2);
        default:
            return pick_out<BF16>(out, avx2);
    }
}

bool avx2_supported() {
#if PYMERGE_TV_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

bool initial_avx2() {
    const char* env = std::getenv("PYMERGE_TV_SIMD");
    if (env != nullptr && std::string(env) == "scalar") return false;
    return avx2_supported();
}

std::atomic<bool> g_avx2{false};

const char* simd_name() {
    return !g_avx2.load() ? "scalar" : g_avx512.load() ? "avx512" : "avx2";
}

// fn(i) for i in [0, n), on up to `threads` threads taking items from a shared counter
template <class Fn>
void parallel(int64_t n, int threads, Fn fn) {
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
    std::atomic<int64_t> next{0};
    auto worker = [&]() {
        for (int64_t i = next++; i < n; i = next++) fn(i);
    };
    if (nt == 1) {
        worker();
        return;
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(nt - 1));
    for (int p = 1; p < nt; ++p) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
}

// Position p (0-based, ascending) in a histogram of `bins` counts: the bin holding it and
// the count of elements in the bins below.
std::pair<uint32_t, int64_t> locate(const uint32_t* h, int64_t bins, int64_t p) {
    int64_t below = 0;
    for (int64_t v = 0; v < bins; ++v) {
        if (below + h[v] > p) return {static_cast<uint32_t>(v), below};
        below += h[v];
    }
    throw std::logic_error("histogram position out of range");
}

// ------------------------------------------------------------------ selection
// Histograms of the chunks of tensor t summed, for model k (level 0: [B0]; level 1: the two
// [32768] of bucket j).
void sum_hist(const Shared& S, const std::vector<size_t>& cs, int k, int level, int j,
              std::vector<uint32_t>& dst) {
    const int64_t bins = level == 0 ? S.B0 : 32768;
    dst.assign(static_cast<size_t>(bins), 0u);
    for (size_t ci : cs) {
        const uint32_t* h = level == 0 ? S.h0.data() + S.h0_off[ci] + k * S.B0
                                       : S.h1.data() + S.h1_off[ci] + (k * 2 + j) * 32768;
        for (int64_t v = 0; v < bins; ++v) dst[v] += h[v];
    }
}

// Small tensors: sort (key, index) pairs of every model whose selection is a range.
template <class I>
void select_small(Plan& P, int64_t t, Scratch& s) {
    const int K = P.K;
    const int64_t n = P.n[t];
    s.ensure(K);
    std::vector<uint64_t> comp(static_cast<size_t>(K) * n);
    for (int64_t e = 0; e < n; e += kBlk) {
        const int64_t m = std::min(kBlk, n - e);
        load_block<I>(P, t, e, m, s);
        for (int k = 0; k < K; ++k)
            for (int64_t i = 0; i < m; ++i)
                comp[k * n + e + i] = (static_cast<uint64_t>(s.key[k * kBlk + i]) << 32) |
                                      static_cast<uint64_t>(e + i);
    }
    for (int k = 0; k < K; ++k) {
        Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
        if (sl.mode != Keep::kRange) continue;
        uint64_t* c = comp.data() + k * n;
        std::sort(c, c + n);
        auto first_of = [&](uint32_t v) {
            return std::lower_bound(c, c + n, static_cast<uint64_t>(v) << 32) - c;
        };
        if (!sl.lo_open) {
            sl.v0 = static_cast<uint32_t>(c[sl.P0] >> 32);
            sl.a0 = sl.P0 - first_of(sl.v0);
        }
        if (!sl.hi_open) {
            sl.v1 = static_cast<uint32_t>(c[sl.P1 - 1] >> 32);
            sl.b1 = (sl.P1 - 1) - first_of(sl.v1) + 1;
        }
    }
}

// ------------------------------------------------------------------ the call
struct Args {
    Dt din, dout;
    int threads;
};

constexpr int64_t kSampleBlocks = 256, kSampleLen = 128;  // 32768 sampled elements
constexpr int64_t kWindowMin = 8 * kSampleBlocks * kSampleLen;  // sample <= 1/8 of a tensor

// fp16/bf16 tensors of at least kWindowMin elements: sample 256 spread blocks of 128
// elements, and for each boundary take the key window that holds its position with a
// margin of 4.5 standard deviations of the sampled quantile (plus 8 ranks). One pass then
// counts the keys above each window and histograms the keys inside it; a boundary whose
// position falls outside its window (a skewed sample) is selected by full histograms.
// The key of rank r (0-based, ascending) among the ns 15-bit sampled keys c, given hist, the
// counts of their top 8 bits: the bucket holding rank r, then a histogram of the low 7 bits
// of the keys in it (branch-free: the bucket is often a dense one).
uint32_t sample_rank(const int64_t* hist, const uint32_t* c, int64_t ns, int64_t r) {
    int64_t below = 0;
    uint32_t b = 0;
    while (below + hist[b] <= r) below += hist[b++];
    int64_t low[128] = {};
    for (int64_t i = 0; i < ns; ++i) low[c[i] & 127u] += (c[i] >> 7) == b ? 1 : 0;
    uint32_t v = 0;
    while (below + low[v] <= r) below += low[v++];
    return (b << 7) | v;
}

template <class I, bool V>
PYMERGE_TV_INLINE void plan_windows_impl(Plan& P, int64_t t, Scratch& s) {
    const int K = P.K;
    const int64_t n = P.n[t], ns = kSampleBlocks * kSampleLen;
    s.ensure(K);
    std::vector<uint32_t> keys(static_cast<size_t>(K) * ns);
    int64_t hist[256];
    uint32_t part[4][256];  // four partial histograms: no chain of increments on one bin
    auto start_of = [&](int64_t j) { return j * (n - kSampleLen) / (kSampleBlocks - 1); };
    constexpr int64_t kAhead = 8;  // the blocks are pages apart: prefetch a few blocks ahead
    auto prefetch = [&](int64_t j) {
        const int64_t e = start_of(j) * static_cast<int64_t>(sizeof(typename I::S));
        constexpr int64_t bytes = kSampleLen * static_cast<int64_t>(sizeof(typename I::S));
        for (int64_t o = 0; o < bytes; o += 64) {
            __builtin_prefetch(P.b[t] + e + o);
            for (int k = 0; k < K; ++k) __builtin_prefetch(P.x[static_cast<size_t>(k) * P.T + t] + e + o);
        }
    };
    for (int64_t j = 0; j < std::min(kAhead, kSampleBlocks); ++j) prefetch(j);
    for (int64_t j = 0; j < kSampleBlocks; ++j) {
        if (j + kAhead < kSampleBlocks) prefetch(j + kAhead);
        const int64_t start = start_of(j);
        load_block<I, V>(P, t, start, kSampleLen, s);
        for (int k = 0; k < K; ++k)
            std::memcpy(keys.data() + k * ns + j * kSampleLen, s.key.data() + k * kBlk,
                        kSampleLen * 4);
    }
    for (int k = 0; k < K; ++k) {
        Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
        if (sl.mode != Keep::kRange) continue;
        sl.win = true;
        const uint32_t* c = keys.data() + k * ns;
        std::memset(part, 0, sizeof part);
        for (int64_t i = 0; i + 4 <= ns; i += 4)
            for (int u = 0; u < 4; ++u) ++part[u][c[i + u] >> 7];
        for (int v = 0; v < 256; ++v) hist[v] = int64_t{part[0][v]} + part[1][v] + part[2][v] + part[3][v];
        for (int j = 0; j < 2; ++j) {
            if (j == 0 ? sl.lo_open : sl.hi_open) continue;
            const double q = static_cast<double>(j == 0 ? sl.P0 : sl.P1 - 1) / n;
            const double r = q * ns, margin = 4.5 * std::sqrt(ns * q * (1.0 - q)) + 8.0;
            const int64_t lo = static_cast<int64_t>(std::floor(r - margin));
            const int64_t hi = static_cast<int64_t>(std::ceil(r + margin));
            sl.wlo[j] = lo < 0 ? 0u : sample_rank(hist, c, ns, lo);
            sl.whi[j] = hi >= ns ? 0x7FFFu : sample_rank(hist, c, ns, hi);
        }
    }
}

template <class I>
void plan_windows_scalar(Plan& P, int64_t t, Scratch& s) {
    plan_windows_impl<I, false>(P, t, s);
}

#if PYMERGE_TV_X86
template <class I>
PYMERGE_TV_AVX2 void plan_windows_avx2(Plan& P, int64_t t, Scratch& s) {
    plan_windows_impl<I, true>(P, t, s);
}
#endif

// the same keys either way (the AVX2 loads give the portable loops' bits)
template <class I>
void plan_windows(Plan& P, int64_t t, Scratch& s) {
#if PYMERGE_TV_X86
    if (g_avx2.load()) return plan_windows_avx2<I>(P, t, s);
#endif
    plan_windows_scalar<I>(P, t, s);
}

template <class I>
void select_all(Shared& S, ChunkFn fn, const Args& a) {
    Plan& P = *S.P;
    const int K = P.K;
    auto sel = [&](int64_t t, int k) -> Sel& { return P.sel[static_cast<size_t>(t) * K + k]; };
    const bool prof = std::getenv("PYMERGE_TV_PROFILE") != nullptr;
    auto tp = std::chrono::steady_clock::now();
    auto mark = [&](const char* what) {
        if (!prof) return;
        const auto t1 = std::chrono::steady_clock::now();
        std::fprintf(stderr, "  %s %.1f ms\n", what,
                     std::chrono::duration<double, std::milli>(t1 - tp).count());
        tp = t1;
    };
    std::vector<std::vector<size_t>> of_tensor(static_cast<size_t>(P.T));
    for (size_t ci = 0; ci < S.chunks.size(); ++ci) of_tensor[S.chunks[ci].t].push_back(ci);
    std::vector<int64_t> small_t, window_t, large_t;
    for (int64_t t = 0; t < P.T; ++t) {
        bool any = false;
        for (int k = 0; k < K; ++k) any |= sel(t, k).mode == Keep::kRange;
        if (!any) continue;
        if (P.n[t] <= kSmall)
            small_t.push_back(t);
        else if (!P.wide && P.n[t] >= kWindowMin)
            window_t.push_back(t);
        else
            large_t.push_back(t);
    }
    for (int64_t t : large_t)
        for (int k = 0; k < K; ++k) sel(t, k).full = sel(t, k).mode == Keep::kRange;
    // windows: sample, then one counting pass (the small tensors sort meanwhile)
    parallel(static_cast<int64_t>(window_t.size()), a.threads, [&](int64_t i) {
        thread_local Scratch local;
        plan_windows<I>(P, window_t[i], local);
    });
    mark("sample");
    std::vector<size_t> win_chunks;
    for (int64_t t : window_t)
        for (size_t ci : of_tensor[t]) win_chunks.push_back(ci);
    S.hw_off.assign(S.chunks.size() * K * 2, 0);
    S.above.assign(S.chunks.size() * K * 2, 0);
    int64_t hw_total = 0;
    for (size_t ci : win_chunks)
        for (int k = 0; k < K; ++k)
            for (int j = 0; j < 2; ++j) {
                const Sel& sl = sel(S.chunks[ci].t, k);
                S.hw_off[(ci * K + k) * 2 + j] = hw_total;
                if (sl.win && !(j == 0 ? sl.lo_open : sl.hi_open))
                    hw_total += static_cast<int64_t>(sl.whi[j] - sl.wlo[j]) + 1;
            }
    S.hw.assign(static_cast<size_t>(hw_total), 0u);
    mark("alloc");
    const int64_t n_first = static_cast<int64_t>(win_chunks.size() + small_t.size());
    parallel(n_first, a.threads, [&](int64_t i) {
        thread_local Scratch local;
        if (i < static_cast<int64_t>(win_chunks.size()))
            fn(S, win_chunks[i], Pass::kWindow, local);
        else
            select_small<I>(P, small_t[i - win_chunks.size()], local);
    });
    mark("window pass");
    // resolve the windows; a position outside its window: full histograms for that model
    std::vector<int64_t> fallback_t;
    for (int64_t t : window_t) {
        bool any_full = false;
        for (int k = 0; k < K; ++k) {
            Sel& sl = sel(t, k);
            if (!sl.win) continue;
            for (int j = 0; j < 2 && sl.win; ++j) {
                if (j == 0 ? sl.lo_open : sl.hi_open) continue;
                const int64_t bins = static_cast<int64_t>(sl.whi[j] - sl.wlo[j]) + 1;
                std::vector<uint32_t> h(static_cast<size_t>(bins), 0u);
                int64_t above = 0;
                for (size_t ci : of_tensor[t]) {
                    const size_t slot = (ci * K + k) * 2 + j;
                    const uint32_t* hc = S.hw.data() + S.hw_off[slot];
                    for (int64_t v = 0; v < bins; ++v) h[v] += hc[v];
                    above += S.above[slot];
                }
                int64_t inside = 0;
                for (int64_t v = 0; v < bins; ++v) inside += h[v];
                const int64_t below = P.n[t] - above - inside;
                const int64_t pos = j == 0 ? sl.P0 : sl.P1 - 1;
                if (pos < below || pos >= below + inside) {
                    sl.win = false;  // the sample missed: select this model exactly below
                    sl.full = true;
                    any_full = true;
                    break;
                }
                const auto [v, in_below] = locate(h.data(), bins, pos - below);
                if (j == 0) {
                    sl.v0 = sl.wlo[0] + v;
                    sl.a0 = pos - (below + in_below);
                } else {
                    sl.v1 = sl.wlo[1] + v;
                    sl.b1 = pos - (below + in_below) + 1;
                }
            }
        }
        if (any_full) fallback_t.push_back(t);
    }
    for (int64_t t : fallback_t) large_t.push_back(t);
    mark("resolve");
    if (std::getenv("PYMERGE_TV_PROFILE") != nullptr)
        std::fprintf(stderr, "task_vectors: %zu windowed, %zu fell back, %zu by full histograms, "
                     "%zu sorted\n", window_t.size(), fallback_t.size(), large_t.size(),
                     small_t.size());
    // full histograms: level 0 (16-bit keys: exact; fp32: the top 16 bits)
    std::vector<size_t> hist_chunks;
    for (int64_t t : large_t)
        for (size_t ci : of_tensor[t]) hist_chunks.push_back(ci);
    S.B0 = P.wide ? 65536 : 32768;
    S.h0_off.assign(S.chunks.size(), 0);
    int64_t h0_total = 0;
    for (size_t ci : hist_chunks) {
        S.h0_off[ci] = h0_total;
        h0_total += K * S.B0;
    }
    S.h0.assign(static_cast<size_t>(h0_total), 0u);
    parallel(static_cast<int64_t>(hist_chunks.size()), a.threads, [&](int64_t i) {
        thread_local Scratch local;
        fn(S, hist_chunks[i], Pass::kHist0, local);
    });
    parallel(static_cast<int64_t>(large_t.size()) * K, a.threads, [&](int64_t i) {
        const int64_t t = large_t[i / K];
        Sel& sl = sel(t, static_cast<int>(i % K));
        if (sl.mode != Keep::kRange || !sl.full) return;
        std::vector<uint32_t> h;
        sum_hist(S, of_tensor[t], static_cast<int>(i % K), 0, 0, h);
        for (int j = 0; j < 2; ++j) {
            if (j == 0 ? sl.lo_open : sl.hi_open) continue;
            const int64_t pos = j == 0 ? sl.P0 : sl.P1 - 1;
            const auto [b, below] = locate(h.data(), S.B0, pos);
            if (P.wide) {
                sl.bucket[j] = b;
                sl.rem[j] = pos - below;
            } else if (j == 0) {
                sl.v0 = b;
                sl.a0 = pos - below;
            } else {
                sl.v1 = b;
                sl.b1 = pos - below + 1;
            }
        }
    });
    if (P.wide && !large_t.empty()) {  // level 1: the low 15 bits inside the buckets
        S.h1_off.assign(S.chunks.size(), 0);
        int64_t h1_total = 0;
        for (size_t ci : hist_chunks) {
            S.h1_off[ci] = h1_total;
            h1_total += K * 2 * 32768;
        }
        S.h1.assign(static_cast<size_t>(h1_total), 0u);
        parallel(static_cast<int64_t>(hist_chunks.size()), a.threads, [&](int64_t i) {
            thread_local Scratch local;
            fn(S, hist_chunks[i], Pass::kHist1, local);
        });
        parallel(static_cast<int64_t>(large_t.size()) * K, a.threads, [&](int64_t i) {
            const int64_t t = large_t[i / K];
            const int k = static_cast<int>(i % K);
            Sel& sl = sel(t, k);
            if (sl.mode != Keep::kRange || !sl.full) return;
            std::vector<uint32_t> h;
            for (int j = 0; j < 2; ++j) {
                if (j == 0 ? sl.lo_open : sl.hi_open) continue;
                sum_hist(S, of_tensor[t], k, 1, j, h);
                const auto [low, inside] = locate(h.data(), 32768, sl.rem[j]);
                if (j == 0) {
                    sl.v0 = (sl.bucket[0] << 15) | low;
                    sl.a0 = sl.rem[0] - inside;
                } else {
                    sl.v1 = (sl.bucket[1] << 15) | low;
                    sl.b1 = sl.rem[1] - inside + 1;
                }
            }
        });
    }
    mark("full hist");
    // tie ordinals before each chunk, from the per-chunk histograms that found the boundary
    S.tie0.assign(S.chunks.size() * K, 0);
    S.tie1.assign(S.chunks.size() * K, 0);
    for (int64_t t = 0; t < P.T; ++t) {
        if (of_tensor[t].size() < 2) continue;
        for (int k = 0; k < K; ++k) {
            const Sel& sl = sel(t, k);
            if (sl.mode != Keep::kRange) continue;
            int64_t c0 = 0, c1 = 0;
            for (size_t ci : of_tensor[t]) {
                S.tie0[ci * K + k] = c0;
                S.tie1[ci * K + k] = c1;
                if (sl.win) {
                    const size_t slot = (ci * K + k) * 2;
                    if (!sl.lo_open) c0 += S.hw[S.hw_off[slot] + (sl.v0 - sl.wlo[0])];
                    if (!sl.hi_open) c1 += S.hw[S.hw_off[slot + 1] + (sl.v1 - sl.wlo[1])];
                } else if (!P.wide) {
                    const uint32_t* h = S.h0.data() + S.h0_off[ci] + k * S.B0;
                    if (!sl.lo_open) c0 += h[sl.v0];
                    if (!sl.hi_open) c1 += h[sl.v1];
                } else {
                    const uint32_t* h = S.h1.data() + S.h1_off[ci] + k * 2 * 32768;
                    if (!sl.lo_open) c0 += h[sl.v0 & 0x7FFFu];
                    if (!sl.hi_open) c1 += h[32768 + (sl.v1 & 0x7FFFu)];
                }
            }
        }
    }
    for (auto* v : {&S.h0, &S.h1, &S.hw}) {
        v->clear();
        v->shrink_to_fit();
    }
    mark("ties+free");
}

void run(Plan& P, const Args& a) {
    Shared S;
    S.P = &P;
    const int K = P.K;
    // chunks: fixed size, DELLA's aligned to slabs (whole [C, B] blocks of dim 0)
    for (int64_t t = 0; t < P.T; ++t) {
        const int64_t n = P.n[t];
        if (n == 0) continue;
        int64_t step = kChunk;
        if (P.sp == Sp::kDella) {
            const int64_t slab = std::max<int64_t>(1, P.rows[t] * P.inner[t]);
            step = std::max<int64_t>(1, kChunk / slab) * slab;
        }
        if (n <= kSmall) step = n;
        int64_t idx = 0;
        for (int64_t lo = 0; lo < n; lo += step, ++idx)
            S.chunks.push_back(Chunk{t, lo, std::min(n, lo + step), idx, n <= kSmall});
    }
    const ChunkFn fn = [&]() {
        switch (a.din) {
            case Dt::kF32:
                return pick(Dt::kF32, a.dout, g_avx2.load());
            case Dt::kF16:
                return pick(Dt::kF16, a.dout, g_avx2.load());
            default:
                return pick(Dt::kBF16, a.dout, g_avx2.load());
        }
    }();
    const bool range = P.sp == Sp::kMagnitude || P.sp == Sp::kOutliers;
    const bool prof = std::getenv("PYMERGE_TV_PROFILE") != nullptr;
    auto now = []() { return std::chrono::steady_clock::now(); };
    auto t_start = now();
    if (range) {
        switch (a.din) {
            case Dt::kF32:
                select_all<F32>(S, fn, a);
                break;
            case Dt::kF16:
                select_all<F16>(S, fn, a);
                break;
            default:
                select_all<BF16>(S, fn, a);
                break;
        }
    }
    bool any_rescale = false;
    for (int64_t t = 0; t < P.T; ++t) any_rescale |= P.resc[t] != 0;
    const int64_t nc = static_cast<int64_t>(S.chunks.size());
    if (any_rescale && P.sp != Sp::kNone) {
        S.sum_all.assign(S.chunks.size() * K, 0.0);
        S.sum_kept.assign(S.chunks.size() * K, 0.0);
        parallel(nc, a.threads, [&](int64_t i) {
            const Chunk& c = S.chunks[i];
            if (!P.resc[c.t]) return;
            thread_local Scratch local;
            fn(S, static_cast<size_t>(i), Pass::kSums, local);
        });
        // per tensor, chunks in order
        std::vector<double> all(static_cast<size_t>(P.T) * K, 0.0),
            kept(static_cast<size_t>(P.T) * K, 0.0);
        for (size_t ci = 0; ci < S.chunks.size(); ++ci)
            for (int k = 0; k < K; ++k) {
                all[S.chunks[ci].t * K + k] += S.sum_all[ci * K + k];
                kept[S.chunks[ci].t * K + k] += S.sum_kept[ci * K + k];
            }
        for (int64_t t = 0; t < P.T; ++t) {
            if (!P.resc[t]) continue;
            for (int k = 0; k < K; ++k) {
                Sel& sl = P.sel[static_cast<size_t>(t) * K + k];
                if (sl.mode == Keep::kAll) continue;
                const double before = all[t * K + k], after = kept[t * K + k];
                P.s_all[t * K + k] = before;
                P.s_kept[t * K + k] = after;
                if (!(before < 1e-7 || after < 1e-7))
                    sl.scale = static_cast<float>(before / after);
            }
        }
    }
    auto t_sel = now();
    parallel(nc, a.threads, [&](int64_t i) {
        thread_local Scratch local;
        fn(S, static_cast<size_t>(i), Pass::kMerge, local);
    });
    if (prof) {
        const auto ms = [](auto a, auto b) {
            return std::chrono::duration<double, std::milli>(b - a).count();
        };
        std::fprintf(stderr, "task_vectors: select+sums %.1f ms, merge %.1f ms\n",
                     ms(t_start, t_sel), ms(t_sel, now()));
    }
}

Sp parse_sparsify(py::handle h) {
    if (!PyUnicode_Check(h.ptr()))
        throw py::type_error("sparsify must be a string, got " + std::string(py::repr(h)));
    const std::string s = h.cast<std::string>();
    if (s == "none") return Sp::kNone;
    if (s == "magnitude") return Sp::kMagnitude;
    if (s == "magnitude_outliers") return Sp::kOutliers;
    if (s == "random") return Sp::kRandom;
    if (s == "della_magprune") return Sp::kDella;
    throw py::value_error("sparsify must be 'none', 'magnitude', 'magnitude_outliers', "
                          "'random' or 'della_magprune', got '" + s + "'");
}

std::vector<double> floats_n(py::handle h, const char* what, size_t n) {
    std::vector<double> v = floats(h, what);
    if (v.size() != n)
        throw py::value_error(std::string(what) + " has " + std::to_string(v.size()) +
                              " entries, expected " + std::to_string(n));
    for (size_t i = 0; i < n; ++i)
        if (!std::isfinite(v[i]))
            throw py::value_error(Where{what, static_cast<int64_t>(i)}.str() + " = " +
                                  std::to_string(v[i]) + " is not finite");
    return v;
}

std::vector<int64_t> ints_n(py::handle h, const char* what, size_t n, long long lo,
                            long long hi) {
    const std::vector<py::object> xs = items(h, Where{what});
    if (xs.size() != n)
        throw py::value_error(std::string(what) + " has " + std::to_string(xs.size()) +
                              " entries, expected " + std::to_string(n));
    std::vector<int64_t> out(n);
    for (size_t i = 0; i < n; ++i) {
        const std::string w = Where{what, static_cast<int64_t>(i)}.str();
        out[i] = pymerge_py::checked_int(xs[i], w.c_str(), lo, hi);
    }
    return out;
}

std::vector<uint64_t> streams_n(py::handle h, size_t n) {
    const std::vector<py::object> xs = items(h, Where{"streams"});
    if (xs.size() != n)
        throw py::value_error("streams has " + std::to_string(xs.size()) + " entries, expected " +
                              std::to_string(n));
    std::vector<uint64_t> out(n);
    for (size_t i = 0; i < n; ++i) {
        if (PyBool_Check(xs[i].ptr()) || !PyLong_Check(xs[i].ptr()))
            throw py::type_error(Where{"streams", static_cast<int64_t>(i)}.str() +
                                 " must be an int in [0, 2**64)");
        const unsigned long long v = PyLong_AsUnsignedLongLong(xs[i].ptr());
        if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
            PyErr_Clear();
            throw py::value_error(Where{"streams", static_cast<int64_t>(i)}.str() +
                                  " is out of range [0, 2**64)");
        }
        out[i] = v;
    }
    return out;
}

void merge(py::handle models_h, py::handle base_h, py::handle out_h, py::handle sparsify_h,
           bool consensus, py::handle weights_h, py::handle dens_h, py::handle gam_h,
           py::handle eps_h, py::handle lam_h, py::handle norm_h, py::handle resc_h,
           py::handle streams_h, py::handle rows_h, py::handle inner_h, py::handle in_dtype,
           py::handle out_dtype, py::handle threads_h) {
    Plan P;
    P.sp = parse_sparsify(sparsify_h);
    P.consensus = consensus;
    Args a{dtype_arg(in_dtype, "in_dtype"), dtype_arg(out_dtype, "out_dtype"),
           static_cast<int>(pymerge_py::checked_int(threads_h, "threads", 1, kMaxThreads))};
    P.wide = a.din == Dt::kF32;
    const std::vector<py::object> bases = items(base_h, Where{"base"});
    const std::vector<py::object> lists = items(models_h, Where{"models"});
    const int64_t T = static_cast<int64_t>(bases.size());
    const int64_t K = static_cast<int64_t>(lists.size());
    if (K == 0) throw py::value_error("models is empty: need at least one list of tensors");
    if (K > (1 << 16)) throw py::value_error("more than 65536 models");
    P.T = T;
    P.K = static_cast<int>(K);
    const int64_t isz = elem_size(elem_of(a.din)), osz = elem_size(elem_of(a.dout));
    P.b.resize(T);
    P.n.resize(T);
    for (int64_t t = 0; t < T; ++t) {
        const Buf b = read_buffer(bases[t], elem_of(a.din), false, Where{"base", t});
        P.b[t] = b.data;
        P.n[t] = b.numel;
    }
    std::vector<std::vector<py::object>> rows_items(static_cast<size_t>(K));
    P.x.resize(static_cast<size_t>(K * T));
    for (int64_t k = 0; k < K; ++k) {
        rows_items[k] = items(lists[k], Where{"models", k});
        if (static_cast<int64_t>(rows_items[k].size()) != T)
            throw py::value_error("models[" + std::to_string(k) + "] has " +
                                  std::to_string(rows_items[k].size()) + " buffers, base has " +
                                  std::to_string(T));
        for (int64_t t = 0; t < T; ++t) {
            const Buf b = read_buffer(rows_items[k][t], elem_of(a.din), false, Where{"models", k, t});
            if (b.numel != P.n[t])
                throw py::value_error("models[" + std::to_string(k) + "][" + std::to_string(t) +
                                      "] has " + std::to_string(b.numel) + " elements, base[" +
                                      std::to_string(t) + "] has " + std::to_string(P.n[t]));
            P.x[k * T + t] = b.data;
        }
    }
    int64_t total = 0;
    for (int64_t t = 0; t < T; ++t) total += P.n[t];
    const Buf o = read_buffer(out_h, elem_of(a.dout), true, Where{"out"});
    if (o.numel != total)
        throw py::value_error("out has " + std::to_string(o.numel) + " elements, the " +
                              std::to_string(T) + " tensors of base have " +
                              std::to_string(total));
    for (int64_t t = 0; t < T; ++t) {
        if (overlap(P.b[t], P.n[t] * isz, o.data, total * osz))
            throw py::value_error("out overlaps base[" + std::to_string(t) + "]");
        for (int64_t k = 0; k < K; ++k)
            if (overlap(P.x[k * T + t], P.n[t] * isz, o.data, total * osz))
                throw py::value_error("out overlaps models[" + std::to_string(k) + "][" +
                                      std::to_string(t) + "]");
    }
    P.out.resize(T);
    for (int64_t t = 0, off = 0; t < T; off += P.n[t], ++t) P.out[t] = o.data + off * osz;
    const size_t TK = static_cast<size_t>(T * K);
    const std::vector<double> w = floats_n(weights_h, "weights", TK);
    const std::vector<double> dens = floats_n(dens_h, "densities", TK);
    const std::vector<double> gam = floats_n(gam_h, "gammas", TK);
    const std::vector<double> eps = floats_n(eps_h, "epsilons", TK);
    const std::vector<double> lam = floats_n(lam_h, "lambdas", static_cast<size_t>(T));
    const std::vector<int64_t> nrm = ints_n(norm_h, "normalize", static_cast<size_t>(T), 0, 1);
    const std::vector<int64_t> rsc = ints_n(resc_h, "rescale", static_cast<size_t>(T), 0, 1);
    P.stream = streams_n(streams_h, static_cast<size_t>(T));
    constexpr long long kBig = std::numeric_limits<int64_t>::max();
    P.rows = ints_n(rows_h, "rows", static_cast<size_t>(T), 1, kBig);
    P.inner = ints_n(inner_h, "inner", static_cast<size_t>(T), 1, kBig);
    P.w.assign(w.begin(), w.end());
    P.lam.assign(lam.begin(), lam.end());
    P.norm.assign(nrm.begin(), nrm.end());
    P.resc.assign(rsc.begin(), rsc.end());
    P.wsum.assign(static_cast<size_t>(T), 0.0f);
    P.sel.resize(TK);
    P.s_all.assign(TK, 0.0);
    P.s_kept.assign(TK, 0.0);
    for (int64_t t = 0; t < T; ++t) {
        const int64_t n = P.n[t];
        if (P.sp == Sp::kDella && n > 0 && (n % (P.rows[t] * P.inner[t]) != 0))
            throw py::value_error("rows[" + std::to_string(t) + "] * inner[" + std::to_string(t) +
                                  "] does not divide the tensor's " + std::to_string(n) +
                                  " elements");
        float ws = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
            const size_t i = static_cast<size_t>(t * K + k);
            ws += P.w[i];
            const double d = dens[i];
            if (!(d > 0.0 && d <= 1.0) && P.sp != Sp::kNone)
                throw py::value_error(Where{"densities", static_cast<int64_t>(i)}.str() + " = " +
                                      std::to_string(d) + " is outside (0, 1]");
            Sel& s = P.sel[i];
            s.mode = Keep::kAll;
            if (P.sp == Sp::kNone || d >= 1.0 || n == 0) continue;
            if (P.sp == Sp::kMagnitude) {
                const int64_t kc = std::max<int64_t>(1, static_cast<int64_t>(d * static_cast<double>(n)));
                s.mode = Keep::kRange;
                s.P0 = n - std::min(kc, n);
                s.P1 = n;
                if (s.P0 == 0) s.mode = Keep::kAll;
            } else if (P.sp == Sp::kOutliers) {
                const int64_t target = static_cast<int64_t>(d * static_cast<double>(n));
                const int64_t top = static_cast<int64_t>(gam[i] * static_cast<double>(n));
                if (gam[i] < 0.0 || gam[i] > 1.0)
                    throw py::value_error(Where{"gammas", static_cast<int64_t>(i)}.str() +
                                          " is outside [0, 1]");
                const int64_t bot = std::max<int64_t>(0, n - target - top);
                s.P0 = bot;
                s.P1 = std::min(n, bot + target);
                s.mode = s.P0 < s.P1 ? Keep::kRange : Keep::kNothing;
                if (s.P0 == 0 && s.P1 == n) s.mode = Keep::kAll;
            } else if (P.sp == Sp::kRandom) {
                s.mode = Keep::kRandom;
                s.d = static_cast<float>(d);
            } else {
                if (d + eps[i] >= 1.0 || d - eps[i] <= 0.0)
                    throw py::value_error(Where{"epsilons", static_cast<int64_t>(i)}.str() +
                                          ": density +/- epsilon must lie in (0, 1)");
                s.mode = Keep::kDella;
                s.d = static_cast<float>(d);
                s.lo = static_cast<float>(d - eps[i]);
                s.eps = static_cast<float>(eps[i]);
            }
        }
        P.wsum[t] = ws;
    }
    for (Sel& s : P.sel) {
        if (s.mode != Keep::kRange) continue;
        s.lo_open = s.P0 == 0;
        s.hi_open = s.P1 == P.n[&s - P.sel.data() >= 0 ? (&s - P.sel.data()) / K : 0];
        if (s.hi_open) {
            s.v1 = 0xFFFFFFFFu;
            s.b1 = 0;
        }
    }
    py::gil_scoped_release nogil;
    run(P, a);
}

// Test hook: out[i] = u(stream, offset + i) (float32 buffer).
void uniform(py::handle stream_h, py::handle offset_h, py::handle out_h) {
    const std::vector<uint64_t> s = streams_n(py::make_tuple(stream_h), 1);
    const long long off = pymerge_py::checked_int(offset_h, "offset", 0,
                                                  std::numeric_limits<int64_t>::max());
    const Buf o = read_buffer(out_h, Elem::kF32, true, Where{"out"});
    auto* p = reinterpret_cast<float*>(o.data);
    for (int64_t i = 0; i < o.numel; ++i)
        p[i] = uniform_at(s[0], static_cast<uint64_t>(off + i));
}

}  // namespace
}  // namespace pymerge_tv

PYBIND11_MODULE(_task_vectors, m) {
    using namespace pymerge_tv;
    m.doc() = "Fused task-vector merges (TIES, DARE, breadcrumbs, DELLA, task arithmetic) on "
              "checked CPU buffers.";
    g_avx2.store(initial_avx2());
    g_avx512.store(g_avx2.load() && initial_avx512());
    py::register_local_exception<NotContiguous>(m, "NotContiguousError", PyExc_ValueError);
    m.def("merge", &merge, py::arg("models"), py::arg("base"), py::arg("out"),
          py::arg("sparsify"), py::arg("consensus"), py::arg("weights"), py::arg("densities"),
          py::arg("gammas"), py::arg("epsilons"), py::arg("lambdas"), py::arg("normalize"),
          py::arg("rescale"), py::arg("streams"), py::arg("rows"), py::arg("inner"),
          py::arg("in_dtype"), py::arg("out_dtype"), py::arg("threads") = 1,
          R"doc(Task-vector merge of T CPU tensors of K models against a base, in one call.

models: K lists of T buffers; base: T buffers (same element counts); out: one writable
buffer receiving the T results back to back (no overlap with an input); sparsify:
'none' | 'magnitude' | 'magnitude_outliers' | 'random' | 'della_magprune'; consensus:
TIES sign election and disjoint mean; weights, densities, gammas, epsilons: T*K floats
(tensor-major); lambdas: T floats; normalize, rescale: T ints (0/1); streams: T ints in
[0, 2**64) (pymerge.ops.rng.stream_key of each key); rows, inner: T ints (DELLA's rank
rows: row length C and the stride B between its elements); in_dtype/out_dtype:
'float32' | 'float16' | 'bfloat16'; threads: 1 to 1024. See the module source for the
exact arithmetic. Everything is checked before any work; the GIL is released.)doc");
    m.def("uniform", &uniform, py::arg("stream"), py::arg("offset"), py::arg("out"),
          "Test hook: out[i] = the counter-based uniform number offset + i of `stream`.");
    m.attr("__simd__") = simd_name();
    m.attr("_chunk") = kChunk;
    m.attr("_small") = kSmall;
    m.attr("_max_threads") = kMaxThreads;
    m.def("_simd_available", []() {
        std::vector<std::string> out{"scalar"};
        if (avx2_supported()) out.emplace_back("avx2");
        if (avx2_supported() && avx512_supported()) out.emplace_back("avx512");
        return out;
    });
    m.def(
        "_set_simd",
        [m](const std::string& name) mutable {
            if (name == "scalar") {
                g_avx2.store(false);
                g_avx512.store(false);
            } else if (name == "avx2" && avx2_supported()) {
                g_avx2.store(true);
                g_avx512.store(false);
            } else if (name == "avx512" && avx2_supported() && avx512_supported()) {
                g_avx2.store(true);
                g_avx512.store(true);
            } else {
                throw py::value_error("simd '" + name + "' is not available here");
            }
            m.attr("__simd__") = simd_name();
        },
        "Test hook: pick the loop set ('scalar', 'avx2' or 'avx512').");
}

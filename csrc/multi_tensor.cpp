// pybind11 module pymerge._multi_tensor: one call for an elementwise op over many CPU
// tensors (the CPU twins of the single multi-tensor launches of kernels/interpolate.py and
// kernels/permuted_interpolate.py).
//
//   weighted_sum(inputs, out, numels, weights, in_dtype, out_dtype, threads=1)
//       out_t[i] = rnd( sum_k fp32(w_k) * fp32(x_{k,t}[i]) ),  t < T, i < numels[t]
//     inputs : K lists of T buffer addresses (x_{k,t}: contiguous, numels[t] elements)
//     out    : address of one flat buffer; out_t starts after out_0 .. out_{t-1} (packed)
//     numels : T element counts, weights: K floats
//     in_dtype / out_dtype: "float32", "float16" or "bfloat16"
//     The sum is accumulated in fp32 in k order starting from 0 (acc = 0; acc += w*x),
//     exactly as the Triton kernel does, and rounded once to out_dtype (round to nearest
//     even, NaN stays NaN). The GIL is released; `threads` > 1 splits the elements of all
//     tensors together into contiguous ranges (at least 256k elements per thread).
//   permuted_lerp(a, b, rows, cols, rowmaps, colmaps, colruns, ncolruns, outs, alphas,
//                 in_dtype, out_dtype, threads=1)
//       out[m][t] = rnd((1 - al_m) * a_t + al_m * pi_t(b_t)) with pi_t a gather through a
//       row map and a column map (pymerge/ops/_perm_maps.py); a and b read once for all M.
//   __simd__ : the loop set picked at import ("avx2" or "scalar"; $PYMERGE_MT_SIMD=scalar
//              forces the portable one). Both give bit-identical results: the loops use
//              no FMA contraction (-ffp-contract=off) and IEEE conversions only.
//   _set_simd(name) / _simd_available() : test hooks
//
// Why: on CPU, torch's foreach ops cost a dispatch per tensor and per term (K ops over
// every tensor, each a full pass over memory). Here every element is read once per input
// and written once, whatever K, with no per-tensor dispatch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYMERGE_MT_X86 1
#define PYMERGE_MT_AVX2 __attribute__((target("avx2,f16c")))
#else
#define PYMERGE_MT_X86 0
#define PYMERGE_MT_AVX2
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PYMERGE_MT_INLINE inline __attribute__((always_inline))
#else
#define PYMERGE_MT_INLINE inline
#endif

namespace py = pybind11;

namespace {

// ------------------------------------------------------------------ storage types
// Each type converts one element to / from fp32 exactly as IEEE (and torch) do: widening
// is exact, narrowing rounds to nearest even, NaN stays a (quiet) NaN.

PYMERGE_MT_INLINE uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

PYMERGE_MT_INLINE float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

struct F32 {
    using S = float;
    static PYMERGE_MT_INLINE float load(S v) { return v; }
    static PYMERGE_MT_INLINE S store(float v) { return v; }
};

struct BF16 {
    using S = uint16_t;
    static PYMERGE_MT_INLINE float load(S v) { return float_of(static_cast<uint32_t>(v) << 16); }
    // a NaN keeps its sign and top payload bits and is made quiet
    static PYMERGE_MT_INLINE S store(float f) {
        const uint32_t u = bits_of(f);
        const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
        return static_cast<S>(nan ? ((u >> 16) | 0x40u) : rounded);
    }
};

// IEEE binary16 in portable integer code (no _Float16, which the baseline x86-64 target
// turns into a library call per element); the vector loops use F16C instead. Checked
// against torch on every binary16 value by the tests.
struct F16 {
    using S = uint16_t;
    static PYMERGE_MT_INLINE float load(S h) {
        const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
        const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
        if (exp == 0x1F) return float_of(sign | 0x7F800000u | (man << 13));  // inf / nan
        if (exp != 0) return float_of(sign | ((exp + 112u) << 23) | (man << 13));
        return float_of(sign | bits_of(static_cast<float>(man) * 5.9604644775390625e-8f));
    }
    static PYMERGE_MT_INLINE S store(float f) {
        const uint32_t u = bits_of(f);
        const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
        const uint32_t a = u & 0x7FFFFFFFu;
        if (a > 0x7F800000u) return static_cast<S>(sign | 0x7E00u | ((a >> 13) & 0x1FFu));
        if (a >= 0x477FF000u) return static_cast<S>(sign | 0x7C00u);  // rounds to inf
        if (a < 0x38800000u) {  // binary16 subnormal or zero: adding 0.5 rounds (RNE) to 2^-24
            const float m = float_of(a) + 0.5f;
            return static_cast<S>(sign | static_cast<uint16_t>(bits_of(m) - 0x3F000000u));
        }
        const uint32_t r = a + 0xC8000FFFu + ((a >> 13) & 1u);  // rebias (-112 << 23) + RNE
        return static_cast<S>(sign | static_cast<uint16_t>(r >> 13));
    }
};

enum class Dt : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

Dt parse_dtype(const std::string& s, const char* what) {
    if (s == "float32") return Dt::kF32;
    if (s == "float16") return Dt::kF16;
    if (s == "bfloat16") return Dt::kBF16;
    throw py::type_error(std::string(what) + " must be 'float32', 'float16' or 'bfloat16', got '" +
                         s + "'");
}

// ------------------------------------------------------------------ the loops
// out = ((0 + w0*x0) + w1*x1) + ... + w_{K-1}*x_{K-1}, in fp32 and in this order (the
// Triton kernel's; note 0 + (-0) = +0), rounded once. The scalar and AVX2 loops evaluate
// the same expression element by element, so they agree bit for bit.

// A range of the concatenation of all tensors.
struct Job {
    const uintptr_t* in;   // [K * T] input addresses, k-major
    const uintptr_t* out;  // [T] output addresses
    const int64_t* numel;  // [T]
    const float* w;        // [K]
    int64_t T;
    int K;
};

constexpr int kDirect = 4;        // up to this many inputs: one loop, no accumulator array
constexpr int64_t kBlock = 1024;  // more inputs: fp32 accumulators kept in L1 (multiple of 8)

// The portable loops; the AVX2 ones finish their tails with these.
struct Scalar {
    // K <= kDirect inputs: one loop, one accumulator per element
    template <class I, class O, int K>
    static PYMERGE_MT_INLINE void direct(const typename I::S* const* x, const float* w,
                                         typename O::S* out, int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
            float acc = 0.0f + w[0] * I::load(x[0][i]);
            for (int k = 1; k < K; ++k) acc += w[k] * I::load(x[k][i]);
            out[i] = O::store(acc);
        }
    }
    // K > kDirect: acc[] = 0 + w0*x0, acc[] += w_k*x_k, out = rnd(acc[] + w_last*x_last)
    template <class I, class O>
    static PYMERGE_MT_INLINE void blocked(const typename I::S* const* x, const float* w, int K,
                                          typename O::S* out, int64_t lo, int64_t hi) {
        float acc[kBlock];
        for (int64_t s = lo; s < hi; s += kBlock) {
            const int64_t m = std::min(kBlock, hi - s);
            for (int64_t i = 0; i < m; ++i) acc[i] = 0.0f + w[0] * I::load(x[0][s + i]);
            for (int k = 1; k + 1 < K; ++k)
                for (int64_t i = 0; i < m; ++i) acc[i] += w[k] * I::load(x[k][s + i]);
            for (int64_t i = 0; i < m; ++i)
                out[s + i] = O::store(acc[i] + w[K - 1] * I::load(x[K - 1][s + i]));
        }
    }
    // dst[i] = fp32(src[i])
    template <class I>
    static PYMERGE_MT_INLINE void widen(const typename I::S* src, float* dst, int64_t n) {
        for (int64_t i = 0; i < n; ++i) dst[i] = I::load(src[i]);
    }
    // out[i] = rnd((1 - al) * a[i] + al * b[i])  (the Triton permuted kernel's expression)
    template <class O>
    static PYMERGE_MT_INLINE void lerp_store(typename O::S* out, const float* a, const float* b,
                                             float al, int64_t n) {
        const float om = 1.0f - al;
        for (int64_t i = 0; i < n; ++i) out[i] = O::store(om * a[i] + al * b[i]);
    }
};

#if PYMERGE_MT_X86
// 8 lanes of fp32 per __m256; conversions as the scalar types do them (F16C for binary16)
template <class T>
struct Vec8;

template <>
struct Vec8<F32> {
    static PYMERGE_MT_AVX2 inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
    static PYMERGE_MT_AVX2 inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
};

template <>
struct Vec8<BF16> {
    static PYMERGE_MT_AVX2 inline __m256 load(const uint16_t* p) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static PYMERGE_MT_AVX2 inline void store(uint16_t* p, __m256 v) {
        const __m256i u = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i rounded = _mm256_srli_epi32(
            _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
        const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
        // 32 -> 16 bits: packus works per 128-bit lane, then gather the two low quadwords
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    }
};

template <>
struct Vec8<F16> {
    static PYMERGE_MT_AVX2 inline __m256 load(const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static PYMERGE_MT_AVX2 inline void store(uint16_t* p, __m256 v) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
};

struct Avx2 {
    template <class I, class O, int K>
    static PYMERGE_MT_AVX2 inline void direct(const typename I::S* const* x, const float* w,
                                              typename O::S* out, int64_t lo, int64_t hi) {
        __m256 wv[K];
        for (int k = 0; k < K; ++k) wv[k] = _mm256_set1_ps(w[k]);
        const __m256 zero = _mm256_setzero_ps();
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) {
            __m256 acc = _mm256_add_ps(zero, _mm256_mul_ps(wv[0], Vec8<I>::load(x[0] + i)));
            for (int k = 1; k < K; ++k)
                acc = _mm256_add_ps(acc, _mm256_mul_ps(wv[k], Vec8<I>::load(x[k] + i)));
            Vec8<O>::store(out + i, acc);
        }
        Scalar::direct<I, O, K>(x, w, out, i, hi);
    }
    template <class I, class O>
    static PYMERGE_MT_AVX2 inline void blocked(const typename I::S* const* x, const float* w,
                                               int K, typename O::S* out, int64_t lo,
                                               int64_t hi) {
        alignas(32) float acc[kBlock];
        int64_t s = lo;
        for (; s + kBlock <= hi; s += kBlock) {
            const __m256 zero = _mm256_setzero_ps(), w0 = _mm256_set1_ps(w[0]);
            for (int64_t i = 0; i < kBlock; i += 8)
                _mm256_store_ps(acc + i, _mm256_add_ps(zero, _mm256_mul_ps(
                                                                 w0, Vec8<I>::load(x[0] + s + i))));
            for (int k = 1; k + 1 < K; ++k) {
                const __m256 wk = _mm256_set1_ps(w[k]);
                for (int64_t i = 0; i < kBlock; i += 8)
                    _mm256_store_ps(acc + i,
                                    _mm256_add_ps(_mm256_load_ps(acc + i),
                                                  _mm256_mul_ps(wk, Vec8<I>::load(x[k] + s + i))));
            }
            const __m256 wl = _mm256_set1_ps(w[K - 1]);
            for (int64_t i = 0; i < kBlock; i += 8)
                Vec8<O>::store(out + s + i,
                               _mm256_add_ps(_mm256_load_ps(acc + i),
                                             _mm256_mul_ps(wl, Vec8<I>::load(x[K - 1] + s + i))));
        }
        Scalar::blocked<I, O>(x, w, K, out, s, hi);  // the last partial block
    }
    template <class I>
    static PYMERGE_MT_AVX2 inline void widen(const typename I::S* src, float* dst, int64_t n) {
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, Vec8<I>::load(src + i));
        Scalar::widen<I>(src + i, dst + i, n - i);
    }
    template <class O>
    static PYMERGE_MT_AVX2 inline void lerp_store(typename O::S* out, const float* a,
                                                  const float* b, float al, int64_t n) {
        const __m256 om = _mm256_set1_ps(1.0f - al), av = _mm256_set1_ps(al);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            Vec8<O>::store(out + i, _mm256_add_ps(_mm256_mul_ps(om, _mm256_loadu_ps(a + i)),
                                                  _mm256_mul_ps(av, _mm256_loadu_ps(b + i))));
        Scalar::lerp_store<O>(out + i, a + i, b + i, al, n - i);
    }
};
#endif

template <class Isa, class I, class O>
PYMERGE_MT_INLINE void weighted_tensor(const Job& j, int64_t t, int64_t lo, int64_t hi) {
    const typename I::S* x[64];
    std::vector<const typename I::S*> many;
    const typename I::S** xs = x;
    if (j.K > 64) {
        many.resize(static_cast<size_t>(j.K));
        xs = many.data();
    }
    for (int k = 0; k < j.K; ++k)
        xs[k] = reinterpret_cast<const typename I::S*>(j.in[k * j.T + t]);
    auto* out = reinterpret_cast<typename O::S*>(j.out[t]);
    switch (j.K) {
        case 1:
            return Isa::template direct<I, O, 1>(xs, j.w, out, lo, hi);
        case 2:
            return Isa::template direct<I, O, 2>(xs, j.w, out, lo, hi);
        case 3:
            return Isa::template direct<I, O, 3>(xs, j.w, out, lo, hi);
        case kDirect:
            return Isa::template direct<I, O, kDirect>(xs, j.w, out, lo, hi);
        default:
            return Isa::template blocked<I, O>(xs, j.w, j.K, out, lo, hi);
    }
}

// Elements [start, stop) of the concatenation of the job's tensors, as per-tensor pieces
// fn(job, t, lo, hi); `first` is the tensor holding `start` and `offset` the concatenation
// index of its element 0.
template <class J, class Fn>
void for_pieces(const J& j, int64_t first, int64_t offset, int64_t start, int64_t stop, Fn fn) {
    for (int64_t t = first; t < j.T && offset < stop; offset += j.numel[t], ++t) {
        const int64_t lo = std::max<int64_t>(start - offset, 0);
        const int64_t hi = std::min<int64_t>(stop - offset, j.numel[t]);
        if (lo < hi) fn(j, t, lo, hi);
    }
}

struct WeightedSum {
    using JobT = Job;
    template <class Isa, class I, class O>
    static void range(const Job& j, int64_t first, int64_t offset, int64_t start, int64_t stop) {
        for_pieces(j, first, offset, start, stop, weighted_tensor<Isa, I, O>);
    }
};

// ------------------------------------------------------------------ permuted lerp
// out_m[t][r, c] = rnd((1 - al_m) * a_t[r, c] + al_m * b_t[rowmap_t[r] + colmap_t[c]]) for
// every tensor t viewed as [R, C] (see pymerge/ops/_perm_maps.py) and every alpha m: a and
// b are read once (b gathered while reading) and all M outputs written.

struct PermJob {
    const uintptr_t* a;     // [T]
    const uintptr_t* b;     // [T]
    const int64_t* numel;   // [T] R * C
    const int64_t* cols;    // [T] C
    const uintptr_t* rmap;  // [T] int64 [R] (source row * C) or 0: identity
    const uintptr_t* cmap;  // [T] int64 [C] (source column) or 0: identity
    const uintptr_t* runs;  // [T] int64 [n, 3] (first column, its source, length) or 0
    const int64_t* nruns;   // [T] runs of the column map (when given)
    const int64_t* off;     // [T] element offset of tensor t in each output row
    const uintptr_t* outs;  // [M] output buffers, tensor t at element offset off[t]
    size_t out_size;        // bytes per output element
    const float* alpha;     // [M]
    int64_t M;
    int64_t T;
};

constexpr int64_t kSeg = 512;  // elements staged in fp32 at a time (2 x 2 KiB; 2048 measured slower)

// Index of the run holding column c: runs are sorted by first column and cover [0, C).
PYMERGE_MT_INLINE int64_t find_run(const int64_t* runs, int64_t n, int64_t c) {
    int64_t lo = 0, hi = n;  // runs[3 * lo] <= c < runs[3 * hi] (hi = n: past the end)
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (runs[3 * mid] <= c)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

template <class Isa, class I, class O>
void permuted_tensor(const PermJob& j, int64_t t, int64_t lo, int64_t hi) {
    using SI = typename I::S;
    using SO = typename O::S;
    alignas(32) float fa[kSeg];
    alignas(32) float fb[kSeg];
    const SI* a = reinterpret_cast<const SI*>(j.a[t]);
    const SI* b = reinterpret_cast<const SI*>(j.b[t]);
    const int64_t* rmap = reinterpret_cast<const int64_t*>(j.rmap[t]);
    const int64_t* cmap = reinterpret_cast<const int64_t*>(j.cmap[t]);
    const int64_t* runs = reinterpret_cast<const int64_t*>(j.runs[t]);
    const int64_t nruns = j.nruns[t];
    const int64_t C = j.cols[t];
    auto emit = [&](int64_t e, int64_t n) {
        for (int64_t m = 0; m < j.M; ++m) {
            SO* o = reinterpret_cast<SO*>(j.outs[m] +
                                          static_cast<uintptr_t>(j.off[t] + e) * j.out_size);
            Isa::template lerp_store<O>(o, fa, fb, j.alpha[m], n);
        }
    };
    // segments of up to kSeg consecutive elements (across rows), so that each of the M
    // outputs is written in long runs; b is gathered row piece by row piece
    for (int64_t e = lo; e < hi;) {
        const int64_t n = std::min(kSeg, hi - e);
        Isa::template widen<I>(a + e, fa, n);
        if (rmap == nullptr && cmap == nullptr) {
            Isa::template widen<I>(b + e, fb, n);
        } else {
            for (int64_t p = e; p < e + n;) {
                const int64_t r = p / C, c = p - r * C;
                const int64_t len = std::min(C - c, e + n - p);
                const SI* brow = b + (rmap != nullptr ? rmap[r] : r * C);
                float* dst = fb + (p - e);
                if (cmap == nullptr) {
                    Isa::template widen<I>(brow + c, dst, len);
                } else if (runs != nullptr) {  // column map made of contiguous runs (conv)
                    for (int64_t k = find_run(runs, nruns, c), q = c; q < c + len; ++k) {
                        const int64_t first = runs[3 * k], rl = runs[3 * k + 2];
                        const int64_t take = std::min(first + rl, c + len) - q;
                        Isa::template widen<I>(brow + runs[3 * k + 1] + (q - first),
                                               dst + (q - c), take);
                        q += take;
                    }
                } else {
                    for (int64_t i = 0; i < len; ++i) dst[i] = I::load(brow[cmap[c + i]]);
                }
                p += len;
            }
        }
        emit(e, n);
        e += n;
    }
}

struct PermutedLerp {
    using JobT = PermJob;
    template <class Isa, class I, class O>
    static void range(const PermJob& j, int64_t first, int64_t offset, int64_t start,
                      int64_t stop) {
        for_pieces(j, first, offset, start, stop, permuted_tensor<Isa, I, O>);
    }
};

// ------------------------------------------------------------------ dispatch

template <class Op>
using RangeFn = void (*)(const typename Op::JobT&, int64_t, int64_t, int64_t, int64_t);

template <class Op, class I, class O>
RangeFn<Op> pick_isa(bool avx2) {
#if PYMERGE_MT_X86
    if (avx2) return &Op::template range<Avx2, I, O>;
#endif
    (void)avx2;
    return &Op::template range<Scalar, I, O>;
}

template <class Op, class I>
RangeFn<Op> pick_out(Dt out, bool avx2) {
    switch (out) {
        case Dt::kF32:
            return pick_isa<Op, I, F32>(avx2);
        case Dt::kF16:
            return pick_isa<Op, I, F16>(avx2);
        default:
            return pick_isa<Op, I, BF16>(avx2);
    }
}

template <class Op>
RangeFn<Op> pick(Dt in, Dt out, bool avx2) {
    switch (in) {
        case Dt::kF32:
            return pick_out<Op, F32>(out, avx2);
        case Dt::kF16:
            return pick_out<Op, F16>(out, avx2);
        default:
            return pick_out<Op, BF16>(out, avx2);
    }
}

constexpr int64_t kMinPerThread = 1 << 18;  // a thread start (~30 us) pays off from here

// Split the concatenation of T tensors (numels[t] elements each) into contiguous ranges,
// one per thread (at most `threads`, at least kMinPerThread elements each); GIL released.
template <class Op>
void run_ranges(RangeFn<Op> fn, const typename Op::JobT& job, const int64_t* numels, int64_t T,
                int64_t total, int threads) {
    const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, total / kMinPerThread));
    py::gil_scoped_release nogil;
    if (nt == 1) {
        fn(job, 0, 0, 0, total);
        return;
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(nt - 1));
    int64_t t = 0, offset = 0;
    for (int64_t p = 0; p < nt; ++p) {
        const int64_t start = total * p / nt, stop = total * (p + 1) / nt;
        while (t < T && offset + numels[t] <= start) offset += numels[t++];
        if (p + 1 == nt)
            fn(job, t, offset, start, stop);
        else
            pool.emplace_back(fn, std::cref(job), t, offset, start, stop);
    }
    for (auto& th : pool) th.join();
}

// ------------------------------------------------------------------ ISA choice

bool avx2_supported() {
#if PYMERGE_MT_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

bool initial_avx2() {
    const char* env = std::getenv("PYMERGE_MT_SIMD");
    if (env != nullptr && std::string(env) == "scalar") return false;
    return avx2_supported();
}

std::atomic<bool> g_avx2{false};

const char* simd_name() { return g_avx2.load() ? "avx2" : "scalar"; }

// ------------------------------------------------------------------ binding

size_t element_size(Dt d) { return d == Dt::kF32 ? 4 : 2; }

void weighted_sum(const std::vector<std::vector<uintptr_t>>& inputs, uintptr_t out,
                  const std::vector<int64_t>& numels, const std::vector<double>& weights,
                  const std::string& in_dtype, const std::string& out_dtype, int threads) {
    const Dt din = parse_dtype(in_dtype, "in_dtype");
    const Dt dout = parse_dtype(out_dtype, "out_dtype");
    const int64_t K = static_cast<int64_t>(inputs.size());
    const int64_t T = static_cast<int64_t>(numels.size());
    if (K == 0) throw py::value_error("inputs is empty: need at least one list of tensors");
    if (static_cast<int64_t>(weights.size()) != K)
        throw py::value_error("got " + std::to_string(weights.size()) + " weights for " +
                              std::to_string(K) + " input lists");
    if (threads < 1) throw py::value_error("threads must be >= 1");
    std::vector<uintptr_t> in(static_cast<size_t>(K * T));
    for (int64_t k = 0; k < K; ++k) {
        if (static_cast<int64_t>(inputs[k].size()) != T)
            throw py::value_error("inputs[" + std::to_string(k) + "] has " +
                                  std::to_string(inputs[k].size()) + " addresses for " +
                                  std::to_string(T) + " numels");
        std::copy(inputs[k].begin(), inputs[k].end(), in.begin() + k * T);
    }
    std::vector<uintptr_t> outputs(static_cast<size_t>(T));
    int64_t total = 0;
    for (int64_t t = 0; t < T; ++t) {
        if (numels[t] < 0) throw py::value_error("numels[" + std::to_string(t) + "] < 0");
        outputs[t] = out + static_cast<uintptr_t>(total) * element_size(dout);
        bool null = out == 0;
        for (int64_t k = 0; k < K; ++k) null = null || in[k * T + t] == 0;
        if (null && numels[t] > 0)
            throw py::value_error("null address for tensor " + std::to_string(t));
        total += numels[t];
    }
    std::vector<float> w(weights.begin(), weights.end());  // applied as fp32 values
    const Job job{in.data(), outputs.data(), numels.data(), w.data(), T, static_cast<int>(K)};
    run_ranges<WeightedSum>(pick<WeightedSum>(din, dout, g_avx2.load()), job, numels.data(), T,
                            total, threads);
}

void permuted_lerp(const std::vector<uintptr_t>& a, const std::vector<uintptr_t>& b,
                   const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                   const std::vector<uintptr_t>& rowmaps, const std::vector<uintptr_t>& colmaps,
                   const std::vector<uintptr_t>& colruns, const std::vector<int64_t>& ncolruns,
                   const std::vector<uintptr_t>& outs, const std::vector<double>& alphas, const std::string& in_dtype,
                   const std::string& out_dtype, int threads) {
    const Dt din = parse_dtype(in_dtype, "in_dtype");
    const Dt dout = parse_dtype(out_dtype, "out_dtype");
    const int64_t T = static_cast<int64_t>(a.size());
    auto same = [T](size_t n, const char* what) {
        if (static_cast<int64_t>(n) != T)
            throw py::value_error(std::string(what) + " has " + std::to_string(n) +
                                  " entries for " + std::to_string(T) + " tensors");
    };
    same(b.size(), "b");
    same(rows.size(), "rows");
    same(cols.size(), "cols");
    same(rowmaps.size(), "rowmaps");
    same(colmaps.size(), "colmaps");
    same(colruns.size(), "colruns");
    same(ncolruns.size(), "ncolruns");
    if (alphas.empty()) throw py::value_error("alphas is empty");
    if (outs.size() != alphas.size())
        throw py::value_error("got " + std::to_string(outs.size()) + " outputs for " +
                              std::to_string(alphas.size()) + " alphas");
    bool null_out = false;
    for (uintptr_t o : outs) null_out = null_out || o == 0;
    if (threads < 1) throw py::value_error("threads must be >= 1");
    std::vector<int64_t> numel(static_cast<size_t>(T)), off(static_cast<size_t>(T));
    int64_t total = 0;
    for (int64_t t = 0; t < T; ++t) {
        if (rows[t] < 0 || cols[t] < 0)
            throw py::value_error("negative shape for tensor " + std::to_string(t));
        numel[t] = rows[t] * cols[t];
        off[t] = total;
        if (numel[t] > 0 && (a[t] == 0 || b[t] == 0 || null_out))
            throw py::value_error("null address for tensor " + std::to_string(t));
        total += numel[t];
    }
    std::vector<float> al(alphas.begin(), alphas.end());  // applied as fp32 values
    PermJob job{};
    job.a = a.data();
    job.b = b.data();
    job.numel = numel.data();
    job.cols = cols.data();
    job.rmap = rowmaps.data();
    job.cmap = colmaps.data();
    job.runs = colruns.data();
    job.nruns = ncolruns.data();
    job.off = off.data();
    job.outs = outs.data();
    job.out_size = element_size(dout);
    job.alpha = al.data();
    job.M = static_cast<int64_t>(al.size());
    job.T = T;
    run_ranges<PermutedLerp>(pick<PermutedLerp>(din, dout, g_avx2.load()), job, numel.data(), T,
                             total, threads);
}

}  // namespace

PYBIND11_MODULE(_multi_tensor, m) {
    m.doc() = "Multi-tensor elementwise ops on CPU buffers (one call for a whole state dict).";
    g_avx2.store(initial_avx2());
    m.def("weighted_sum", &weighted_sum, py::arg("inputs"), py::arg("out"),
          py::arg("numels"), py::arg("weights"), py::arg("in_dtype"), py::arg("out_dtype"),
          py::arg("threads") = 1,
          R"doc(out_t = sum_k w_k * x_{k,t} for T contiguous CPU buffers, in one call.

inputs: K lists of T addresses; out: the address of one flat buffer that receives
the T results back to back; numels: T element counts;
weights: K floats (applied as fp32); in_dtype/out_dtype: 'float32' | 'float16' |
'bfloat16'. fp32 accumulation in k order from 0, one rounding to out_dtype.
The caller keeps every buffer alive and sized; nothing is checked but counts and nulls.)doc");
    m.def("permuted_lerp", &permuted_lerp, py::arg("a"), py::arg("b"), py::arg("rows"),
          py::arg("cols"), py::arg("rowmaps"), py::arg("colmaps"), py::arg("colruns"),
          py::arg("ncolruns"), py::arg("outs"),
          py::arg("alphas"), py::arg("in_dtype"), py::arg("out_dtype"), py::arg("threads") = 1,
          R"doc(out[m] = (1 - alphas[m]) * a + alphas[m] * pi(b) for T CPU tensors, in one call.

a, b: T addresses of contiguous tensors viewed as [rows[t], cols[t]]; rowmaps /
colmaps: T addresses of int64 maps (source row * cols, source column; 0: identity),
so pi(b)[r, c] = b[rowmap[r] + colmap[c]]; colruns / ncolruns: per tensor 0 or the
address and count of an int64 [n, 3] table of the column map's contiguous runs
(first column, its source column, length; sorted, covering every column), read
instead of the map; outs: M addresses of flat output buffers, tensor t at element
offset sum_{s<t} rows[s] * cols[s] in each; alphas: M floats
(applied as fp32). fp32 arithmetic, one rounding to out_dtype. The caller keeps
every buffer alive and sized and the maps in range; only counts and nulls are checked.)doc");
    m.attr("__simd__") = simd_name();
    m.attr("_min_per_thread") = kMinPerThread;
    m.def(
        "_f16_soft",
        [](const std::vector<float>& values, const std::vector<uint16_t>& halves) {
            std::vector<uint16_t> stored;
            std::vector<float> loaded;
            for (float v : values) stored.push_back(F16::store(v));
            for (uint16_t h : halves) loaded.push_back(F16::load(h));
            return py::make_tuple(stored, loaded);
        },
        "Test hook: the portable binary16 conversions (float -> bits, bits -> float).");
    m.def("_simd_available", []() {
        std::vector<std::string> out{"scalar"};
        if (avx2_supported()) out.emplace_back("avx2");
        return out;
    });
    m.def(
        "_set_simd",
        [m](const std::string& name) mutable {
            if (name == "scalar")
                g_avx2.store(false);
            else if (name == "avx2" && avx2_supported())
                g_avx2.store(true);
            else
                throw py::value_error("simd '" + name + "' is not available here");
            m.attr("__simd__") = simd_name();
        },
        "Test hook: pick the loop set ('scalar' or 'avx2').");
}

// pybind11 module pymerge._multi_tensor: one call for an elementwise op over many CPU
// tensors (the CPU twins of the single multi-tensor launches of kernels/interpolate.py and
// kernels/permuted_interpolate.py).
//
//   weighted_sum(inputs, out, weights, in_dtype, out_dtype, threads=1)
//       out_t[i] = rnd( sum_k fp32(w_k) * fp32(x_{k,t}[i]) ),  t < T, i < numel(x_{0,t})
//     inputs : K lists of T buffers (x_{k,t}: contiguous; all k of one t the same size)
//     out    : one flat buffer; out_t starts after out_0 .. out_{t-1} (packed), and out has
//              exactly sum_t numel(x_{0,t}) elements
//     weights: K floats; in_dtype / out_dtype: "float32", "float16" or "bfloat16"
//     The sum is accumulated in fp32 in k order starting from 0 (acc = 0; acc += w*x),
//     exactly as the Triton kernel does, and rounded once to out_dtype (round to nearest
//     even, NaN stays NaN). The GIL is released; `threads` > 1 splits the elements of all
//     tensors together into contiguous ranges (at least 256k elements per thread).
//   permuted_lerp(a, b, plans, out, alphas, in_dtype, out_dtype, threads=1)
//       out[m][t] = rnd((1 - al_m) * a_t + al_m * pi_t(b_t)) with pi_t a gather through the
//       row map and column map (or column runs) of a GatherPlan (pymerge/ops/_perm_maps.py
//       builds the maps); a and b read once for all M. out: one flat [M, total] buffer, M
//       flat buffers (one per alpha) or M * T buffers (alpha-major), written in place.
//   GatherPlan(rows, cols, rowmap=None, colmap=None, runs=None): validated, C++-owned maps.
//   __simd__ : the loop set picked at import ("avx2" or "scalar"; $PYMERGE_MT_SIMD=scalar
//              forces the portable one). Both give bit-identical results: the loops use
//              no FMA contraction (-ffp-contract=off) and IEEE conversions only.
//   _set_simd(name) / _simd_available() : test hooks
//
// Buffers are NumPy arrays or DLPack capsules, checked before any work (see "checked
// buffers" below): a wrong size, dtype, layout or device is a ValueError / TypeError that
// names the buffer, never a read or write out of bounds.
//
// Why: on CPU, torch's foreach ops cost a dispatch per tensor and per term (K ops over
// every tensor, each a full pass over memory). Here every element is read once per input
// and written once, whatever K, with no per-tensor dispatch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "checked_buffers.hpp"
#include "py_args.hpp"

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

using namespace pymerge_buf;

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
    const uintptr_t* a;          // [T]
    const uintptr_t* b;          // [T]
    const int64_t* numel;        // [T] R * C
    const int64_t* cols;         // [T] C
    const int64_t* const* rmap;  // [T] [R] source row * C, or null: identity
    const int64_t* const* cmap;  // [T] [C] source column, or null (identity, or runs given)
    const int64_t* const* runs;  // [T] [n, 3] (first column, its source, length), or null
    const int64_t* nruns;        // [T] runs of the column map (when given)
    const uintptr_t* out;        // [M * T] address of output t for alpha m at out[m * T + t]
    const float* alpha;          // [M]
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
    const int64_t* rmap = j.rmap[t];
    const int64_t* cmap = j.cmap[t];
    const int64_t* runs = j.runs[t];
    const int64_t nruns = j.nruns[t];
    const int64_t C = j.cols[t];
    auto emit = [&](int64_t e, int64_t n) {
        for (int64_t m = 0; m < j.M; ++m) {
            SO* o = reinterpret_cast<SO*>(j.out[m * j.T + t]) + e;
            Isa::template lerp_store<O>(o, fa, fb, j.alpha[m], n);
        }
    };
    // segments of up to kSeg consecutive elements (across rows), so that each of the M
    // outputs is written in long runs; b is gathered row piece by row piece
    for (int64_t e = lo; e < hi;) {
        const int64_t n = std::min(kSeg, hi - e);
        Isa::template widen<I>(a + e, fa, n);
        if (rmap == nullptr && cmap == nullptr && runs == nullptr) {
            Isa::template widen<I>(b + e, fb, n);
        } else {
            for (int64_t p = e; p < e + n;) {
                const int64_t r = p / C, c = p - r * C;
                const int64_t len = std::min(C - c, e + n - p);
                const SI* brow = b + (rmap != nullptr ? rmap[r] : r * C);
                float* dst = fb + (p - e);
                if (runs != nullptr) {  // column map made of contiguous runs (conv)
                    for (int64_t k = find_run(runs, nruns, c), q = c; q < c + len; ++k) {
                        const int64_t first = runs[3 * k], rl = runs[3 * k + 2];
                        const int64_t take = std::min(first + rl, c + len) - q;
                        Isa::template widen<I>(brow + runs[3 * k + 1] + (q - first),
                                               dst + (q - c), take);
                        q += take;
                    }
                } else if (cmap != nullptr) {
                    for (int64_t i = 0; i < len; ++i) dst[i] = I::load(brow[cmap[c + i]]);
                } else {
                    Isa::template widen<I>(brow + c, dst, len);
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


// A buffer of permuted_lerp: id >= 0 an output out[id], -1 the flat output, -2 - 2t a[t],
// -3 - 2t b[t].
struct Span {
    const char* p;
    int64_t n;  // bytes
    int64_t id;
};

std::string span_name(int64_t id) {
    if (id >= 0) return "out[" + std::to_string(id) + "]";
    if (id == -1) return "out";
    const int64_t t = (-id - 2) / 2;
    return std::string((-id - 2) % 2 == 0 ? "a" : "b") + "[" + std::to_string(t) + "]";
}

// No output shares a byte with an input or with another output (inputs may overlap each
// other: they are only read). One sort and a sweep: O(n log n) for n buffers.
void check_outputs_apart(std::vector<Span>& spans) {
    spans.erase(std::remove_if(spans.begin(), spans.end(), [](const Span& s) { return s.n <= 0; }),
                spans.end());
    std::sort(spans.begin(), spans.end(),
              [](const Span& x, const Span& y) { return x.p < y.p; });
    // the span reaching furthest so far, and the furthest-reaching output so far
    const Span* reach = nullptr;
    const Span* out_reach = nullptr;
    for (const Span& s : spans) {
        const bool is_out = s.id >= -1;
        const Span* hit = nullptr;
        if (is_out && reach != nullptr && reach->p + reach->n > s.p)
            hit = reach;
        else if (!is_out && out_reach != nullptr && out_reach->p + out_reach->n > s.p)
            hit = out_reach;
        if (hit != nullptr) {
            const Span& o = is_out ? s : *hit;
            const Span& other = is_out ? *hit : s;
            throw py::value_error(span_name(o.id) + " overlaps " + span_name(other.id));
        }
        if (reach == nullptr || s.p + s.n > reach->p + reach->n) reach = &s;
        if (is_out && (out_reach == nullptr || s.p + s.n > out_reach->p + out_reach->n))
            out_reach = &s;
    }
}

// ------------------------------------------------------------------ gather plans
// The row map, column map or column runs of one permuted tensor, validated and copied into
// C++-owned memory when the plan is made (the front caches plans with its maps), so that
// permuted_lerp reads b only inside [0, rows * cols) whatever it is handed.
struct GatherPlan {
    int64_t rows = 0, cols = 0;
    std::vector<int64_t> rowmap;  // [rows] source row * cols; empty: identity
    std::vector<int64_t> colmap;  // [cols] source column; empty: identity or runs
    std::vector<int64_t> runs;    // [n, 3] (first column, source column, length); empty: none
    int64_t nbytes() const {
        return static_cast<int64_t>(8 * (rowmap.size() + colmap.size() + runs.size()));
    }
};

std::vector<int64_t> int64s(py::handle h, int64_t n, const char* what) {
    const Buf b = read_buffer(h, Elem::kI64, false, Where{what});
    if (b.numel != n)
        throw py::value_error(std::string(what) + " has " + std::to_string(b.numel) +
                              " entries, expected " + std::to_string(n));
    const auto* p = reinterpret_cast<const int64_t*>(b.data);
    return std::vector<int64_t>(p, p + n);
}

GatherPlan make_plan(py::handle rows_h, py::handle cols_h, py::handle rowmap, py::handle colmap,
                     py::handle runs) {
    constexpr long long kMax = std::numeric_limits<int64_t>::max();
    GatherPlan g;
    g.rows = pymerge_py::checked_int(rows_h, "rows", 0, kMax);
    g.cols = pymerge_py::checked_int(cols_h, "cols", 0, kMax);
    const int64_t R = g.rows, C = g.cols;
    if (C > 0 && R > kMax / C) throw py::value_error("rows * cols overflows int64");
    if (!colmap.is_none() && !runs.is_none())
        throw py::value_error("give colmap or runs, not both (runs describe the column map)");
    if (!rowmap.is_none()) {
        g.rowmap = int64s(rowmap, R, "rowmap");
        for (int64_t r = 0; r < R; ++r) {
            const int64_t v = g.rowmap[r];
            if (v < 0 || (C == 0 ? v != 0 : (v % C != 0 || v / C >= R)))
                throw py::value_error("rowmap[" + std::to_string(r) + "] = " +
                                      std::to_string(v) + " is not a row offset (source row * " +
                                      std::to_string(C) + ", source row in [0, " +
                                      std::to_string(R) + "))");
        }
    }
    if (!colmap.is_none()) {
        g.colmap = int64s(colmap, C, "colmap");
        for (int64_t c = 0; c < C; ++c)
            if (g.colmap[c] < 0 || g.colmap[c] >= C)
                throw py::value_error("colmap[" + std::to_string(c) + "] = " +
                                      std::to_string(g.colmap[c]) + " is out of range [0, " +
                                      std::to_string(C) + ")");
    }
    if (!runs.is_none()) {
        const Buf b = read_buffer(runs, Elem::kI64, false, Where{"runs"});
        if (b.numel % 3 != 0)
            throw py::value_error("runs has " + std::to_string(b.numel) +
                                  " entries, not a multiple of 3 (first column, source, length)");
        const auto* p = reinterpret_cast<const int64_t*>(b.data);
        g.runs.assign(p, p + b.numel);
        const int64_t n = b.numel / 3;
        int64_t next = 0;  // the runs must tile [0, C) in order
        for (int64_t k = 0; k < n; ++k) {
            const int64_t first = g.runs[3 * k], src = g.runs[3 * k + 1], len = g.runs[3 * k + 2];
            if (first != next || len < 1 || first > C - len || src < 0 || src > C - len)
                throw py::value_error(
                    "runs[" + std::to_string(k) + "] = (" + std::to_string(first) + ", " +
                    std::to_string(src) + ", " + std::to_string(len) +
                    ") does not continue the runs in order (next column " +
                    std::to_string(next) + ") with source and columns inside [0, " +
                    std::to_string(C) + ")");
            next = first + len;
        }
        if (next != C)
            throw py::value_error("runs cover columns [0, " + std::to_string(next) + "), not [0, " +
                                  std::to_string(C) + ")");
    }
    return g;
}

// ------------------------------------------------------------------ the calls

void weighted_sum(py::handle inputs, py::handle out, py::handle weights, py::handle in_dtype,
                  py::handle out_dtype, py::handle threads_h) {
    const Dt din = dtype_arg(in_dtype, "in_dtype");
    const Dt dout = dtype_arg(out_dtype, "out_dtype");
    const int threads = threads_arg(threads_h);
    const std::vector<py::object> lists = items(inputs, Where{"inputs"});
    const int64_t K = static_cast<int64_t>(lists.size());
    if (K == 0) throw py::value_error("inputs is empty: need at least one list of tensors");
    const std::vector<double> weights_d = floats(weights, "weights");
    if (static_cast<int64_t>(weights_d.size()) != K)
        throw py::value_error("got " + std::to_string(weights_d.size()) + " weights for " +
                              std::to_string(K) + " input lists");
    std::vector<std::vector<py::object>> rows(static_cast<size_t>(K));  // held for the call
    int64_t T = 0;
    std::vector<uintptr_t> in;
    std::vector<int64_t> numels;
    const int64_t isz = elem_size(elem_of(din)), osz = elem_size(elem_of(dout));
    for (int64_t k = 0; k < K; ++k) {
        rows[k] = items(lists[k], Where{"inputs", k});
        const int64_t n = static_cast<int64_t>(rows[k].size());
        if (k == 0) {
            T = n;
            in.resize(static_cast<size_t>(K * T));
            numels.resize(static_cast<size_t>(T));
        } else if (n != T) {
            throw py::value_error("inputs[" + std::to_string(k) + "] has " + std::to_string(n) +
                                  " buffers, inputs[0] has " + std::to_string(T));
        }
        for (int64_t t = 0; t < T; ++t) {
            const Buf b = read_buffer(rows[k][t], elem_of(din), false, Where{"inputs", k, t});
            if (k == 0)
                numels[t] = b.numel;
            else if (b.numel != numels[t])
                throw py::value_error("inputs[" + std::to_string(k) + "][" + std::to_string(t) +
                                      "] has " + std::to_string(b.numel) +
                                      " elements, inputs[0][" + std::to_string(t) + "] has " +
                                      std::to_string(numels[t]));
            in[k * T + t] = reinterpret_cast<uintptr_t>(b.data);
        }
    }
    int64_t total = 0;
    for (int64_t t = 0; t < T; ++t) total += numels[t];
    py::object out_ref = py::reinterpret_borrow<py::object>(out);
    const Buf o = read_buffer(out, elem_of(dout), true, Where{"out"});
    if (o.numel != total)
        throw py::value_error("out has " + std::to_string(o.numel) + " elements, the " +
                              std::to_string(T) + " tensors of inputs[0] have " +
                              std::to_string(total));
    for (int64_t k = 0; k < K; ++k)
        for (int64_t t = 0; t < T; ++t)
            if (overlap(reinterpret_cast<const char*>(in[k * T + t]), numels[t] * isz, o.data,
                        total * osz))
                throw py::value_error("out overlaps inputs[" + std::to_string(k) + "][" +
                                      std::to_string(t) + "]");
    std::vector<uintptr_t> outputs(static_cast<size_t>(T));
    for (int64_t t = 0, off = 0; t < T; off += numels[t], ++t)
        outputs[t] = reinterpret_cast<uintptr_t>(o.data + off * osz);
    std::vector<float> w(weights_d.begin(), weights_d.end());  // applied as fp32 values
    const Job job{in.data(), outputs.data(), numels.data(), w.data(), T, static_cast<int>(K)};
    run_ranges<WeightedSum>(pick<WeightedSum>(din, dout, g_avx2.load()), job, numels.data(), T,
                            total, threads);
}

void permuted_lerp(py::handle a_h, py::handle b_h, py::handle plans_h, py::handle out,
                   py::handle alphas, py::handle in_dtype, py::handle out_dtype,
                   py::handle threads_h) {
    const Dt din = dtype_arg(in_dtype, "in_dtype");
    const Dt dout = dtype_arg(out_dtype, "out_dtype");
    const int threads = threads_arg(threads_h);
    const std::vector<py::object> a = items(a_h, Where{"a"});
    const std::vector<py::object> b = items(b_h, Where{"b"});
    const std::vector<py::object> plans = items(plans_h, Where{"plans"});
    const int64_t T = static_cast<int64_t>(a.size());
    auto same = [T](size_t n, const char* what) {
        if (static_cast<int64_t>(n) != T)
            throw py::value_error(std::string(what) + " has " + std::to_string(n) +
                                  " entries for " + std::to_string(T) + " tensors");
    };
    same(b.size(), "b");
    same(plans.size(), "plans");
    const std::vector<double> alphas_d = floats(alphas, "alphas");
    if (alphas_d.empty()) throw py::value_error("alphas is empty");
    const int64_t M = static_cast<int64_t>(alphas_d.size());
    const int64_t isz = elem_size(elem_of(din)), osz = elem_size(elem_of(dout));
    std::vector<uintptr_t> pa(static_cast<size_t>(T)), pb(static_cast<size_t>(T));
    std::vector<int64_t> numel(static_cast<size_t>(T)), cols(static_cast<size_t>(T)),
        off(static_cast<size_t>(T)), nruns(static_cast<size_t>(T), 0);
    std::vector<const int64_t*> rmap(static_cast<size_t>(T), nullptr),
        cmap(static_cast<size_t>(T), nullptr), runs(static_cast<size_t>(T), nullptr);
    int64_t total = 0;
    for (int64_t t = 0; t < T; ++t) {
        const Buf ba = read_buffer(a[t], elem_of(din), false, Where{"a", t});
        const Buf bb = read_buffer(b[t], elem_of(din), false, Where{"b", t});
        if (bb.numel != ba.numel)
            throw py::value_error("b[" + std::to_string(t) + "] has " + std::to_string(bb.numel) +
                                  " elements, a[" + std::to_string(t) + "] has " +
                                  std::to_string(ba.numel));
        pa[t] = reinterpret_cast<uintptr_t>(ba.data);
        pb[t] = reinterpret_cast<uintptr_t>(bb.data);
        numel[t] = ba.numel;
        cols[t] = ba.numel;  // no plan: the tensor is one row
        if (!plans[t].is_none()) {
            if (!py::isinstance<GatherPlan>(plans[t]))
                throw py::type_error(
                    "plans[" + std::to_string(t) + "] must be None or a GatherPlan, got " +
                    std::string(py::str(py::type::handle_of(plans[t]).attr("__name__"))));
            const GatherPlan& g = plans[t].cast<const GatherPlan&>();
            if (g.rows * g.cols != ba.numel)
                throw py::value_error("plans[" + std::to_string(t) + "] gathers a [" +
                                      std::to_string(g.rows) + ", " + std::to_string(g.cols) +
                                      "] matrix, a[" + std::to_string(t) + "] has " +
                                      std::to_string(ba.numel) + " elements");
            cols[t] = g.cols;
            if (!g.rowmap.empty()) rmap[t] = g.rowmap.data();
            if (!g.colmap.empty()) cmap[t] = g.colmap.data();
            if (!g.runs.empty()) {
                runs[t] = g.runs.data();
                nruns[t] = static_cast<int64_t>(g.runs.size() / 3);
            }
        }
        off[t] = total;
        total += numel[t];
    }
    // outputs: one flat buffer of M rows, M flat buffers (one per alpha), or M * T buffers
    // (alpha-major, one per tensor)
    std::vector<uintptr_t> outs(static_cast<size_t>(M * T));
    std::vector<py::object> out_items;  // held for the call
    std::vector<Span> spans;            // every buffer, for the overlap check
    if (PyList_Check(out.ptr()) || PyTuple_Check(out.ptr())) {
        out_items = items(out, Where{"out"});
        const int64_t n = static_cast<int64_t>(out_items.size());
        if (n == M * T) {
            for (int64_t m = 0; m < M; ++m)
                for (int64_t t = 0; t < T; ++t) {
                    const int64_t i = m * T + t;
                    const Buf bo = read_buffer(out_items[i], elem_of(dout), true, Where{"out", i});
                    if (bo.numel != numel[t])
                        throw py::value_error("out[" + std::to_string(i) + "] has " +
                                              std::to_string(bo.numel) + " elements, a[" +
                                              std::to_string(t) + "] has " +
                                              std::to_string(numel[t]));
                    outs[i] = reinterpret_cast<uintptr_t>(bo.data);
                    spans.push_back(Span{bo.data, numel[t] * osz, i});
                }
        } else if (n == M) {
            for (int64_t m = 0; m < M; ++m) {
                const Buf bo = read_buffer(out_items[m], elem_of(dout), true, Where{"out", m});
                if (bo.numel != total)
                    throw py::value_error("out[" + std::to_string(m) + "] has " +
                                          std::to_string(bo.numel) + " elements, the " +
                                          std::to_string(T) + " tensors of a have " +
                                          std::to_string(total));
                for (int64_t t = 0; t < T; ++t)
                    outs[m * T + t] = reinterpret_cast<uintptr_t>(bo.data + off[t] * osz);
                spans.push_back(Span{bo.data, total * osz, m});
            }
        } else {
            throw py::value_error("out has " + std::to_string(n) + " buffers; " +
                                  std::to_string(M) + " alphas and " + std::to_string(T) +
                                  " tensors need " + std::to_string(M) + " (one per alpha) or " +
                                  std::to_string(M * T) + " (alpha-major, one per tensor)");
        }
    } else {
        const Buf o = read_buffer(out, elem_of(dout), true, Where{"out"});
        if (o.numel != M * total)
            throw py::value_error("out has " + std::to_string(o.numel) + " elements, " +
                                  std::to_string(M) + " alphas x " + std::to_string(total) +
                                  " elements of a need " + std::to_string(M * total));
        for (int64_t m = 0; m < M; ++m)
            for (int64_t t = 0; t < T; ++t)
                outs[m * T + t] = reinterpret_cast<uintptr_t>(o.data + (m * total + off[t]) * osz);
        spans.push_back(Span{o.data, o.numel * osz, -1});
    }
    for (int64_t t = 0; t < T; ++t) {
        spans.push_back(Span{reinterpret_cast<const char*>(pa[t]), numel[t] * isz, -2 - 2 * t});
        spans.push_back(Span{reinterpret_cast<const char*>(pb[t]), numel[t] * isz, -3 - 2 * t});
    }
    check_outputs_apart(spans);
    std::vector<float> al(alphas_d.begin(), alphas_d.end());  // applied as fp32 values
    PermJob job{};
    job.a = pa.data();
    job.b = pb.data();
    job.numel = numel.data();
    job.cols = cols.data();
    job.rmap = rmap.data();
    job.cmap = cmap.data();
    job.runs = runs.data();
    job.nruns = nruns.data();
    job.out = outs.data();
    job.alpha = al.data();
    job.M = M;
    job.T = T;
    run_ranges<PermutedLerp>(pick<PermutedLerp>(din, dout, g_avx2.load()), job, numel.data(), T,
                             total, threads);
}

}  // namespace

PYBIND11_MODULE(_multi_tensor, m) {
    m.doc() = "Multi-tensor elementwise ops on checked CPU buffers (one call for a state dict).";
    g_avx2.store(initial_avx2());
    py::register_local_exception<NotContiguous>(m, "NotContiguousError", PyExc_ValueError);
    py::class_<GatherPlan>(m, "GatherPlan", R"doc(GatherPlan(rows, cols, rowmap=None, colmap=None, runs=None)

How permuted_lerp reads b for one tensor viewed as a [rows, cols] matrix:
pi(b)[r, c] = b[rowmap[r] + colmap[c]]. rowmap: int64 [rows] of source row * cols
(None: identity); colmap: int64 [cols] of source columns (None: identity); runs: int64
[n, 3] (first column, source column, length) of the column map's contiguous runs, in
order and covering [0, cols), given instead of colmap. Arrays are NumPy int64 arrays or
DLPack capsules; they are checked (every source inside the matrix) and copied.)doc")
        .def(py::init(&make_plan), py::arg("rows"), py::arg("cols"),
             py::arg("rowmap") = py::none(), py::arg("colmap") = py::none(),
             py::arg("runs") = py::none())
        .def_readonly("rows", &GatherPlan::rows)
        .def_readonly("cols", &GatherPlan::cols)
        .def_property_readonly("nbytes", &GatherPlan::nbytes,
                               "Bytes of the maps the plan holds.")
        .def("__repr__", [](const GatherPlan& g) {
            return "GatherPlan(rows=" + std::to_string(g.rows) + ", cols=" +
                   std::to_string(g.cols) + ", rowmap=" + (g.rowmap.empty() ? "None" : "...") +
                   ", colmap=" + (g.colmap.empty() ? "None" : "...") +
                   ", runs=" + std::to_string(g.runs.size() / 3) + ")";
        });
    m.def("weighted_sum", &weighted_sum, py::arg("inputs"), py::arg("out"), py::arg("weights"),
          py::arg("in_dtype"), py::arg("out_dtype"), py::arg("threads") = 1,
          R"doc(out_t = sum_k w_k * x_{k,t} for T contiguous CPU buffers, in one call.

inputs: K lists of T buffers (x_{k,t}; buffers of one t have the same element count);
out: one writable buffer that receives the T results back to back (exactly as many
elements as the T tensors of inputs[0]; it must not overlap an input); weights: K
floats (applied as fp32); in_dtype/out_dtype: 'float32' | 'float16' | 'bfloat16';
threads: 1 to 1024. Buffers are NumPy arrays (16-bit integer views for fp16/bf16 bits)
or DLPack capsules of CPU memory, C-contiguous; each one's element count, element type,
contiguity and alignment are checked (ValueError / TypeError naming it) before any
work. fp32 accumulation in k order from 0, one rounding to out_dtype; the GIL is
released.)doc");
    m.def("permuted_lerp", &permuted_lerp, py::arg("a"), py::arg("b"), py::arg("plans"),
          py::arg("out"), py::arg("alphas"), py::arg("in_dtype"), py::arg("out_dtype"),
          py::arg("threads") = 1,
          R"doc(out[m] = (1 - alphas[m]) * a + alphas[m] * pi(b) for T CPU tensors, in one call.

a, b: T buffers each (a[t] and b[t] of one element count); plans: T entries, None (a
plain lerp of the buffers) or a GatherPlan whose rows * cols is the element count
(pi(b[t])[r, c] = b[t][rowmap[r] + colmap[c]]); out: one writable buffer of
len(alphas) rows of sum_t numel(a[t]) elements (row m for alphas[m], tensor t at the
offset of the tensors before it); or a list of len(alphas) such buffers of one row
each (one allocation per alpha); or a list of len(alphas) * T buffers, alpha-major
(out[m * T + t] receives tensor t for alphas[m]: e.g. a model's own parameters); no
output may overlap a, b or another output; alphas: M >= 1 floats
(applied as fp32); in_dtype/out_dtype and threads as for weighted_sum. Every buffer and
plan is checked before any work. fp32 arithmetic, one rounding to out_dtype; the GIL is
released.)doc");
    m.attr("__simd__") = simd_name();
    m.attr("_min_per_thread") = kMinPerThread;
    m.attr("_max_threads") = kMaxThreads;
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

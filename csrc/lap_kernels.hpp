// Vectorised inner loops of the dense LAP solver, one kernel set per ISA.
//
// Every kernel works on one cost row `c` (T = float or double, read as is and
// widened to double) and on dense per-column arrays (double duals `v`, double
// distances `d`, int32 predecessors).  MAX = true reads the row negated
// (c' = -c), so maximisation needs no negated copy of the matrix.
//
// All kernel sets compute bit-identical results: the only floating-point
// operations are widening, negation, subtraction in a fixed order
// ((c' - v) - h), comparisons and min, none of which depends on the lane
// layout.  Ties are broken towards the lowest column index.
//
// The AVX2 / AVX-512 variants carry per-function target attributes, so the
// translation unit is compiled for the baseline ISA (portable wheel) and the
// driver picks a kernel set at run time (see lap_module.cpp).
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYMERGE_LAP_X86 1
#else
#define PYMERGE_LAP_X86 0
#endif

// GCC 12's AVX-512 reduction intrinsics start from _mm512_undefined_*(), which
// -Wall reports as uninitialised; the values are never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pymerge_lap {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kMaxFinite = std::numeric_limits<double>::max();

template <bool MAX, class T>
inline double widen(T x) {
    double y = static_cast<double>(x);
    return MAX ? -y : y;
}

// Result of a row scan for the lowest and second-lowest reduced cost.
struct Min2 {
    double u1;  // min_j c'(j) - v(j)
    double u2;  // min over j != j1
    int32_t j1; // lowest index attaining u1 (-1 when m == 0)
};

// ---------------------------------------------------------------------------
// Scalar reference kernels (also the fallback on CPUs without AVX2).
// ---------------------------------------------------------------------------
struct KScalar {
    static constexpr const char* name = "scalar";

    // d(j) = min(d(j), (c'(j) - v(j)) - h), pred(j) = row where it improved;
    // INIT: d(j) = c'(j) - v(j), pred(j) = row.  Returns min_j d(j) after the update.
    template <class T, bool MAX, bool INIT>
    static double scan(const T* c, const double* v, double* d, int32_t* pred, int m, double h,
                       int32_t row) {
        double best = kInf;
        for (int j = 0; j < m; ++j) {
            double r = (widen<MAX>(c[j]) - v[j]) - h;
            if (INIT) {
                d[j] = r;
                pred[j] = row;
            } else if (r < d[j]) {
                d[j] = r;
                pred[j] = row;
            }
            best = d[j] < best ? d[j] : best;
        }
        return best;
    }

    // N rows at the same Dijkstra level: exactly scan(rows[0]) ... scan(rows[N-1]).
    template <class T, bool MAX, int N>
    static double scanN(const T* const* rows, const double* hs, const int32_t* ids,
                        const double* v, double* d, int32_t* pred, int m) {
        double best = kInf;
        for (int r = 0; r < N; ++r) best = scan<T, MAX, false>(rows[r], v, d, pred, m, hs[r], ids[r]);
        return best;
    }

    // Lowest and second-lowest reduced cost of a row.  `bad` is set when the row
    // holds an invalid entry (NaN, or c' = -inf).
    template <class T, bool MAX>
    static Min2 min2(const T* c, const double* v, int m, bool* bad) {
        double u1 = kInf, u2 = kInf;
        int32_t j1 = -1;
        bool b = false;
        for (int j = 0; j < m; ++j) {
            double cc = widen<MAX>(c[j]);
            b |= !(cc >= -kMaxFinite);
            double r = cc - v[j];
            if (r < u1) {
                u2 = u1;
                u1 = r;
                j1 = j;
            } else if (r < u2) {
                u2 = r;
            }
        }
        if (j1 < 0 && m > 0) j1 = 0;  // whole row +inf: u1 = inf, any column
        *bad |= b;
        return {u1, u2, j1};
    }

    // Column minima over all rows (row-major pass) of c'(i, j) - rowoff(i)
    // (rowoff may be null: 0): colmin(j), colarg(j) = lowest row attaining it.
    // Returns true when an invalid entry was seen.
    template <class T, bool MAX>
    static bool colreduce(const T* c, int n, int m, const double* rowoff, double* colmin,
                          int32_t* colarg) {
        for (int j = 0; j < m; ++j) {
            colmin[j] = kInf;
            colarg[j] = 0;
        }
        bool b = false;
        for (int i = 0; i < n; ++i) {
            const T* row = c + static_cast<int64_t>(i) * m;
            const double off = rowoff ? rowoff[i] : 0.0;
            for (int j = 0; j < m; ++j) {
                double cc = widen<MAX>(row[j]);
                b |= !(cc >= -kMaxFinite);
                double x = cc - off;
                if (x < colmin[j]) {
                    colmin[j] = x;
                    colarg[j] = i;
                }
            }
        }
        return b;
    }

    // First unassigned column (y(j) < 0) whose reduced cost c'(j) - v(j) equals u, or -1.
    template <class T, bool MAX>
    static int find_free_tied(const T* c, const double* v, const int32_t* y, int m, double u) {
        for (int j = 0; j < m; ++j)
            if (y[j] < 0 && widen<MAX>(c[j]) - v[j] == u) return j;
        return -1;
    }

    // First j >= start with d(j) == level, or m.
    static int find_eq(const double* d, int m, int start, double level) {
        for (int j = start; j < m; ++j)
            if (d[j] == level) return j;
        return m;
    }
};

#if PYMERGE_LAP_X86

#define PYMERGE_AVX2 __attribute__((target("avx2,bmi,bmi2,popcnt")))
#define PYMERGE_AVX512 \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,bmi,bmi2,popcnt")))

// ---------------------------------------------------------------------------
// AVX2: 4 doubles per vector.
// ---------------------------------------------------------------------------
PYMERGE_AVX2 static inline __m256d avx2_load4(const double* p) { return _mm256_loadu_pd(p); }
PYMERGE_AVX2 static inline __m256d avx2_load4(const float* p) {
    return _mm256_cvtps_pd(_mm_loadu_ps(p));
}
template <bool MAX>
PYMERGE_AVX2 static inline __m256d avx2_sign(__m256d x) {
    if (MAX) return _mm256_xor_pd(x, _mm256_set1_pd(-0.0));
    return x;
}
PYMERGE_AVX2 static inline double avx2_hmin(__m256d x) {
    __m128d lo = _mm256_castpd256_pd128(x), hi = _mm256_extractf128_pd(x, 1);
    lo = _mm_min_pd(lo, hi);
    lo = _mm_min_sd(lo, _mm_unpackhi_pd(lo, lo));
    return _mm_cvtsd_f64(lo);
}

struct KAvx2 {
    static constexpr const char* name = "avx2";

    template <class T, bool MAX, bool INIT>
    PYMERGE_AVX2 static double scan(const T* c, const double* v, double* d, int32_t* pred, int m,
                                    double h, int32_t row) {
        const __m256d vh = _mm256_set1_pd(h);
        const __m128i vrow = _mm_set1_epi32(row);
        const __m256i pack = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        __m256d b0 = _mm256_set1_pd(kInf), b1 = b0;
        int j = 0;
        for (; j + 8 <= m; j += 8) {
            __m256d r0 = _mm256_sub_pd(
                _mm256_sub_pd(avx2_sign<MAX>(avx2_load4(c + j)), _mm256_loadu_pd(v + j)), vh);
            __m256d r1 = _mm256_sub_pd(
                _mm256_sub_pd(avx2_sign<MAX>(avx2_load4(c + j + 4)), _mm256_loadu_pd(v + j + 4)),
                vh);
            if (INIT) {
                _mm256_storeu_pd(d + j, r0);
                _mm256_storeu_pd(d + j + 4, r1);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(pred + j), vrow);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(pred + j + 4), vrow);
                b0 = _mm256_min_pd(b0, r0);
                b1 = _mm256_min_pd(b1, r1);
            } else {
                __m256d d0 = _mm256_loadu_pd(d + j), d1 = _mm256_loadu_pd(d + j + 4);
                __m256d k0 = _mm256_cmp_pd(r0, d0, _CMP_LT_OQ);
                __m256d k1 = _mm256_cmp_pd(r1, d1, _CMP_LT_OQ);
                d0 = _mm256_blendv_pd(d0, r0, k0);
                d1 = _mm256_blendv_pd(d1, r1, k1);
                _mm256_storeu_pd(d + j, d0);
                _mm256_storeu_pd(d + j + 4, d1);
                if (_mm256_movemask_pd(_mm256_or_pd(k0, k1))) {
                    __m128i m0 = _mm256_castsi256_si128(
                        _mm256_permutevar8x32_epi32(_mm256_castpd_si256(k0), pack));
                    __m128i m1 = _mm256_castsi256_si128(
                        _mm256_permutevar8x32_epi32(_mm256_castpd_si256(k1), pack));
                    _mm_maskstore_epi32(pred + j, m0, vrow);
                    _mm_maskstore_epi32(pred + j + 4, m1, vrow);
                }
                b0 = _mm256_min_pd(b0, d0);
                b1 = _mm256_min_pd(b1, d1);
            }
        }
        double best = avx2_hmin(_mm256_min_pd(b0, b1));
        if (j < m) {  // the last m % 8 columns: the scalar scan
            double tail = KScalar::scan<T, MAX, INIT>(c + j, v + j, d + j, pred + j, m - j, h, row);
            best = tail < best ? tail : best;
        }
        return best;
    }

    // N rows at one Dijkstra level in one pass; identical to N sequential scans.
    template <class T, bool MAX, int N>
    PYMERGE_AVX2 static double scanN(const T* const* rows, const double* hs, const int32_t* ids,
                                     const double* v, double* d, int32_t* pred, int m) {
        __m256d vh[N], vr[N];
        for (int r = 0; r < N; ++r) {
            vh[r] = _mm256_set1_pd(hs[r]);
            vr[r] = _mm256_set1_pd(static_cast<double>(ids[r]));
        }
        __m256d best = _mm256_set1_pd(kInf);
        int j = 0;
        for (; j + 4 <= m; j += 4) {
            __m256d vv = _mm256_loadu_pd(v + j), dd = _mm256_loadu_pd(d + j);
            __m256d kany = _mm256_setzero_pd(), pv = vr[0];
            for (int r = 0; r < N; ++r) {
                __m256d x = _mm256_sub_pd(
                    _mm256_sub_pd(avx2_sign<MAX>(avx2_load4(rows[r] + j)), vv), vh[r]);
                __m256d k = _mm256_cmp_pd(x, dd, _CMP_LT_OQ);
                dd = _mm256_blendv_pd(dd, x, k);
                pv = _mm256_blendv_pd(pv, vr[r], k);
                kany = _mm256_or_pd(kany, k);
            }
            _mm256_storeu_pd(d + j, dd);
            if (_mm256_movemask_pd(kany)) {
                const __m256i pack = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
                __m128i mk = _mm256_castsi256_si128(
                    _mm256_permutevar8x32_epi32(_mm256_castpd_si256(kany), pack));
                _mm_maskstore_epi32(pred + j, mk, _mm256_cvtpd_epi32(pv));
            }
            best = _mm256_min_pd(best, dd);
        }
        double b = avx2_hmin(best);
        for (; j < m; ++j) {
            for (int r = 0; r < N; ++r) {
                double x = (widen<MAX>(rows[r][j]) - v[j]) - hs[r];
                if (x < d[j]) {
                    d[j] = x;
                    pred[j] = ids[r];
                }
            }
            b = d[j] < b ? d[j] : b;
        }
        return b;
    }

    // Two independent lane sets halve the dependency chain; merged by index.
    template <class T, bool MAX>
    PYMERGE_AVX2 static Min2 min2(const T* c, const double* v, int m, bool* bad) {
        const __m256d lim = _mm256_set1_pd(-kMaxFinite);
        __m256d a1 = _mm256_set1_pd(kInf), a2 = a1, ai = _mm256_set1_pd(-1.0);
        __m256d b1 = a1, b2 = a1, bi = ai;
        __m256d jv = _mm256_setr_pd(0, 1, 2, 3);
        const __m256d four = _mm256_set1_pd(4.0), eight = _mm256_set1_pd(8.0);
        __m256d vb = _mm256_setzero_pd();
        int j = 0;
        for (; j + 8 <= m; j += 8) {
            __m256d c0 = avx2_sign<MAX>(avx2_load4(c + j));
            __m256d c1 = avx2_sign<MAX>(avx2_load4(c + j + 4));
            vb = _mm256_or_pd(vb, _mm256_or_pd(_mm256_cmp_pd(c0, lim, _CMP_NGE_UQ),
                                               _mm256_cmp_pd(c1, lim, _CMP_NGE_UQ)));
            __m256d r0 = _mm256_sub_pd(c0, _mm256_loadu_pd(v + j));
            __m256d r1 = _mm256_sub_pd(c1, _mm256_loadu_pd(v + j + 4));
            __m256d l0 = _mm256_cmp_pd(r0, a1, _CMP_LT_OQ);
            __m256d l1 = _mm256_cmp_pd(r1, b1, _CMP_LT_OQ);
            a2 = _mm256_blendv_pd(_mm256_min_pd(a2, r0), a1, l0);
            b2 = _mm256_blendv_pd(_mm256_min_pd(b2, r1), b1, l1);
            a1 = _mm256_blendv_pd(a1, r0, l0);
            b1 = _mm256_blendv_pd(b1, r1, l1);
            ai = _mm256_blendv_pd(ai, jv, l0);
            bi = _mm256_blendv_pd(bi, _mm256_add_pd(jv, four), l1);
            jv = _mm256_add_pd(jv, eight);
        }
        alignas(32) double l1[9], l2[9], li[9];
        _mm256_store_pd(l1, a1);
        _mm256_store_pd(l2, a2);
        _mm256_store_pd(li, ai);
        _mm256_storeu_pd(l1 + 4, b1);
        _mm256_storeu_pd(l2 + 4, b2);
        _mm256_storeu_pd(li + 4, bi);
        // tail as a ninth lane
        l1[8] = kInf;
        l2[8] = kInf;
        li[8] = -1;
        bool b = _mm256_movemask_pd(vb) != 0;
        for (; j < m; ++j) {
            double cc = widen<MAX>(c[j]);
            b |= !(cc >= -kMaxFinite);
            double r = cc - v[j];
            if (r < l1[8]) {
                l2[8] = l1[8];
                l1[8] = r;
                li[8] = j;
            } else if (r < l2[8]) {
                l2[8] = r;
            }
        }
        *bad |= b;
        return merge_lanes(l1, l2, li, 9, m);
    }

    static Min2 merge_lanes(const double* l1, const double* l2, const double* li, int lanes,
                            int m) {
        int best = -1;
        for (int l = 0; l < lanes; ++l) {
            if (li[l] < 0) continue;
            if (best < 0 || l1[l] < l1[best] || (l1[l] == l1[best] && li[l] < li[best])) best = l;
        }
        if (best < 0) return {kInf, kInf, m > 0 ? 0 : -1};
        double u2 = kInf;
        for (int l = 0; l < lanes; ++l) {
            if (l != best && l1[l] < u2) u2 = l1[l];
            if (l2[l] < u2) u2 = l2[l];
        }
        return {l1[best], u2, static_cast<int32_t>(li[best])};
    }

    template <class T, bool MAX>
    PYMERGE_AVX2 static bool colreduce(const T* c, int n, int m, const double* rowoff, double* colmin,
                          int32_t* colarg) {
        for (int j = 0; j < m; ++j) {
            colmin[j] = kInf;
            colarg[j] = 0;
        }
        const __m256d lim = _mm256_set1_pd(-kMaxFinite);
        const __m256i pack = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        __m256d vb = _mm256_setzero_pd();
        bool b = false;
        for (int i = 0; i < n; ++i) {
            const T* row = c + static_cast<int64_t>(i) * m;
            const __m128i vrow = _mm_set1_epi32(i);
            const double off = rowoff ? rowoff[i] : 0.0;
            const __m256d voff = _mm256_set1_pd(off);
            int j = 0;
            for (; j + 4 <= m; j += 4) {
                __m256d cc = avx2_sign<MAX>(avx2_load4(row + j));
                vb = _mm256_or_pd(vb, _mm256_cmp_pd(cc, lim, _CMP_NGE_UQ));
                cc = _mm256_sub_pd(cc, voff);
                __m256d cm = _mm256_loadu_pd(colmin + j);
                __m256d lt = _mm256_cmp_pd(cc, cm, _CMP_LT_OQ);
                _mm256_storeu_pd(colmin + j, _mm256_blendv_pd(cm, cc, lt));
                if (_mm256_movemask_pd(lt)) {
                    __m128i mk = _mm256_castsi256_si128(
                        _mm256_permutevar8x32_epi32(_mm256_castpd_si256(lt), pack));
                    _mm_maskstore_epi32(colarg + j, mk, vrow);
                }
            }
            for (; j < m; ++j) {
                double cc = widen<MAX>(row[j]);
                b |= !(cc >= -kMaxFinite);
                double x = cc - off;
                if (x < colmin[j]) {
                    colmin[j] = x;
                    colarg[j] = i;
                }
            }
        }
        return b || _mm256_movemask_pd(vb) != 0;
    }

    template <class T, bool MAX>
    PYMERGE_AVX2 static int find_free_tied(const T* c, const double* v, const int32_t* y, int m,
                                           double u) {
        const __m256d uv = _mm256_set1_pd(u);
        int j = 0;
        for (; j + 4 <= m; j += 4) {
            __m128i yy = _mm_loadu_si128(reinterpret_cast<const __m128i*>(y + j));
            int fm = _mm_movemask_ps(_mm_castsi128_ps(yy));  // sign bits: y < 0
            if (!fm) continue;
            __m256d r = _mm256_sub_pd(avx2_sign<MAX>(avx2_load4(c + j)), _mm256_loadu_pd(v + j));
            int k = fm & _mm256_movemask_pd(_mm256_cmp_pd(r, uv, _CMP_EQ_OQ));
            if (k) return j + __builtin_ctz(k);
        }
        for (; j < m; ++j)
            if (y[j] < 0 && widen<MAX>(c[j]) - v[j] == u) return j;
        return -1;
    }

    PYMERGE_AVX2 static int find_eq(const double* d, int m, int start, double level) {
        const __m256d lv = _mm256_set1_pd(level);
        int j = start;
        for (; j + 4 <= m; j += 4) {
            int k = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(d + j), lv, _CMP_EQ_OQ));
            if (k) return j + __builtin_ctz(k);
        }
        for (; j < m; ++j)
            if (d[j] == level) return j;
        return m;
    }
};

// ---------------------------------------------------------------------------
// AVX-512: 8 doubles per vector, masked tails.
// ---------------------------------------------------------------------------
PYMERGE_AVX512 static inline __m512d avx512_load8(const double* p) { return _mm512_loadu_pd(p); }
PYMERGE_AVX512 static inline __m512d avx512_load8(const float* p) {
    return _mm512_cvtps_pd(_mm256_loadu_ps(p));
}
PYMERGE_AVX512 static inline __m512d avx512_load8z(const double* p, __mmask8 k) {
    return _mm512_maskz_loadu_pd(k, p);
}
PYMERGE_AVX512 static inline __m512d avx512_load8z(const float* p, __mmask8 k) {
    return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k, p));
}
template <bool MAX>
PYMERGE_AVX512 static inline __m512d avx512_sign(__m512d x) {
    if (MAX)
        return _mm512_castsi512_pd(
            _mm512_xor_si512(_mm512_castpd_si512(x), _mm512_set1_epi64(INT64_MIN)));
    return x;
}

struct KAvx512 {
    static constexpr const char* name = "avx512";

    template <class T, bool MAX, bool INIT>
    PYMERGE_AVX512 static inline void scan_step(const T* c, const double* v, double* d,
                                                int32_t* pred, int j, __m512d vh, __m256i vrow,
                                                __m512d& best) {
        __m512d r =
            _mm512_sub_pd(_mm512_sub_pd(avx512_sign<MAX>(avx512_load8(c + j)),
                                        _mm512_loadu_pd(v + j)),
                          vh);
        if (INIT) {
            _mm512_storeu_pd(d + j, r);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pred + j), vrow);
            best = _mm512_min_pd(best, r);
        } else {
            __m512d dd = _mm512_loadu_pd(d + j);
            __mmask8 k = _mm512_cmp_pd_mask(r, dd, _CMP_LT_OQ);
            dd = _mm512_min_pd(r, dd);  // == r where k, else d (no NaN reaches here)
            _mm512_storeu_pd(d + j, dd);
            if (k) _mm256_mask_storeu_epi32(pred + j, k, vrow);
            best = _mm512_min_pd(best, dd);
        }
    }

    template <class T, bool MAX, bool INIT>
    PYMERGE_AVX512 static double scan(const T* c, const double* v, double* d, int32_t* pred, int m,
                                      double h, int32_t row) {
        const __m512d vh = _mm512_set1_pd(h);
        const __m256i vrow = _mm256_set1_epi32(row);
        __m512d b0 = _mm512_set1_pd(kInf), b1 = b0;
        int j = 0;
        for (; j + 16 <= m; j += 16) {
            scan_step<T, MAX, INIT>(c, v, d, pred, j, vh, vrow, b0);
            scan_step<T, MAX, INIT>(c, v, d, pred, j + 8, vh, vrow, b1);
        }
        if (j + 8 <= m) {
            scan_step<T, MAX, INIT>(c, v, d, pred, j, vh, vrow, b0);
            j += 8;
        }
        if (j < m) {
            __mmask8 t = static_cast<__mmask8>((1u << (m - j)) - 1u);
            __m512d r = _mm512_sub_pd(
                _mm512_sub_pd(avx512_sign<MAX>(avx512_load8z(c + j, t)),
                              _mm512_maskz_loadu_pd(t, v + j)),
                vh);
            if (INIT) {
                _mm512_mask_storeu_pd(d + j, t, r);
                _mm256_mask_storeu_epi32(pred + j, t, vrow);
                b1 = _mm512_mask_min_pd(b1, t, b1, r);
            } else {
                __m512d dd = _mm512_maskz_loadu_pd(t, d + j);
                __mmask8 k = _mm512_mask_cmp_pd_mask(t, r, dd, _CMP_LT_OQ);
                dd = _mm512_mask_mov_pd(dd, k, r);
                _mm512_mask_storeu_pd(d + j, k, r);
                _mm256_mask_storeu_epi32(pred + j, k, vrow);
                b1 = _mm512_mask_min_pd(b1, t, b1, dd);
            }
        }
        return _mm512_reduce_min_pd(_mm512_min_pd(b0, b1));
    }

    template <class T, bool MAX>
    PYMERGE_AVX512 static inline void min2_step(__m512d cc, __m512d r, __m512d jv, __m512d& a1,
                                                __m512d& a2, __m512d& ai) {
        (void)cc;
        __mmask8 lt = _mm512_cmp_pd_mask(r, a1, _CMP_LT_OQ);
        a2 = _mm512_mask_mov_pd(_mm512_min_pd(a2, r), lt, a1);
        a1 = _mm512_mask_mov_pd(a1, lt, r);
        ai = _mm512_mask_mov_pd(ai, lt, jv);
    }

    // N rows at one level in a single pass (N memory streams, one pass over d and
    // v); identical to scanning rows[0], ..., rows[N-1] one after the other.
    template <class T, bool MAX, int N>
    PYMERGE_AVX512 static inline void scanN_step(const T* const* rows, const __m512d* vh,
                                                 const __m256i* vr, const double* v, double* d,
                                                 int32_t* pred, int j, __mmask8 t,
                                                 __m512d& best) {
        __m512d vv, dd;
        if (t == 0xFF) {
            vv = _mm512_loadu_pd(v + j);
            dd = _mm512_loadu_pd(d + j);
        } else {
            vv = _mm512_maskz_loadu_pd(t, v + j);
            dd = _mm512_mask_mov_pd(_mm512_set1_pd(kInf), t, _mm512_maskz_loadu_pd(t, d + j));
        }
        __mmask8 k = 0;
        __m256i pv = vr[0];
        for (int r = 0; r < N; ++r) {
            __m512d cv = t == 0xFF ? avx512_load8(rows[r] + j) : avx512_load8z(rows[r] + j, t);
            __m512d x = _mm512_sub_pd(_mm512_sub_pd(avx512_sign<MAX>(cv), vv), vh[r]);
            __mmask8 kr = _mm512_mask_cmp_pd_mask(t, x, dd, _CMP_LT_OQ);
            dd = _mm512_mask_mov_pd(dd, kr, x);
            pv = _mm256_mask_mov_epi32(pv, kr, vr[r]);
            k |= kr;
        }
        if (t == 0xFF)
            _mm512_storeu_pd(d + j, dd);
        else
            _mm512_mask_storeu_pd(d + j, t, dd);
        if (k) _mm256_mask_storeu_epi32(pred + j, k, pv);
        best = _mm512_min_pd(best, dd);
    }

    template <class T, bool MAX, int N>
    PYMERGE_AVX512 static double scanN(const T* const* rows, const double* hs,
                                       const int32_t* ids, const double* v, double* d,
                                       int32_t* pred, int m) {
        __m512d vh[N];
        __m256i vr[N];
        for (int r = 0; r < N; ++r) {
            vh[r] = _mm512_set1_pd(hs[r]);
            vr[r] = _mm256_set1_epi32(ids[r]);
        }
        __m512d b0 = _mm512_set1_pd(kInf), b1 = b0;
        int j = 0;
        for (; j + 16 <= m; j += 16) {
            scanN_step<T, MAX, N>(rows, vh, vr, v, d, pred, j, 0xFF, b0);
            scanN_step<T, MAX, N>(rows, vh, vr, v, d, pred, j + 8, 0xFF, b1);
        }
        for (; j < m; j += 8) {
            __mmask8 t = (m - j >= 8) ? static_cast<__mmask8>(0xFF)
                                      : static_cast<__mmask8>((1u << (m - j)) - 1u);
            scanN_step<T, MAX, N>(rows, vh, vr, v, d, pred, j, t, b0);
        }
        return _mm512_reduce_min_pd(_mm512_min_pd(b0, b1));
    }

    // Two independent lane sets (even / odd blocks of 8) halve the dependency
    // chain; lanes are merged with vector reductions.
    template <class T, bool MAX>
    PYMERGE_AVX512 static Min2 min2(const T* c, const double* v, int m, bool* bad) {
        const __m512d lim = _mm512_set1_pd(-kMaxFinite);
        const __m512d inf = _mm512_set1_pd(kInf);
        __m512d a1 = inf, a2 = inf, ai = _mm512_set1_pd(-1.0);
        __m512d b1 = inf, b2 = inf, bi = ai;
        __m512d jv = _mm512_setr_pd(0, 1, 2, 3, 4, 5, 6, 7);
        const __m512d eight = _mm512_set1_pd(8.0), sixteen = _mm512_set1_pd(16.0);
        __mmask8 kb = 0;
        int j = 0;
        for (; j + 16 <= m; j += 16) {
            __m512d c0 = avx512_sign<MAX>(avx512_load8(c + j));
            __m512d c1 = avx512_sign<MAX>(avx512_load8(c + j + 8));
            kb |= _mm512_cmp_pd_mask(c0, lim, _CMP_NGE_UQ) | _mm512_cmp_pd_mask(c1, lim, _CMP_NGE_UQ);
            __m512d r0 = _mm512_sub_pd(c0, _mm512_loadu_pd(v + j));
            __m512d r1 = _mm512_sub_pd(c1, _mm512_loadu_pd(v + j + 8));
            min2_step<T, MAX>(c0, r0, jv, a1, a2, ai);
            min2_step<T, MAX>(c1, r1, _mm512_add_pd(jv, eight), b1, b2, bi);
            jv = _mm512_add_pd(jv, sixteen);
        }
        for (; j < m; j += 8) {
            __mmask8 t = (m - j >= 8) ? static_cast<__mmask8>(0xFF)
                                      : static_cast<__mmask8>((1u << (m - j)) - 1u);
            __m512d cc = avx512_sign<MAX>(avx512_load8z(c + j, t));
            __m512d r =
                _mm512_mask_mov_pd(inf, t, _mm512_sub_pd(cc, _mm512_maskz_loadu_pd(t, v + j)));
            kb |= _mm512_mask_cmp_pd_mask(t, cc, lim, _CMP_NGE_UQ);
            min2_step<T, MAX>(cc, r, jv, a1, a2, ai);
            jv = _mm512_add_pd(jv, eight);
        }
        *bad |= kb != 0;
        // merge set b into set a (per lane: both are (min, argmin, second) triples;
        // set a's indices are lower only within a block pair, so break ties by index)
        __mmask8 takeb = _mm512_cmp_pd_mask(b1, a1, _CMP_LT_OQ) |
                         (_mm512_cmp_pd_mask(b1, a1, _CMP_EQ_OQ) &
                          _mm512_cmp_pd_mask(bi, ai, _CMP_LT_OQ) &
                          _mm512_cmp_pd_mask(bi, _mm512_setzero_pd(), _CMP_GE_OQ));
        __m512d m1 = _mm512_mask_mov_pd(a1, takeb, b1);
        __m512d mi = _mm512_mask_mov_pd(ai, takeb, bi);
        __m512d m2 = _mm512_min_pd(_mm512_min_pd(a2, b2), _mm512_mask_mov_pd(b1, takeb, a1));
        double u1 = _mm512_reduce_min_pd(m1);
        if (!(u1 < kInf)) return {kInf, kInf, m > 0 ? 0 : -1};
        __mmask8 eq = _mm512_cmp_pd_mask(m1, _mm512_set1_pd(u1), _CMP_EQ_OQ);
        double jmin = _mm512_mask_reduce_min_pd(eq, mi);
        double u2;
        if (__builtin_popcount(eq) >= 2) {
            u2 = u1;
        } else {
            u2 = std::min(_mm512_reduce_min_pd(m2), _mm512_mask_reduce_min_pd(
                                                        static_cast<__mmask8>(~eq), m1));
        }
        return {u1, u2, static_cast<int32_t>(jmin)};
    }

    template <class T, bool MAX>
    PYMERGE_AVX512 static bool colreduce(const T* c, int n, int m, const double* rowoff,
                                         double* colmin, int32_t* colarg) {
        for (int j = 0; j < m; ++j) {
            colmin[j] = kInf;
            colarg[j] = 0;
        }
        const __m512d lim = _mm512_set1_pd(-kMaxFinite);
        __mmask8 kb = 0;
        for (int i = 0; i < n; ++i) {
            const T* row = c + static_cast<int64_t>(i) * m;
            const __m256i vrow = _mm256_set1_epi32(i);
            const __m512d voff = _mm512_set1_pd(rowoff ? rowoff[i] : 0.0);
            for (int j = 0; j < m; j += 8) {
                __mmask8 t = (m - j >= 8) ? static_cast<__mmask8>(0xFF)
                                          : static_cast<__mmask8>((1u << (m - j)) - 1u);
                __m512d cc = avx512_sign<MAX>(t == 0xFF ? avx512_load8(row + j)
                                                        : avx512_load8z(row + j, t));
                kb |= _mm512_mask_cmp_pd_mask(t, cc, lim, _CMP_NGE_UQ);
                cc = _mm512_sub_pd(cc, voff);
                __m512d cm = _mm512_maskz_loadu_pd(t, colmin + j);
                __mmask8 lt = _mm512_mask_cmp_pd_mask(t, cc, cm, _CMP_LT_OQ);
                _mm512_mask_storeu_pd(colmin + j, lt, cc);
                _mm256_mask_storeu_epi32(colarg + j, lt, vrow);
            }
        }
        return kb != 0;
    }

    template <class T, bool MAX>
    PYMERGE_AVX512 static int find_free_tied(const T* c, const double* v, const int32_t* y,
                                             int m, double u) {
        const __m512d uv = _mm512_set1_pd(u);
        const __m256i zero = _mm256_setzero_si256();
        for (int j = 0; j < m; j += 8) {
            __mmask8 t = (m - j >= 8) ? static_cast<__mmask8>(0xFF)
                                      : static_cast<__mmask8>((1u << (m - j)) - 1u);
            __mmask8 fm = _mm256_mask_cmplt_epi32_mask(
                t, _mm256_maskz_loadu_epi32(t, y + j), zero);
            if (!fm) continue;
            __m512d r = _mm512_sub_pd(avx512_sign<MAX>(avx512_load8z(c + j, fm)),
                                      _mm512_maskz_loadu_pd(fm, v + j));
            __mmask8 k = _mm512_mask_cmp_pd_mask(fm, r, uv, _CMP_EQ_OQ);
            if (k) return j + __builtin_ctz(k);
        }
        return -1;
    }

    PYMERGE_AVX512 static int find_eq(const double* d, int m, int start, double level) {
        const __m512d lv = _mm512_set1_pd(level);
        int j = start;
        for (; j + 8 <= m; j += 8) {
            __mmask8 k = _mm512_cmp_pd_mask(_mm512_loadu_pd(d + j), lv, _CMP_EQ_OQ);
            if (k) return j + __builtin_ctz(k);
        }
        for (; j < m; ++j)
            if (d[j] == level) return j;
        return m;
    }
};

#endif  // PYMERGE_LAP_X86

}  // namespace pymerge_lap

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

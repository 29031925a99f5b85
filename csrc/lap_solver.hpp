// Dense linear sum assignment: Jonker-Volgenant shortest augmenting paths.
//
//   R. Jonker and A. Volgenant, "A shortest augmenting path algorithm for dense
//   and sparse linear assignment problems", Computing 38 (1987) 325-340.
//   D. F. Crouse, "On implementing 2D rectangular assignment algorithms",
//   IEEE Trans. Aerospace and Electronic Systems 52(4) (2016) 1679-1696.
//
// Problem: n rows <= m columns, cost c (row-major, float or double), internal
// cost c' = c (minimise) or c' = -c (MAX).  Every row is assigned to a distinct
// column at minimum total c'.  +inf in c' marks a forbidden pair.
//
// Dual convention (returned to Python, and accepted back as a warm start):
//   u(i) + v(j) <= c'(i, j) for all pairs, with equality on the assignment,
//   u(i) = c'(i, x(i)) - v(x(i)).  For rectangular problems v(j) <= 0 with
//   v(j) = 0 on the columns left unassigned.
//
// Phases
//   square, cold   : column reduction, reduction transfer, augmenting row
//                    reduction (two passes, JV 1987), then augmentation.
//   square, warm   : v = the given column duals; a greedy pass gives each row
//                    its cheapest reduced column when it is free (this keeps all
//                    assigned rows tight); augmenting row reduction on the rest;
//                    then augmentation.
//   rectangular    : v = 0 (all columns share the same dual, as Crouse's SAP
//                    needs), greedy pass, augmenting row reduction (it only ever
//                    lowers the dual of a column that stays assigned, so the
//                    rectangular optimality conditions survive), augmentation.
//                    A warm start is validated but not used: the rectangular
//                    conditions require equal duals on every unassigned column.
//   augmentation   : Dijkstra over columns from each free row with dense,
//                    vectorised relax-and-min scans.  Finished columns are masked
//                    by setting their dual to -inf during the search (their
//                    reduced cost becomes +inf, so the scan never touches them);
//                    all columns at the current minimum distance are collected at
//                    once and a free one among them ends the search (the JV tie
//                    rule: prefer unassigned columns).
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <vector>

#include "lap_kernels.hpp"

namespace pymerge_lap {

enum Status : int { kOk = 0, kBad = 1, kInfeasible = 2 };

#ifdef PYMERGE_LAP_STATS
struct Stats { long long min2 = 0, tied = 0, scans = 0, collects = 0, free0 = 0, free1 = 0, free2 = 0; };
inline Stats g_stats;
#define LAP_STAT(x) (++g_stats.x)
#define LAP_SET(x, v) (g_stats.x = (v))
#else
#define LAP_STAT(x) ((void)0)
#define LAP_SET(x, v) ((void)0)
#endif

// Per-problem scratch space, reused across the problems of a batch.
struct Workspace {
    std::vector<double> v, d, rv, rd;
    std::vector<int32_t> pred, y, x, freel, rcol, cnt;
    void ensure(int n, int m) {
        if (static_cast<int>(v.size()) < m) {
            v.resize(m);
            d.resize(m);
            rv.resize(m);
            rd.resize(m);
            pred.resize(m);
            y.resize(m);
            rcol.resize(m);
        }
        if (static_cast<int>(x.size()) < n) {
            x.resize(n);
            freel.resize(n);
            cnt.resize(n);
        }
    }
};

struct Problem {
    const void* cost = nullptr;  // [n, m] row-major
    int n = 0, m = 0;
    const double* init_v = nullptr;   // [m] or null
    const int64_t* hint = nullptr;    // [n] or null (used with init_v only)
    int64_t* col4row = nullptr;       // out [n]
    double* u = nullptr;              // out [n] or null
    double* v = nullptr;              // out [m] or null
};

template <class K, class T, bool MAX>
class Solver {
  public:
    Solver(const T* c, int n, int m, Workspace& w)
        : c_(c), n_(n), m_(m), v_(w.v.data()), d_(w.d.data()), rv_(w.rv.data()),
          rd_(w.rd.data()), pred_(w.pred.data()), y_(w.y.data()), x_(w.x.data()),
          fr_(w.freel.data()), rcol_(w.rcol.data()), cnt_(w.cnt.data()) {}

    Status run(const double* init_v, const int64_t* hint) {
        std::fill(x_, x_ + n_, -1);
        std::fill(y_, y_ + m_, -1);
        if (n_ == 0) {
            std::fill(v_, v_ + m_, 0.0);
            return kOk;
        }
        int nfree = 0;
        Status s;
        if (n_ == m_ && init_v == nullptr) {
            s = column_reduction(nfree);
        } else {
            if (n_ == m_ && init_v != nullptr) {
                warm_ = true;
                std::copy(init_v, init_v + m_, v_);
            } else {
                std::fill(v_, v_ + m_, 0.0);
                hint = nullptr;
            }
            s = greedy(hint, nfree);
        }
        if (s != kOk) return s;
        LAP_SET(free0, nfree);
        int npass = 2;
#ifdef PYMERGE_LAP_STATS
        if (const char* e = std::getenv("LAP_PASSES")) npass = std::atoi(e);
#endif
        for (int pass = 0; pass < npass && nfree > 0; ++pass) {
            s = augmenting_row_reduction(nfree);
            if (s != kOk) return s;
            if (pass == 0) LAP_SET(free1, nfree);
        }
        LAP_SET(free2, nfree);
        for (int k = 0; k < nfree; ++k) {
            s = augment(fr_[k]);
            if (s != kOk) return s;
        }
        return kOk;
    }

    void outputs(int64_t* col4row, double* u, double* v) const {
        for (int i = 0; i < n_; ++i) col4row[i] = x_[i];
        if (u)
            for (int i = 0; i < n_; ++i) u[i] = widen<MAX>(row(i)[x_[i]]) - v_[x_[i]];
        if (v) std::copy(v_, v_ + m_, v);
    }

  private:
    const T* row(int i) const { return c_ + static_cast<int64_t>(i) * m_; }
    double cost(int i, int j) const { return widen<MAX>(row(i)[j]); }

    // Square, cold: v(j) = column minimum; each column goes to its lowest
    // minimising row when that row is still free (columns in ascending order, so
    // a constant matrix starts from column 0 -> row 0).  Rows matched exactly
    // once get the reduction transfer; unmatched rows are free.
    Status column_reduction(int& nfree) {
        bool bad = K::template colreduce<T, MAX>(c_, n_, m_, nullptr, d_, pred_);
        if (bad) return kBad;
        for (int j = 0; j < m_; ++j)
            if (!(d_[j] < kInf)) return kInfeasible;  // a column with no allowed row
        std::copy(d_, d_ + m_, v_);
        std::fill(cnt_, cnt_ + n_, 0);
        for (int j = 0; j < m_; ++j) {
            int i = pred_[j];
            if (x_[i] < 0) {
                x_[i] = j;
                y_[j] = i;
            }
            ++cnt_[i];
        }
        nfree = 0;
        for (int i = 0; i < n_; ++i) {
            if (cnt_[i] == 0) {
                fr_[nfree++] = i;
            } else if (cnt_[i] == 1) {
                // reduction transfer: v(j1) -= min_{j != j1} c'(i, j) - v(j)
                int j1 = x_[i];
                bool b = false;
                Min2 r = K::template min2<T, MAX>(row(i), v_, m_, &b);
                double mn = (r.j1 == j1) ? r.u2 : r.u1;
                if (mn < kInf) v_[j1] -= mn;
            }
        }
        return kOk;
    }

    // Warm square or rectangular: each row takes its cheapest reduced column when
    // that column is free (on ties: the hinted column, else the first free one).
    // Also validates every entry and detects rows with no allowed column.
    Status greedy(const int64_t* hint, int& nfree) {
        bool bad = false, infeasible = false;
        nfree = 0;
        for (int i = 0; i < n_; ++i) {
            Min2 r = K::template min2<T, MAX>(row(i), v_, m_, &bad);
            if (!(r.u1 < kInf)) {
                infeasible = true;
                continue;
            }
            int j = r.j1;
            if (hint != nullptr && hint[i] >= 0 && y_[hint[i]] < 0 &&
                cost(i, static_cast<int>(hint[i])) - v_[hint[i]] == r.u1) {
                j = static_cast<int>(hint[i]);
            } else if (y_[j] >= 0 && r.u2 == r.u1) {
                j = find_free_tied(i, r.u1);
            }
            if (j >= 0 && y_[j] < 0) {
                x_[i] = j;
                y_[j] = i;
            } else {
                fr_[nfree++] = i;
            }
        }
        if (bad) return kBad;
        if (infeasible) return kInfeasible;
        return kOk;
    }

    int find_free_tied(int i, double u1) const {
        LAP_STAT(tied);
        return K::template find_free_tied<T, MAX>(row(i), v_, y_, m_, u1);
    }

    // JV augmenting row reduction (one pass over the current free rows).
    Status augmenting_row_reduction(int& nfree) {
        int k = 0, prev = nfree;
        nfree = 0;
        // Re-processing displaced rows costs one row pass each and saves long
        // Dijkstra searches on large problems; bounded to n * clamp(n / 512, 1/4, 8).
        // A warm start leaves fewer, cheaper free rows: a quarter of the budget.
        double factor = std::min(8.0, std::max(0.25, n_ / 512.0)) * (warm_ ? 0.25 : 1.0);
        int64_t budget = static_cast<int64_t>(factor * n_) + 8;
#ifdef PYMERGE_LAP_STATS
        if (const char* e = std::getenv("LAP_BUDGET")) budget = static_cast<int64_t>(std::atof(e) * n_);
#endif
        while (k < prev) {
            int i = fr_[k++];
            bool b = false;
            Min2 r = K::template min2<T, MAX>(row(i), v_, m_, &b);
            LAP_STAT(min2);
            if (!(r.u1 < kInf)) return kInfeasible;
            int j1 = r.j1;
            int i0 = y_[j1];
            bool strict = r.u1 < r.u2 && r.u2 < kInf;
            if (strict) {
                v_[j1] -= r.u2 - r.u1;
            } else if (i0 >= 0 && r.u1 == r.u2) {
                int jf = find_free_tied(i, r.u1);
                if (jf >= 0) {
                    j1 = jf;
                    i0 = -1;
                }
            }
            if (i0 >= 0) {
                x_[i0] = -1;
                if (strict && budget-- > 0)
                    fr_[--k] = i0;
                else
                    fr_[nfree++] = i0;
            }
            x_[i] = j1;
            y_[j1] = i;
        }
        return kOk;
    }

    // Shortest augmenting path from free row f (Dijkstra over columns).
    Status augment(int f) {
        double level = K::template scan<T, MAX, true>(row(f), v_, d_, pred_, m_, 0.0, f);
        double next = level;
        int nready = 0, sp = 0, jfree = -1;
        for (;;) {
            if (sp == nready) {
                level = next;
                if (!(level < kInf)) {
                    restore(nready);
                    return kInfeasible;
                }
                LAP_STAT(collects);
                int j = K::find_eq(d_, m_, 0, level);
                while (j < m_) {
                    rcol_[nready] = j;
                    rv_[nready] = v_[j];
                    rd_[nready] = d_[j];
                    ++nready;
                    v_[j] = -kInf;
                    d_[j] = kInf;
                    if (y_[j] < 0) {
                        jfree = j;
                        break;
                    }
                    j = K::find_eq(d_, m_, j + 1, level);
                }
                if (jfree >= 0) break;
            }
            // scan the rows of up to four columns of this level in one pass
            const T* rows[4];
            double hs[4];
            int32_t ids[4];
            int cnt = std::min(4, nready - sp);
            if (cnt == 3) cnt = 2;
            for (int q = 0; q < cnt; ++q, ++sp) {
                int j = rcol_[sp];
                int i = y_[j];
                rows[q] = row(i);
                hs[q] = (cost(i, j) - rv_[sp]) - level;
                ids[q] = i;
                LAP_STAT(scans);
            }
            if (cnt == 4)
                next = K::template scanN<T, MAX, 4>(rows, hs, ids, v_, d_, pred_, m_);
            else if (cnt == 2)
                next = K::template scanN<T, MAX, 2>(rows, hs, ids, v_, d_, pred_, m_);
            else
                next = K::template scan<T, MAX, false>(rows[0], v_, d_, pred_, m_, hs[0], ids[0]);
        }
        // dual update on the finished columns, then flip the path
        for (int k = 0; k < nready; ++k) v_[rcol_[k]] = rv_[k] + (rd_[k] - level);
        int j = jfree;
        for (;;) {
            int i = pred_[j];
            y_[j] = i;
            int t = x_[i];
            x_[i] = j;
            if (i == f) break;
            j = t;
        }
        return kOk;
    }

    void restore(int nready) {
        for (int k = 0; k < nready; ++k) v_[rcol_[k]] = rv_[k];
    }

    const T* c_;
    int n_, m_;
    bool warm_ = false;

    double *v_, *d_, *rv_, *rd_;
    int32_t *pred_, *y_, *x_, *fr_, *rcol_, *cnt_;
};

}  // namespace pymerge_lap

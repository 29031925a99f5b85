// pybind11 module pymerge._lap: dense linear assignment on NumPy buffers.
//
//   solve(cost, maximize=False, init_col4row=None, init_v=None) -> (col4row, u, v)
//   solve_batch(costs, maximize=False, threads=0) -> col4row [B, n]
//   __simd__  : the kernel set picked at import ("avx512", "avx2" or "scalar"); the
//               best the CPU supports, or $PYMERGE_LAP_SIMD when that names a
//               supported one (e.g. PYMERGE_LAP_SIMD=scalar)
//   _set_simd(name) / _simd_available() / _num_threads() : test hooks
//
// Threads: solve_batch(threads=0) uses $PYMERGE_NUM_THREADS, else
// std::thread::hardware_concurrency(), capped by the batch size and by the
// amount of work (about 64k cost entries per thread at least).
//
// The algorithm lives in lap_solver.hpp, the vector kernels in lap_kernels.hpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "lap_solver.hpp"
#include "py_args.hpp"

namespace py = pybind11;
using namespace pymerge_lap;

namespace {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

bool isa_supported(Isa isa) {
#if PYMERGE_LAP_X86
    __builtin_cpu_init();
    switch (isa) {
        case Isa::kScalar:
            return true;
        case Isa::kAvx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") &&
                   __builtin_cpu_supports("popcnt");
        case Isa::kAvx512:
            return isa_supported(Isa::kAvx2) && __builtin_cpu_supports("avx512f") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512bw");
    }
    return false;
#else
    return isa == Isa::kScalar;
#endif
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::kAvx512:
            return "avx512";
        case Isa::kAvx2:
            return "avx2";
        default:
            return "scalar";
    }
}

Isa best_isa() {
    const char* env = std::getenv("PYMERGE_LAP_SIMD");
    if (env != nullptr && *env != '\0') {
        std::string s(env);
        for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
            if (s == isa_name(isa) && isa_supported(isa)) return isa;
    }
    if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
    if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
    return Isa::kScalar;
}

std::atomic<int> g_isa{static_cast<int>(Isa::kScalar)};

template <class K, class T, bool MAX>
Status run_solver(const Problem& p, Workspace& w) {
    w.ensure(p.n, p.m);
    Solver<K, T, MAX> s(static_cast<const T*>(p.cost), p.n, p.m, w);
    Status st = s.run(p.init_v, p.hint);
    if (st == kOk) s.outputs(p.col4row, p.u, p.v);
    return st;
}

template <class T, bool MAX>
Status dispatch_isa(Isa isa, const Problem& p, Workspace& w) {
#if PYMERGE_LAP_X86
    if (isa == Isa::kAvx512) return run_solver<KAvx512, T, MAX>(p, w);
    if (isa == Isa::kAvx2) return run_solver<KAvx2, T, MAX>(p, w);
#endif
    (void)isa;
    return run_solver<KScalar, T, MAX>(p, w);
}

Status solve_one(bool is_f32, bool maximize, Isa isa, const Problem& p, Workspace& w) {
    if (is_f32)
        return maximize ? dispatch_isa<float, true>(isa, p, w)
                        : dispatch_isa<float, false>(isa, p, w);
    return maximize ? dispatch_isa<double, true>(isa, p, w)
                    : dispatch_isa<double, false>(isa, p, w);
}

// Message for a kBad status: which invalid value the matrix holds.
template <class T>
std::string bad_message(const T* c, int64_t count, bool maximize) {
    bool has_nan = false;
    for (int64_t k = 0; k < count; ++k)
        if (std::isnan(c[k])) {
            has_nan = true;
            break;
        }
    if (has_nan) return "cost matrix contains NaN";
    return maximize ? "cost matrix contains +inf (invalid when maximize=True; -inf marks a "
                      "forbidden pair)"
                    : "cost matrix contains -inf (invalid when minimising; +inf marks a "
                      "forbidden pair)";
}

std::string status_message(Status st, const void* c, bool is_f32, int64_t count, bool maximize) {
    if (st == kInfeasible) return "cost matrix is infeasible";
    return is_f32 ? bad_message(static_cast<const float*>(c), count, maximize)
                  : bad_message(static_cast<const double*>(c), count, maximize);
}

// dtype check: float32 or float64, C-contiguous, aligned, native byte order.
bool check_cost(const py::array& a, int ndim, const char* what) {
    if (a.ndim() != ndim)
        throw py::value_error(std::string(what) + " must be " + std::to_string(ndim) +
                              "-D, got " + std::to_string(a.ndim()) + "-D");
    py::dtype dt = a.dtype();
    bool f32 = dt.is(py::dtype::of<float>());
    bool f64 = dt.is(py::dtype::of<double>());
    if (!f32 && !f64)
        throw py::type_error(std::string(what) + " must have dtype float32 or float64, got " +
                             std::string(py::str(dt)));
    if (!(a.flags() & py::array::c_style) || !(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw py::type_error(std::string(what) +
                             " must be a C-contiguous, aligned array (use np.ascontiguousarray)");
    return f32;
}

int env_threads() {
    const char* env = std::getenv("PYMERGE_NUM_THREADS");
    if (env != nullptr && *env != '\0') {
        int t = std::atoi(env);
        if (t > 0) return t;
    }
    unsigned hc = std::thread::hardware_concurrency();
    return hc == 0 ? 1 : static_cast<int>(hc);
}

py::tuple solve(const py::array& cost, bool maximize, const py::object& init_col4row,
                const py::object& init_v) {
    bool f32 = check_cost(cost, 2, "cost");
    const int64_t n64 = cost.shape(0), m64 = cost.shape(1);
    if (n64 > m64)
        throw py::value_error("cost has more rows than columns (" + std::to_string(n64) + " > " +
                              std::to_string(m64) + "); transpose it first");
    if (m64 >= (int64_t{1} << 31) - 1) throw py::value_error("cost has too many columns");
    const int n = static_cast<int>(n64), m = static_cast<int>(m64);

    // warm start: copied, validated
    std::vector<double> v0;
    std::vector<int64_t> hint;
    if (!init_v.is_none()) {
        auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(init_v);
        if (!a) throw py::type_error("init_v must be a float64 array of column duals");
        if (a.ndim() != 1 || a.shape(0) != m)
            throw py::value_error("init_v must have shape (" + std::to_string(m) +
                                  ",) (one dual per column)");
        v0.assign(a.data(), a.data() + m);
        for (int j = 0; j < m; ++j)
            if (!std::isfinite(v0[j]))
                throw py::value_error("init_v contains a non-finite value at index " +
                                      std::to_string(j));
    }
    if (!init_col4row.is_none()) {
        auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(
            init_col4row);
        if (!a) throw py::type_error("init_col4row must be an integer array");
        if (a.ndim() != 1 || a.shape(0) != n)
            throw py::value_error("init_col4row must have shape (" + std::to_string(n) + ",)");
        hint.assign(a.data(), a.data() + n);
        std::vector<char> seen(m, 0);
        for (int i = 0; i < n; ++i) {
            int64_t j = hint[i];
            if (j == -1) continue;
            if (j < 0 || j >= m)
                throw py::value_error("init_col4row[" + std::to_string(i) + "] = " +
                                      std::to_string(j) + " is out of range [-1, " +
                                      std::to_string(m) + ")");
            if (seen[j])
                throw py::value_error("init_col4row assigns column " + std::to_string(j) +
                                      " twice");
            seen[j] = 1;
        }
    }

    py::array_t<int64_t> col4row(n);
    py::array_t<double> u(n), v(m);
    Problem p;
    p.cost = cost.data();
    p.n = n;
    p.m = m;
    p.init_v = v0.empty() ? nullptr : v0.data();
    p.hint = (hint.empty() || v0.empty()) ? nullptr : hint.data();
    p.col4row = col4row.mutable_data();
    p.u = u.mutable_data();
    p.v = v.mutable_data();
    Status st;
    {
        py::gil_scoped_release nogil;
        Workspace w;
        st = solve_one(f32, maximize, static_cast<Isa>(g_isa.load()), p, w);
    }
    if (st != kOk) throw py::value_error(status_message(st, p.cost, f32, n64 * m64, maximize));
    return py::make_tuple(col4row, u, v);
}

constexpr long long kMaxThreads = 1024;

py::array_t<int64_t> solve_batch(const py::array& costs, bool maximize, py::handle threads_h) {
    // checked before any conversion: an out-of-range int must not reach pybind's overload
    // error, which prints the whole cost array
    const int threads =
        static_cast<int>(pymerge_py::checked_int(threads_h, "threads", 0, kMaxThreads));
    bool f32 = check_cost(costs, 3, "costs");
    const int64_t B = costs.shape(0), n64 = costs.shape(1), m64 = costs.shape(2);
    if (n64 > m64)
        throw py::value_error("costs has more rows than columns per problem (" +
                              std::to_string(n64) + " > " + std::to_string(m64) +
                              "); transpose the last two axes first");
    if (m64 >= (int64_t{1} << 31) - 1) throw py::value_error("costs has too many columns");
    const int n = static_cast<int>(n64), m = static_cast<int>(m64);
    py::array_t<int64_t> out({B, n64});
    int64_t* out_p = out.mutable_data();
    const char* base = static_cast<const char*>(costs.data());
    const int64_t stride = n64 * m64 * (f32 ? 4 : 8);
    const Isa isa = static_cast<Isa>(g_isa.load());

    int nt = threads > 0 ? threads : env_threads();
    // small problems: keep at least ~64k cost entries per thread
    int64_t work = B * n64 * m64;
    nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({nt, B, work / 65536 + 1})));
    if (threads > 0) nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, B)));

    std::atomic<int64_t> next{0};
    std::atomic<int64_t> first_bad{B};
    std::vector<int> codes(static_cast<size_t>(B > 0 ? B : 1), 0);

    auto worker = [&]() {
        Workspace w;
        w.ensure(n, m);
        const int64_t chunk = 1;  // a preempted thread holds back at most one problem
        for (;;) {
            int64_t b0 = next.fetch_add(chunk);
            if (b0 >= B) break;
            int64_t b1 = std::min(B, b0 + chunk);
            for (int64_t b = b0; b < b1; ++b) {
                if (b > first_bad.load(std::memory_order_relaxed)) return;
                Problem p;
                p.cost = base + b * stride;
                p.n = n;
                p.m = m;
                p.col4row = out_p + b * n64;
                Status st = solve_one(f32, maximize, isa, p, w);
                if (st != kOk) {
                    codes[b] = st;
                    int64_t cur = first_bad.load();
                    while (b < cur && !first_bad.compare_exchange_weak(cur, b)) {
                    }
                }
            }
        }
    };
    {
        py::gil_scoped_release nogil;
        if (nt <= 1 || B <= 1) {
            worker();
        } else {
            std::vector<std::thread> pool;
            pool.reserve(nt - 1);
            for (int t = 0; t < nt - 1; ++t) pool.emplace_back(worker);
            worker();
            for (auto& th : pool) th.join();
        }
    }
    int64_t fb = first_bad.load();
    if (fb < B) {
        Status st = static_cast<Status>(codes[fb]);
        throw py::value_error("problem " + std::to_string(fb) + ": " +
                              status_message(st, base + fb * stride, f32, n64 * m64, maximize));
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_lap, mod) {
    mod.doc() =
        "Dense linear sum assignment (Jonker-Volgenant shortest augmenting paths) with "
        "vectorised scans, warm start and a threaded batch API.";
    Isa isa = best_isa();
    g_isa = static_cast<int>(isa);
    mod.attr("__simd__") = isa_name(isa);
    mod.attr("_max_threads") = kMaxThreads;

    mod.def("solve", &solve, py::arg("cost"), py::arg("maximize") = false,
            py::arg("init_col4row") = py::none(), py::arg("init_v") = py::none(),
            R"doc(Solve one dense assignment problem.

cost: float32/float64 C-contiguous [n, m] with n <= m (float32 is scanned as float32,
    duals and sums are float64). +inf marks a forbidden pair (-inf when maximize).
maximize: maximise the total instead of minimising it.
init_col4row: optional int64 [n] previous assignment (-1 = none); a tie-break hint used
    together with init_v.
init_v: optional float64 [m] column duals returned by a previous solve (warm start,
    square problems).

Returns (col4row int64 [n], u float64 [n], v float64 [m]) with, for c' = cost
(or -cost when maximize): u[i] + v[j] <= c'[i, j] and equality on the assignment.
Raises ValueError on NaN / invalid infinities / infeasible problems / malformed warm
start, TypeError on a wrong dtype or layout.)doc");
    mod.def("solve_batch", &solve_batch, py::arg("costs"), py::arg("maximize") = false,
            py::arg("threads") = 0,
            R"doc(Solve a stack of problems costs [B, n, m] (n <= m), float32/float64,
C-contiguous, on `threads` threads (0 to 1024; 0: $PYMERGE_NUM_THREADS or all cores).
Returns col4row int64 [B, n]. Errors name the first bad problem.)doc");
    mod.def(
        "_set_simd",
        [mod](const std::string& name) mutable {
            for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
                if (name == isa_name(i)) {
                    if (!isa_supported(i))
                        throw py::value_error("SIMD path '" + name + "' is not supported by this CPU");
                    g_isa = static_cast<int>(i);
                    mod.attr("__simd__") = isa_name(i);
                    return;
                }
            }
            throw py::value_error("unknown SIMD path '" + name + "' (scalar, avx2, avx512)");
        },
        py::arg("name"), "Test hook: force the kernel set ('scalar', 'avx2', 'avx512').");
    mod.def(
        "_simd_available",
        []() {
            py::list out;
            for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
                if (isa_supported(i)) out.append(isa_name(i));
            return out;
        },
        "Kernel sets this CPU can run.");
#ifdef PYMERGE_LAP_STATS
    mod.def("_stats", []() {
        py::dict dd;
        dd["min2"] = g_stats.min2; dd["tied"] = g_stats.tied; dd["scans"] = g_stats.scans;
        dd["collects"] = g_stats.collects; dd["free0"] = g_stats.free0; dd["free1"] = g_stats.free1;
        dd["free2"] = g_stats.free2; g_stats = Stats();
        return dd;
    });
#endif
    mod.def(
        "_num_threads", []() { return env_threads(); },
        "Threads solve_batch uses when threads=0.");
}

// Checked CPU buffers and storage-type conversions, shared by pymerge._multi_tensor
// (csrc/multi_tensor.cpp) and pymerge._task_vectors (csrc/task_vectors.cpp).
//
// Every buffer is a NumPy array or a DLPack capsule, read from its own description (pointer,
// element count, element type, contiguity, alignment, device) before any work, and a wrong
// one is a ValueError / TypeError naming it.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "py_args.hpp"

#if defined(__GNUC__) || defined(__clang__)
#define PYMERGE_BUF_INLINE inline __attribute__((always_inline))
#else
#define PYMERGE_BUF_INLINE inline
#endif

namespace pymerge_buf {

namespace py = pybind11;

// ------------------------------------------------------------------ storage types
// Each type converts one element to / from fp32 exactly as IEEE (and torch) do: widening
// is exact, narrowing rounds to nearest even, NaN stays a (quiet) NaN.

PYMERGE_BUF_INLINE uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

PYMERGE_BUF_INLINE float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

struct F32 {
    using S = float;
    static PYMERGE_BUF_INLINE float load(S v) { return v; }
    static PYMERGE_BUF_INLINE S store(float v) { return v; }
};

struct BF16 {
    using S = uint16_t;
    static PYMERGE_BUF_INLINE float load(S v) { return float_of(static_cast<uint32_t>(v) << 16); }
    // a NaN keeps its sign and top payload bits and is made quiet
    static PYMERGE_BUF_INLINE S store(float f) {
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
    static PYMERGE_BUF_INLINE float load(S h) {
        const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
        const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
        if (exp == 0x1F) return float_of(sign | 0x7F800000u | (man << 13));  // inf / nan
        if (exp != 0) return float_of(sign | ((exp + 112u) << 23) | (man << 13));
        return float_of(sign | bits_of(static_cast<float>(man) * 5.9604644775390625e-8f));
    }
    static PYMERGE_BUF_INLINE S store(float f) {
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

inline Dt parse_dtype(const std::string& s, const char* what) {
    if (s == "float32") return Dt::kF32;
    if (s == "float16") return Dt::kF16;
    if (s == "bfloat16") return Dt::kBF16;
    throw py::type_error(std::string(what) + " must be 'float32', 'float16' or 'bfloat16', got '" +
                         s + "'");
}

// ------------------------------------------------------------------ checked buffers
// Every buffer argument is read here, before the GIL is released, from the buffer's own
// description: data pointer, element count, element type, contiguity, alignment and device
// never come from separate arguments. Two kinds of buffers are accepted:
//   * NumPy arrays (any object that is a numpy.ndarray): float32, float16 or a 16-bit
//     integer view of fp16/bf16 bits (``t.view(torch.int16).numpy()``), int64 for maps;
//   * DLPack capsules ("dltensor" / "dltensor_versioned", e.g.
//     ``torch.utils.dlpack.to_dlpack(t)``), whose dtype names bf16 and fp16 apart. The
//     interpolation front passes these: one costs ~0.16 us per tensor to make, a NumPy view
//     0.5 us (1 us for bf16), and a state dict has hundreds of tensors.
// A capsule is only read, never consumed: its owner frees it as usual. The call holds a
// reference to every buffer object until it returns.

// The DLPack structures (https://dmlc.github.io/dlpack/latest/c_api.html), fields as laid out
// by the specification.
struct DLDevice {
    int32_t device_type;
    int32_t device_id;
};
struct DLDataType {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
};
struct DLTensor {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;
    int64_t* strides;  // in elements; null: compact row-major
    uint64_t byte_offset;
};
struct DLManagedTensor {
    DLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensor*);
};
struct DLPackVersion {
    uint32_t major;
    uint32_t minor;
};
struct DLManagedTensorVersioned {
    DLPackVersion version;
    void* manager_ctx;
    void (*deleter)(DLManagedTensorVersioned*);
    uint64_t flags;
    DLTensor dl_tensor;
};
constexpr int32_t kDLCPU = 1, kDLCUDAHost = 3;  // CPU memory (plain, or pinned by CUDA)
constexpr uint8_t kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4;
constexpr uint64_t kDLFlagReadOnly = 1;

// Element types of the buffers: the three storage dtypes and int64 (maps).
enum class Elem : int { kF32 = 0, kF16 = 1, kBF16 = 2, kI64 = 3 };

inline Elem elem_of(Dt d) { return static_cast<Elem>(static_cast<int>(d)); }

inline const char* elem_name(Elem e) {
    switch (e) {
        case Elem::kF32:
            return "float32";
        case Elem::kF16:
            return "float16";
        case Elem::kBF16:
            return "bfloat16";
        default:
            return "int64";
    }
}

inline int64_t elem_size(Elem e) {
    switch (e) {
        case Elem::kF32:
            return 4;
        case Elem::kI64:
            return 8;
        default:
            return 2;
    }
}

// A buffer that is not contiguous: raised as the calling module's NotContiguousError (a
// ValueError), so that a caller can tell it apart and retry with contiguous copies. Both
// modules share this type, so each registers its translator module-locally
// (py::register_local_exception): a global one would make the last module imported raise
// its own class for the other's calls.
struct NotContiguous : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Where an argument sits, for messages: "inputs[1][3]", "a[0]", "out" (built only on error).
struct Where {
    const char* what;
    int64_t i = -1;
    int64_t j = -1;
    std::string str() const {
        std::string s(what);
        if (i >= 0) s += "[" + std::to_string(i) + "]";
        if (j >= 0) s += "[" + std::to_string(j) + "]";
        return s;
    }
};

struct Buf {
    char* data;
    int64_t numel;
};

inline std::string dims(const int64_t* v, int32_t n) {
    std::string s = "(";
    for (int32_t d = 0; d < n; ++d) s += (d ? ", " : "") + std::to_string(v[d]);
    return s + (n == 1 ? ",)" : ")");
}

inline std::string dl_dtype_name(DLDataType t) {
    const char* kind = t.code == kDLFloat    ? "float"
                       : t.code == kDLBfloat ? "bfloat"
                       : t.code == kDLInt    ? "int"
                       : t.code == kDLUInt   ? "uint"
                                             : "code" ;
    std::string s = std::string(kind) + std::to_string(t.bits);
    if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
    return s;
}

inline bool dl_dtype_ok(DLDataType t, Elem e) {
    if (t.lanes != 1) return false;
    switch (e) {
        case Elem::kF32:
            return t.code == kDLFloat && t.bits == 32;
        case Elem::kF16:
            return t.code == kDLFloat && t.bits == 16;
        case Elem::kBF16:
            return t.code == kDLBfloat && t.bits == 16;
        default:
            return t.code == kDLInt && t.bits == 64;
    }
}

inline Buf check_aligned(char* data, int64_t numel, Elem e, const Where& w) {
    if (numel > 0 && reinterpret_cast<uintptr_t>(data) % static_cast<uintptr_t>(elem_size(e)))
        throw py::value_error(w.str() + " is not aligned to its " + std::to_string(elem_size(e)) +
                              "-byte elements");
    return Buf{data, numel};
}

inline Buf from_capsule(PyObject* cap, Elem e, bool write, const Where& w) {
    const char* name = PyCapsule_GetName(cap);
    if (name == nullptr) throw py::error_already_set();
    const DLTensor* t = nullptr;
    uint64_t flags = 0;
    if (std::strcmp(name, "dltensor") == 0) {
        auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, name));
        if (m == nullptr) throw py::error_already_set();
        t = &m->dl_tensor;
    } else if (std::strcmp(name, "dltensor_versioned") == 0) {
        auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, name));
        if (m == nullptr) throw py::error_already_set();
        if (m->version.major != 1)
            throw py::type_error(w.str() + ": DLPack version " + std::to_string(m->version.major) +
                                 " is not supported (1.x is)");
        t = &m->dl_tensor;
        flags = m->flags;
    } else {
        throw py::type_error(w.str() + ": capsule '" + name +
                             "' is not an unconsumed DLPack tensor ('dltensor')");
    }
    if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost)
        throw py::value_error(w.str() + ": DLPack device type " +
                              std::to_string(t->device.device_type) + " is not CPU memory");
    if (!dl_dtype_ok(t->dtype, e))
        throw py::type_error(w.str() + " has dtype " + dl_dtype_name(t->dtype) + ", expected " +
                             elem_name(e));
    if (t->ndim < 0 || (t->ndim > 0 && t->shape == nullptr))
        throw py::value_error(w.str() + ": malformed DLPack shape");
    int64_t numel = 1;
    for (int32_t d = 0; d < t->ndim; ++d) {
        if (t->shape[d] < 0) throw py::value_error(w.str() + ": negative DLPack shape");
        numel *= t->shape[d];
    }
    if (t->strides != nullptr && numel > 0) {
        int64_t expect = 1;
        for (int32_t d = t->ndim - 1; d >= 0; --d) {
            if (t->shape[d] != 1 && t->strides[d] != expect)
                throw NotContiguous(w.str() + " is not contiguous (shape " +
                                    dims(t->shape, t->ndim) + ", strides " +
                                    dims(t->strides, t->ndim) + ")");
            expect *= t->shape[d];
        }
    }
    if (write && (flags & kDLFlagReadOnly))
        throw py::value_error(w.str() + " is read-only");
    if (numel > 0 && t->data == nullptr) throw py::value_error(w.str() + " has no data");
    char* data = static_cast<char*>(t->data) + t->byte_offset;
    return check_aligned(data, numel, e, w);
}

inline bool native_order(const py::dtype& dt) {
    const char o = dt.byteorder();
    const uint16_t probe = 1;
    const bool little = *reinterpret_cast<const uint8_t*>(&probe) == 1;
    return o == '=' || o == '|' || o == (little ? '<' : '>');
}

inline bool numpy_dtype_ok(const py::dtype& dt, Elem e) {
    const char k = dt.kind();
    const py::ssize_t s = dt.itemsize();
    switch (e) {
        case Elem::kF32:
            return k == 'f' && s == 4;
        case Elem::kF16:
            return s == 2 && (k == 'f' || k == 'i' || k == 'u');
        case Elem::kBF16:
            return s == 2 && (k == 'i' || k == 'u');
        default:
            return k == 'i' && s == 8;
    }
}

inline const char* numpy_expected(Elem e) {
    switch (e) {
        case Elem::kF32:
            return "float32";
        case Elem::kF16:
            return "float16, int16 or uint16 (the bits of float16 values)";
        case Elem::kBF16:
            return "int16 or uint16 (the bits of bfloat16 values)";
        default:
            return "int64";
    }
}

inline Buf from_array(const py::array& a, Elem e, bool write, const Where& w) {
    const py::dtype dt = a.dtype();
    if (!numpy_dtype_ok(dt, e) || !native_order(dt))
        throw py::type_error(w.str() + " has dtype " + std::string(py::str(dt)) + ", expected " +
                             numpy_expected(e));
    if (!(a.flags() & py::array::c_style))
        throw NotContiguous(w.str() + " is not C-contiguous (use np.ascontiguousarray)");
    if (write && !a.writeable()) throw py::value_error(w.str() + " is read-only");
    const int64_t numel = static_cast<int64_t>(a.size());
    return check_aligned(static_cast<char*>(const_cast<void*>(a.data())), numel, e, w);
}

inline Buf read_buffer(py::handle h, Elem e, bool write, const Where& w) {
    if (PyCapsule_CheckExact(h.ptr())) return from_capsule(h.ptr(), e, write, w);
    if (py::isinstance<py::array>(h))
        return from_array(py::reinterpret_borrow<py::array>(h), e, write, w);
    throw py::type_error(w.str() +
                         " must be a NumPy array or a DLPack capsule "
                         "(torch.utils.dlpack.to_dlpack(t)), got " +
                         std::string(py::str(py::type::handle_of(h).attr("__name__"))));
}

// The items of a list or tuple argument, held (referenced) for the call.
inline std::vector<py::object> items(py::handle seq, const Where& w) {
    PyObject* s = seq.ptr();
    const bool list = PyList_Check(s);
    if (!list && !PyTuple_Check(s))
        throw py::type_error(w.str() + " must be a list or tuple, got " +
                             std::string(py::str(py::type::handle_of(seq).attr("__name__"))));
    const py::ssize_t n = list ? PyList_GET_SIZE(s) : PyTuple_GET_SIZE(s);
    std::vector<py::object> out;
    out.reserve(static_cast<size_t>(n));
    for (py::ssize_t i = 0; i < n; ++i)
        out.push_back(py::reinterpret_borrow<py::object>(list ? PyList_GET_ITEM(s, i)
                                                              : PyTuple_GET_ITEM(s, i)));
    return out;
}

// A list or tuple of numbers, as doubles.
inline std::vector<double> floats(py::handle seq, const char* what) {
    std::vector<double> out;
    const std::vector<py::object> xs = items(seq, Where{what});
    out.reserve(xs.size());
    for (size_t i = 0; i < xs.size(); ++i) {
        const double v = PyFloat_AsDouble(xs[i].ptr());
        if (v == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            throw py::type_error(Where{what, static_cast<int64_t>(i)}.str() + " = " +
                                 std::string(py::repr(xs[i])) + " is not a number");
        }
        out.push_back(v);
    }
    return out;
}

inline Dt dtype_arg(py::handle h, const char* what) {
    if (!PyUnicode_Check(h.ptr()))
        throw py::type_error(std::string(what) +
                             " must be 'float32', 'float16' or 'bfloat16', got " +
                             std::string(py::repr(h)));
    return parse_dtype(h.cast<std::string>(), what);
}

constexpr long long kMaxThreads = 1024;

inline int threads_arg(py::handle h) {
    return static_cast<int>(pymerge_py::checked_int(h, "threads", 1, kMaxThreads));
}

// Whether [p, p + n) and [q, q + m) share a byte.
inline bool overlap(const char* p, int64_t n, const char* q, int64_t m) {
    return n > 0 && m > 0 && p < q + m && q < p + n;
}


}  // namespace pymerge_buf

// Checks of the scalar arguments of the pybind11 modules (pymerge._lap, pymerge._multi_tensor).
//
// An argument declared as a C++ `int` makes pybind11 reject an out-of-range Python int with
// its overload error, which prints the signature and the repr of every argument (a whole
// cost array, say). These helpers take the Python object instead and raise an error that
// names the argument, the value and the valid range.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

namespace pymerge_py {

// `value` as an integer in [lo, hi]: TypeError for non-integers (bools included), ValueError
// naming `what`, the value and the range otherwise.
inline long long checked_int(pybind11::handle value, const char* what, long long lo,
                             long long hi) {
    namespace py = pybind11;
    const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
    PyObject* obj = value.ptr();
    if (PyBool_Check(obj) || !PyIndex_Check(obj))
        throw py::type_error(std::string(what) + " must be an integer in " + range + ", got " +
                             std::string(py::repr(value)));
    py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj));
    if (!index) throw py::error_already_set();
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (overflow != 0 || v < lo || v > hi)
        throw py::value_error(std::string(what) + "=" + std::string(py::str(index)) +
                              " is out of range " + range);
    return v;
}

}  // namespace pymerge_py

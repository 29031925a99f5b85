// placeholder: replaced by the assignment solver (issue 2)
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_lap, m) { m.attr("__version__") = "0"; }

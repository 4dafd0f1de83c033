// The fused_opt library: its ops (csrc/schemas.h) and the Python module that loads it.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(fused_opt, m) { fused_opt::define_ops(m); }

// `import fused_opt._C` loads this library, which registers the ops above; the module itself
// exposes nothing, so it needs no binding layer.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

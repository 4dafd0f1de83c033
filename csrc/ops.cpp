// Every op schema, once. Backends register their kernels beside them (csrc/cpu, csrc/cuda).
// All ops update tensor lists in place and return nothing; the lists they write are marked (x!).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_opt, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, *, "
      "float lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? lr_tensor=None) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "bool[] is_first_step, *, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, Tensor? lr_tensor=None) -> ()");
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers, Tensor(e!)[] steps, *, float lr, "
      "float alpha, float eps, float weight_decay, float momentum, bool centered, bool maximize, "
      "Tensor? lr_tensor=None) -> ()");
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor(c!)[] steps, *, float lr, float lr_decay, float weight_decay, float eps, "
      "bool maximize, Tensor? lr_tensor=None) -> ()");
}

// `import fused_opt._C` loads this library, which registers the ops above; the module itself
// exposes nothing, so it needs no binding layer.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

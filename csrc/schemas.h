// Every op schema, once. Backends register their kernels beside them (csrc/cpu, csrc/cuda).
// All ops update tensors in place and return nothing; the tensors they write are marked (x!).
//
// Every step op takes the tensors of several param groups at once, so that one call (and on
// CUDA one launch) covers a whole optimizer: group g owns the next group_sizes[g] params, and
// every hyperparameter is a list with one entry per group. Modes that change which state
// tensors exist (amsgrad, centered, momentum on or off) are the same for the whole call.
//
// Every step op ends with the same arguments:
//   l1_decay / l1_proximal: per group, the L1 penalty and whether it is applied as a proximal
//     step after the update (exact zeros) instead of a subgradient added to the gradient (see
//     math/l1.h). A group with l1_decay 0 runs the loops compiled without L1.
//   master_params: empty, or one float32 master per float16/bfloat16 param, in the params'
//     order. Such a param's update then runs on its master (with float32 states) and writes
//     its rounding into the param; float32 params of the call are their own masters.
//   lr_tensor (Adam: beta1_tensor, beta2_tensor too): per group, None or a one-element tensor
//     read on the device instead of the float beside it, so a value changed in place needs no
//     new call.
//   grad_scale / found_inf: GradScaler's tensors. Gradients are divided by grad_scale in
//     registers; a nonzero found_inf makes the step change nothing, step counters included.
//   grad_norm / max_grad_norm: the unscaled global gradient norm (from grad_norm_) and the
//     clip_grad_norm_ threshold; gradients are clipped in registers.
//   workspace: required with step counters: a one-element int32 tensor, zero before its first
//     use, which the CUDA kernels count finished blocks in (and leave zero) so that one launch
//     both reads and advances the counters. Calls sharing it must not run concurrently.
#pragma once

#include <torch/library.h>

#include <string>

namespace fused_opt {
namespace schema_detail {

inline const std::string kStepArgs =
    "Tensor(z!)[] master_params, *, int[] group_sizes, float[] lr, {hyper}, "
    "float[] l1_decay, bool[] l1_proximal, Tensor?[] lr_tensor, Tensor? grad_scale=None, Tensor? found_inf=None, "
    "Tensor? grad_norm=None, float? max_grad_norm=None, Tensor(w!)? workspace=None) -> ()";

// Parsed by def() at once, so the string may be a temporary.
inline std::string step_schema(const std::string& head, const std::string& hyper) {
  std::string args = kStepArgs;
  args.replace(args.find("{hyper}"), 7, hyper);
  return head + ", " + args;
}

}  // namespace schema_detail

// Defines every op of the library `m` (fused_opt, or the emulation tier's fused_opt_simt).
inline void define_ops(torch::Library& m) {
  using schema_detail::step_schema;
  m.def(step_schema(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps",
      "float[] beta1, float[] beta2, float[] weight_decay, float[] eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor?[] beta1_tensor, "
      "Tensor?[] beta2_tensor")
            .c_str());
  m.def(step_schema(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] steps",
      "float[] momentum, float[] dampening, float[] weight_decay, bool nesterov, "
      "bool maximize")
            .c_str());
  m.def(step_schema(
      "rmsprop_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers, Tensor(e!)[] steps",
      "float[] alpha, float[] eps, float[] weight_decay, float[] momentum, bool centered, "
      "bool maximize")
            .c_str());
  m.def(step_schema(
      "adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor(c!)[] steps",
      "float[] lr_decay, float[] weight_decay, float[] eps, bool maximize")
            .c_str());
  // One read-only pass over the gradients: writes their global L2 norm (divided by grad_scale
  // when given) and whether any element is inf or NaN (1.0 or 0.0). The reduction order is
  // fixed, so the same gradients give the same bits on every run.
  m.def(
      "grad_norm_(Tensor[] grads, Tensor(a!) norm, Tensor(b!) found_inf, "
      "Tensor(c!) workspace, *, Tensor? grad_scale=None) -> ()");
}

}  // namespace fused_opt

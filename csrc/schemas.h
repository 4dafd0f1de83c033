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
//   stochastic_rounding_seed: per group, None (bfloat16 params round to nearest) or the seed
//     with which the group's bfloat16 params round stochastically (math/rounding.h). Such a
//     group needs step counters and no master_params, and has no float16 params.
//   master_params: empty, or one float32 master per float16/bfloat16 param, in the params'
//     order. Such a param's update then runs on its master (with float32 states) and writes
//     its rounding into the param; float32 params of the call are their own masters. A
//     bfloat16 entry beside a bfloat16 param is instead its Kahan compensation
//     (param_rounding="kahan", math/rounding.h): the update runs on param + compensation with
//     the param's own states and stores the param and the new compensation.
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
#include <tuple>
#include <utility>

namespace fused_opt {
namespace schema_detail {

inline const std::string kStepArgs =
    "Tensor(z!)[] master_params, *, int[] group_sizes, float[] lr, {hyper}, "
    "float[] l1_decay, bool[] l1_proximal, int?[] stochastic_rounding_seed, Tensor?[] lr_tensor, "
    "Tensor? grad_scale=None, Tensor? found_inf=None, "
    "Tensor? grad_norm=None, float? max_grad_norm=None, Tensor(w!)? workspace=None) -> ()";

// Parsed by def() at once, so the string may be a temporary.
inline std::string step_schema(const std::string& head, const std::string& hyper) {
  std::string args = kStepArgs;
  args.replace(args.find("{hyper}"), 7, hyper);
  return head + ", " + args;
}

// The arguments every step op ends with, as its kernels take them (after the op's own lists
// and hyperparameters, master_params first).
template <class Lists, class Hypers>
struct StepSignature;
template <class... Lists, class... Hypers>
struct StepSignature<std::tuple<Lists...>, std::tuple<Hypers...>> {
  using type = void(Lists..., at::TensorList master_params, c10::ArrayRef<int64_t> group_sizes,
                    c10::ArrayRef<double> lr, Hypers..., c10::ArrayRef<double> l1_decay,
                    const c10::List<bool>& l1_proximal,
                    const c10::List<std::optional<int64_t>>& stochastic_rounding_seed,
                    const c10::List<std::optional<at::Tensor>>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm,
                    const std::optional<at::Tensor>& workspace);
};

template <size_t kLists>
struct TensorLists {
  template <size_t... I>
  static auto make(std::index_sequence<I...>)
      -> std::tuple<std::enable_if_t<(I >= 0), at::TensorList>...>;
  using type = decltype(make(std::make_index_sequence<kLists>{}));
};

}  // namespace schema_detail

// The C++ signature of each op as its kernels are registered with it: a caller of the op's
// unboxed form (csrc/step_plan.cpp) names it, and the dispatcher checks it against the schema
// below when the caller first looks the op up.
namespace signatures {
using schema_detail::StepSignature;
using schema_detail::TensorLists;
using Floats = c10::ArrayRef<double>;
using HyperTensorList = const c10::List<std::optional<at::Tensor>>&;
using Adam = StepSignature<TensorLists<6>::type,
                           std::tuple<Floats, Floats, Floats, Floats, bool, bool, bool,
                                      HyperTensorList, HyperTensorList>>::type;
using Sgd = StepSignature<TensorLists<4>::type,
                          std::tuple<Floats, Floats, Floats, bool, bool>>::type;
using Rmsprop = StepSignature<TensorLists<6>::type,
                              std::tuple<Floats, Floats, Floats, Floats, bool, bool>>::type;
using Adagrad = StepSignature<TensorLists<4>::type, std::tuple<Floats, Floats, Floats, bool>>::type;
using GradNorm = void(at::TensorList grads, const at::Tensor& norm, const at::Tensor& found_inf,
                      const at::Tensor& workspace, const std::optional<at::Tensor>& grad_scale);
}  // namespace signatures

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

// The ops are never differentiated: optimizers call them under no_grad, and they mutate their
// inputs and return nothing. torch's default autograd kernel for such ops (a boxed fallback that
// only redispatches here) would copy every tensor of every list into boxed form and back on each
// call, which costs more than a small model's kernels; falling through skips it.
inline void skip_autograd(torch::Library& m) {
  for (const char* op : {"adam_", "sgd_", "rmsprop_", "adagrad_", "grad_norm_"}) {
    m.impl(op, torch::CppFunction::makeFallthrough());
  }
}

}  // namespace fused_opt

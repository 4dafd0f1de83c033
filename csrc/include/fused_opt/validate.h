// Checks shared by every op and every backend, run before any tensor is touched.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>

#include "fused_opt/math/grad_scaling.h"
#include "fused_opt/math/l1.h"

namespace fused_opt {

// The names errors give the ops by.
inline constexpr std::string_view kAdamOp = "fused_opt::adam_";
inline constexpr std::string_view kSgdOp = "fused_opt::sgd_";
inline constexpr std::string_view kRmspropOp = "fused_opt::rmsprop_";
inline constexpr std::string_view kAdagradOp = "fused_opt::adagrad_";
inline constexpr std::string_view kGradNormOp = "fused_opt::grad_norm_";

struct NamedList {
  std::string_view name;
  at::TensorList tensors;
  bool required;  // false: the list must be empty when its mode is off, full when on
};

// The optional tensors through which a step reads its gradients (see math/grad_scaling.h).
struct ScalingArgs {
  std::optional<at::Tensor> grad_scale;
  std::optional<at::Tensor> found_inf;
  std::optional<at::Tensor> grad_norm;
  std::optional<double> max_grad_norm;

  // Pointers into the tensors, valid on the device that holds them.
  math::GradScaling view() const;
};

// Whether a param takes one of the call's master_params: with master weights, float16 and
// bfloat16 params take them in order, float32 params are their own masters.
inline bool takes_master(const at::Tensor& param) {
  return param.scalar_type() == at::kHalf || param.scalar_type() == at::kBFloat16;
}

// Whether `master`, the entry of master_params that `param` takes, is its Kahan compensation
// (param_rounding="kahan") rather than a float32 master: a bfloat16 buffer beside a bfloat16
// param, which the update adds to the param and rewrites with what the stored param lacks.
inline bool is_compensation(const at::Tensor& master, const at::Tensor& param) {
  return master.scalar_type() == at::kBFloat16 && param.scalar_type() == at::kBFloat16;
}

// params/grads/states agree in length, device, shape and strides; params are dense, of a
// supported floating dtype; steps (when given) hold one float32 value per param. Without
// master_params the states share the param's dtype. With them, every param is float16 or
// bfloat16, with a float32 master (master_params holds them in the params' order), or float32,
// its own master; all states are float32. A bfloat16 param's entry may instead be its bfloat16
// compensation, and its states then share the param's dtype.
void check_tensor_lists(std::string_view op, at::TensorList params, at::TensorList grads,
                        at::TensorList master_params, std::initializer_list<NamedList> states,
                        std::optional<at::TensorList> steps);

// A hyperparameter given as a tensor (lr_tensor, ...): one element, on the params' device or on
// the CPU, whose memory the host reads without a sync. `group` is the tensor's index in a
// per-group list, for the message.
void check_hyper_tensor(std::string_view op, std::string_view name,
                        const std::optional<at::Tensor>& tensor, const at::Device& device,
                        std::optional<size_t> group = std::nullopt);

// grad_scale, found_inf and grad_norm are one-element float32 tensors on `device`; grad_norm is
// given exactly when max_grad_norm is.
void check_scaling(std::string_view op, const ScalingArgs& scaling, const at::Device& device);

// The consecutive params of one param group in a step call, and their masters.
struct GroupRange {
  size_t group;
  size_t offset;
  size_t size;
  size_t master_offset;
  size_t master_count;

  // The group's entries of a per-param list; an empty list (a state of a mode that is off)
  // stays empty.
  at::TensorList of(at::TensorList list) const {
    return list.empty() ? list : list.slice(offset, size);
  }
  at::TensorList masters_of(at::TensorList master_params) const {
    return master_params.empty() ? master_params
                                 : master_params.slice(master_offset, master_count);
  }
};

using HyperTensors = c10::List<std::optional<at::Tensor>>;

// A step call's param groups: group g owns the next group_sizes[g] params, and every per-group
// argument (a float[] hyperparameter, a Tensor?[] hyperparameter tensor) has one entry per
// group. Borrows group_sizes, which outlives the call.
class ParamGroups {
 public:
  // Checks that the sizes are non-negative and cover the params exactly.
  ParamGroups(std::string_view op, c10::ArrayRef<int64_t> group_sizes, size_t num_params);

  size_t count() const { return sizes_.size(); }

  // Checks that the per-group argument `name` has one entry per group.
  void check_entries(std::string_view name, size_t entries) const;
  // As check_entries, and each tensor given is a valid hyperparameter tensor for `device`.
  void check_hyper_tensors(std::string_view name, const HyperTensors& tensors,
                           const at::Device& device) const;

  // Calls fn(GroupRange) for every group, in order; with_masters: the call has master_params,
  // which the params that take_master take in order.
  template <typename Fn>
  void for_each(at::TensorList params, bool with_masters, const Fn& fn) const {
    size_t offset = 0;
    size_t master_offset = 0;
    for (size_t g = 0; g < sizes_.size(); ++g) {
      const auto size = static_cast<size_t>(sizes_[g]);
      size_t masters = 0;
      if (with_masters) {
        for (size_t i = offset; i < offset + size; ++i) masters += takes_master(params[i]);
      }
      fn(GroupRange{g, offset, size, master_offset, masters});
      offset += size;
      master_offset += masters;
    }
  }

 private:
  std::string_view op_;
  c10::ArrayRef<int64_t> sizes_;
};

// What every step op takes besides its state lists and its own hyperparameters (csrc/ops.cpp).
struct StepArgs {
  ParamGroups groups;
  c10::ArrayRef<double> lr;
  c10::ArrayRef<double> l1_decay;
  const c10::List<bool>& l1_proximal;
  const c10::List<std::optional<int64_t>>& stochastic_rounding_seed;
  const HyperTensors& lr_tensor;
  ScalingArgs scaling;
  // One int32 element the CUDA kernels count finished blocks in, so that the last block of a
  // launch advances the step counters that every block has read. Required with steps.
  std::optional<at::Tensor> workspace;

  // The compiled L1 mode of group g; l1_decay 0 is kNone whatever l1_proximal says.
  math::L1Mode l1_mode(size_t g) const { return math::l1_mode(l1_decay[g], l1_proximal.get(g)); }
  // The seed with which group g's bfloat16 params round stochastically, or nullopt: to nearest.
  std::optional<int64_t> rounding_seed(size_t g) const { return stochastic_rounding_seed.get(g); }
  bool any_stochastic_rounding() const;
};

// Everything each op checks, for every backend: the lists, their presence for the op's modes,
// the per-group hyperparameters, the lr tensors, the scaling tensors and the workspace.
void check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList steps, at::TensorList master_params, const StepArgs& step,
                     c10::ArrayRef<double> beta1, c10::ArrayRef<double> beta2,
                     c10::ArrayRef<double> weight_decay, c10::ArrayRef<double> eps, bool amsgrad,
                     const HyperTensors& beta1_tensor, const HyperTensors& beta2_tensor);
void check_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList steps, at::TensorList master_params, const StepArgs& step,
                    c10::ArrayRef<double> momentum, c10::ArrayRef<double> dampening,
                    c10::ArrayRef<double> weight_decay, bool nesterov);
void check_rmsprop_args(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                        at::TensorList grad_avgs, at::TensorList momentum_buffers,
                        at::TensorList steps, at::TensorList master_params, const StepArgs& step,
                        c10::ArrayRef<double> alpha, c10::ArrayRef<double> eps,
                        c10::ArrayRef<double> weight_decay, c10::ArrayRef<double> momentum,
                        bool centered);
void check_adagrad_args(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                        at::TensorList steps, at::TensorList master_params, const StepArgs& step,
                        c10::ArrayRef<double> lr_decay, c10::ArrayRef<double> weight_decay,
                        c10::ArrayRef<double> eps);

// The gradient-statistics op: grads dense and of a supported dtype on one device, the outputs
// one-element float32 tensors there, the workspace float32 with at least the backend's
// min_workspace_numel elements.
void check_grad_norm_args(at::TensorList grads, const at::Tensor& norm,
                          const at::Tensor& found_inf, const at::Tensor& workspace,
                          const std::optional<at::Tensor>& grad_scale,
                          int64_t min_workspace_numel);

}  // namespace fused_opt

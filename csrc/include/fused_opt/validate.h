// Checks shared by every op and every backend, run before any tensor is touched.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <utility>

#include "fused_opt/math/grad_scaling.h"

namespace fused_opt {

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

// params/grads/states agree in length, device, shape and strides; params are dense, of a
// supported floating dtype; steps (when given) hold one float32 value per param. Without
// master_params the states share the param's dtype. With them (one per param), every param is
// float16 or bfloat16, its master is a float32 copy, and the states are float32 like the master.
void check_tensor_lists(std::string_view op, at::TensorList params, at::TensorList grads,
                        at::TensorList master_params, std::initializer_list<NamedList> states,
                        std::optional<at::TensorList> steps);

// A hyperparameter given as a tensor (lr_tensor, ...): one element, on the params' device.
void check_hyper_tensor(std::string_view op, std::string_view name,
                        const std::optional<at::Tensor>& tensor, const at::Device& device);

// grad_scale, found_inf and grad_norm are one-element float32 tensors on `device`; grad_norm is
// given exactly when max_grad_norm is.
void check_scaling(std::string_view op, const ScalingArgs& scaling, const at::Device& device);

// Everything each op checks, for every backend: the lists, their presence for the op's modes,
// the lr tensor and the scaling tensors.
void check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList steps, at::TensorList master_params, bool amsgrad,
                     const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& beta1_tensor,
                     const std::optional<at::Tensor>& beta2_tensor, const ScalingArgs& scaling);
void check_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList steps, at::TensorList master_params, double momentum,
                    bool nesterov, const std::optional<at::Tensor>& lr_tensor,
                    const ScalingArgs& scaling);
void check_rmsprop_args(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                        at::TensorList grad_avgs, at::TensorList momentum_buffers,
                        at::TensorList steps, at::TensorList master_params, double momentum,
                        bool centered, const std::optional<at::Tensor>& lr_tensor,
                        const ScalingArgs& scaling);
void check_adagrad_args(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                        at::TensorList steps, at::TensorList master_params,
                        const std::optional<at::Tensor>& lr_tensor, const ScalingArgs& scaling);

// The gradient-statistics op: grads dense and of a supported dtype on one device, the outputs
// one-element float32 tensors there, the workspace float32 with at least the backend's
// min_workspace_numel elements.
void check_grad_norm_args(at::TensorList grads, const at::Tensor& norm,
                          const at::Tensor& found_inf, const at::Tensor& workspace,
                          const std::optional<at::Tensor>& grad_scale,
                          int64_t min_workspace_numel);

}  // namespace fused_opt

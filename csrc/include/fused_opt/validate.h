// Checks shared by every op and every backend, run before any tensor is touched.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <utility>

namespace fused_opt {

struct NamedList {
  std::string_view name;
  at::TensorList tensors;
  bool required;  // false: the list must be empty when its mode is off, full when on
};

// params/grads/states agree in length, device, dtype, shape and strides; params are dense,
// of a supported floating dtype; steps (when given) hold one float32 value per param.
void check_tensor_lists(std::string_view op, at::TensorList params, at::TensorList grads,
                        std::initializer_list<NamedList> states,
                        std::optional<at::TensorList> steps);

void check_lr_tensor(std::string_view op, const std::optional<at::Tensor>& lr_tensor,
                     const at::Device& device);

// Everything each op checks, for every backend: the lists, their presence for the op's modes,
// and the lr tensor.
void check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList steps, bool amsgrad,
                     const std::optional<at::Tensor>& lr_tensor);
void check_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const c10::List<bool>& is_first_step, double momentum, bool nesterov,
                    const std::optional<at::Tensor>& lr_tensor);
void check_rmsprop_args(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                        at::TensorList grad_avgs, at::TensorList momentum_buffers,
                        at::TensorList steps, double momentum, bool centered,
                        const std::optional<at::Tensor>& lr_tensor);
void check_adagrad_args(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                        at::TensorList steps, const std::optional<at::Tensor>& lr_tensor);

}  // namespace fused_opt

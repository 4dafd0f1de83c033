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

}  // namespace fused_opt

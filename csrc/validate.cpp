#include "fused_opt/validate.h"

namespace fused_opt {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_matches_param(std::string_view op, std::string_view list, size_t i,
                         const at::Tensor& t, const at::Tensor& param) {
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(!t.is_sparse(), op, ": ", list, "[", i, "] is sparse; this op takes dense tensors");
  TORCH_CHECK(t.device() == param.device(), op, ": ", list, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", param.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", list, "[", i, "] has dtype ",
              t.scalar_type(), " but params[", i, "] has dtype ", param.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", list, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", param.sizes());
  // The kernels walk every tensor of one param as the same flat range of memory.
  TORCH_CHECK(t.numel() <= 1 || t.strides() == param.strides(), op, ": ", list, "[", i,
              "] has strides ", t.strides(), " but params[", i, "] has strides ",
              param.strides());
}

}  // namespace

void check_tensor_lists(std::string_view op, at::TensorList params, at::TensorList grads,
                        std::initializer_list<NamedList> states,
                        std::optional<at::TensorList> steps) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  for (const auto& list : states) {
    TORCH_CHECK(list.tensors.size() == n || (!list.required && list.tensors.empty()), op, ": got ",
                n, " params but ", list.tensors.size(), " ", list.name);
  }
  if (steps) {
    TORCH_CHECK(steps->size() == n, op, ": got ", n, " params but ", steps->size(), " steps");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(supported_dtype(param.scalar_type()), op, ": params[", i, "] has dtype ",
                param.scalar_type(), "; supported: float32, float64, float16, bfloat16");
    TORCH_CHECK(param.device() == params[0].device(), op, ": params[", i, "] is on ",
                param.device(), " but params[0] is on ", params[0].device());
    TORCH_CHECK(param.is_non_overlapping_and_dense(), op, ": params[", i,
                "] is not dense in memory (a strided view); pass a dense parameter");
    check_matches_param(op, "grads", i, grads[i], param);
    for (const auto& list : states) {
      if (!list.tensors.empty()) check_matches_param(op, list.name, i, list.tensors[i], param);
    }
    if (steps) {
      const at::Tensor& step = (*steps)[i];
      TORCH_CHECK(step.defined() && step.numel() == 1 && step.scalar_type() == at::kFloat, op,
                  ": steps[", i, "] must be a one-element float32 tensor");
      TORCH_CHECK(step.device() == param.device(), op, ": steps[", i, "] is on ", step.device(),
                  " but params[", i, "] is on ", param.device());
    }
  }
}

void check_lr_tensor(std::string_view op, const std::optional<at::Tensor>& lr_tensor,
                     const at::Device& device) {
  if (!lr_tensor) return;
  TORCH_CHECK(lr_tensor->numel() == 1, op, ": lr_tensor must have one element");
  TORCH_CHECK(lr_tensor->device() == device, op, ": lr_tensor is on ", lr_tensor->device(),
              " but the params are on ", device);
}

}  // namespace fused_opt

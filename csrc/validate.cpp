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

namespace {

void check_lr_of_params(std::string_view op, at::TensorList params,
                        const std::optional<at::Tensor>& lr_tensor) {
  if (!params.empty()) check_lr_tensor(op, lr_tensor, params[0].device());
}

}  // namespace

void check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList steps, bool amsgrad,
                     const std::optional<at::Tensor>& lr_tensor) {
  constexpr std::string_view kOp = "fused_opt::adam_";
  check_tensor_lists(kOp, params, grads,
                     {{"exp_avgs", exp_avgs, true},
                      {"exp_avg_sqs", exp_avg_sqs, true},
                      {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
                     steps);
  TORCH_CHECK(amsgrad == !max_exp_avg_sqs.empty() || params.empty(), kOp,
              ": max_exp_avg_sqs must be given exactly when amsgrad is set");
  check_lr_of_params(kOp, params, lr_tensor);
}

void check_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const c10::List<bool>& is_first_step, double momentum, bool nesterov,
                    const std::optional<at::Tensor>& lr_tensor) {
  constexpr std::string_view kOp = "fused_opt::sgd_";
  const bool has_momentum = momentum != 0.0;
  check_tensor_lists(kOp, params, grads, {{"momentum_buffers", momentum_buffers, has_momentum}},
                     std::nullopt);
  TORCH_CHECK(has_momentum == !momentum_buffers.empty() || params.empty(), kOp,
              ": momentum_buffers must be given exactly when momentum != 0");
  TORCH_CHECK(is_first_step.size() == (has_momentum ? params.size() : 0) || params.empty(), kOp,
              ": is_first_step needs one entry per param when momentum != 0, none otherwise");
  TORCH_CHECK(!nesterov || has_momentum, kOp, ": nesterov requires momentum");
  check_lr_of_params(kOp, params, lr_tensor);
}

void check_rmsprop_args(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                        at::TensorList grad_avgs, at::TensorList momentum_buffers,
                        at::TensorList steps, double momentum, bool centered,
                        const std::optional<at::Tensor>& lr_tensor) {
  constexpr std::string_view kOp = "fused_opt::rmsprop_";
  const bool has_momentum = momentum > 0.0;
  check_tensor_lists(kOp, params, grads,
                     {{"square_avgs", square_avgs, true},
                      {"grad_avgs", grad_avgs, centered},
                      {"momentum_buffers", momentum_buffers, has_momentum}},
                     steps);
  TORCH_CHECK(params.empty() || (centered == !grad_avgs.empty() &&
                                 has_momentum == !momentum_buffers.empty()),
              kOp, ": grad_avgs must be given exactly when centered, momentum_buffers exactly ",
              "when momentum > 0");
  check_lr_of_params(kOp, params, lr_tensor);
}

void check_adagrad_args(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                        at::TensorList steps, const std::optional<at::Tensor>& lr_tensor) {
  constexpr std::string_view kOp = "fused_opt::adagrad_";
  check_tensor_lists(kOp, params, grads, {{"state_sums", state_sums, true}}, steps);
  check_lr_of_params(kOp, params, lr_tensor);
}

}  // namespace fused_opt

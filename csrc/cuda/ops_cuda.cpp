// CUDA registrations of the ops: validation, the device guard and the caller's stream here, the
// kernels behind the torch-free API of launch.h. Only device-generic torch headers are included
// (c10/cuda is not), so this file compiles against a CPU build of torch as well; the one CUDA
// entry point it needs, the current stream, comes from torch's C shim, which libtorch_cuda exports.
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string_view>
#include <vector>

#include "cuda/launch.h"
#include "fused_opt/validate.h"

// shim.h declares this only under USE_CUDA, which extension builds do not define.
#ifndef USE_CUDA
extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index,
                                                             void** ret_stream);
#endif

namespace fused_opt::cuda {
namespace {

DType dtype_code(std::string_view op, std::string_view what, at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", what, " has dtype ", type,
                  "; supported: float32, float64, float16, bfloat16");
  }
}

void* current_stream(const at::Device& device) {
  void* stream = nullptr;
  TORCH_CHECK(aoti_torch_get_current_cuda_stream(device.index(), &stream) == AOTI_TORCH_SUCCESS,
              "fused_opt: could not get the current CUDA stream of ", device);
  return stream;
}

DeviceScalar device_scalar(std::string_view op, std::string_view name,
                           const std::optional<at::Tensor>& tensor) {
  if (!tensor) return {nullptr, DType::kFloat32};
  return {tensor->const_data_ptr(), dtype_code(op, name, tensor->scalar_type())};
}

// The kernels' view of one step call: one entry per param, with its used states packed in the
// order the element functor expects (empty lists are the states of modes that are off). With
// master_params the update runs on the master and the param receives its rounding. The buffer is
// reused across calls, so a step allocates no host memory after the first.
StepCall step_call(std::string_view op, at::TensorList params, at::TensorList grads,
                   at::TensorList master_params,
                   std::initializer_list<at::TensorList> state_lists, at::TensorList steps,
                   const std::optional<at::Tensor>& lr_tensor, const ScalingArgs& scaling) {
  thread_local std::vector<TensorArgs> args;
  args.clear();
  const bool master_weights = !master_params.empty();
  for (size_t i = 0; i < params.size(); ++i) {
    TensorArgs arg{};
    arg.param = master_weights ? master_params[i].data_ptr() : params[i].data_ptr();
    arg.param_copy = master_weights ? params[i].data_ptr() : nullptr;
    arg.grad = grads[i].const_data_ptr();
    int used = 0;
    for (const auto& list : state_lists) {
      if (!list.empty()) arg.states[used++] = list[i].data_ptr();
    }
    arg.step = steps.empty() ? nullptr : steps[i].data_ptr<float>();
    arg.numel = params[i].numel();
    arg.dtype = dtype_code(op, "params", params[i].scalar_type());
    args.push_back(arg);
  }
  return {args.data(),    args.size(),    device_scalar(op, "lr_tensor", lr_tensor),
          scaling.view(), master_weights, current_stream(params[0].device())};
}

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
               at::TensorList master_params, double lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, const std::optional<at::Tensor>& beta1_tensor,
               const std::optional<at::Tensor>& beta2_tensor,
               const std::optional<at::Tensor>& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm) {
  constexpr std::string_view kOp = "fused_opt::adam_";
  const ScalingArgs scaling{grad_scale, found_inf, grad_norm, max_grad_norm};
  check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
                  amsgrad, lr_tensor, beta1_tensor, beta2_tensor, scaling);
  if (params.empty()) return;

  const c10::DeviceGuard guard(params[0].device());
  adam_step(step_call(kOp, params, grads, master_params,
                      {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, steps, lr_tensor, scaling),
            {lr, beta1, beta2, eps, weight_decay}, device_scalar(kOp, "beta1_tensor", beta1_tensor),
            device_scalar(kOp, "beta2_tensor", beta2_tensor), amsgrad, maximize,
            decoupled_weight_decay);
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              at::TensorList steps, at::TensorList master_params, double lr, double momentum,
              double dampening, double weight_decay, bool nesterov, bool maximize,
              const std::optional<at::Tensor>& lr_tensor,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm) {
  constexpr std::string_view kOp = "fused_opt::sgd_";
  const ScalingArgs scaling{grad_scale, found_inf, grad_norm, max_grad_norm};
  check_sgd_args(params, grads, momentum_buffers, steps, master_params, momentum, nesterov,
                 lr_tensor, scaling);
  if (params.empty()) return;

  const c10::DeviceGuard guard(params[0].device());
  sgd_step(step_call(kOp, params, grads, master_params, {momentum_buffers}, steps, lr_tensor,
                     scaling),
           {lr, momentum, dampening, weight_decay}, nesterov, maximize);
}

void rmsprop_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                  at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
                  at::TensorList master_params, double lr, double alpha, double eps,
                  double weight_decay, double momentum, bool centered, bool maximize,
                  const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& grad_norm,
                  std::optional<double> max_grad_norm) {
  constexpr std::string_view kOp = "fused_opt::rmsprop_";
  const ScalingArgs scaling{grad_scale, found_inf, grad_norm, max_grad_norm};
  check_rmsprop_args(params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
                     master_params, momentum, centered, lr_tensor, scaling);
  if (params.empty()) return;

  const c10::DeviceGuard guard(params[0].device());
  rmsprop_step(step_call(kOp, params, grads, master_params,
                         {square_avgs, grad_avgs, momentum_buffers}, steps, lr_tensor, scaling),
               {lr, alpha, eps, weight_decay, momentum}, centered, maximize);
}

void adagrad_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                  at::TensorList steps, at::TensorList master_params, double lr, double lr_decay,
                  double weight_decay, double eps, bool maximize,
                  const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& grad_norm,
                  std::optional<double> max_grad_norm) {
  constexpr std::string_view kOp = "fused_opt::adagrad_";
  const ScalingArgs scaling{grad_scale, found_inf, grad_norm, max_grad_norm};
  check_adagrad_args(params, grads, state_sums, steps, master_params, lr_tensor, scaling);
  if (params.empty()) return;

  const c10::DeviceGuard guard(params[0].device());
  adagrad_step(step_call(kOp, params, grads, master_params, {state_sums}, steps, lr_tensor,
                         scaling),
               {lr, lr_decay, weight_decay, eps}, maximize);
}

void grad_norm_cuda(at::TensorList grads, const at::Tensor& norm, const at::Tensor& found_inf,
                    const at::Tensor& workspace, const std::optional<at::Tensor>& grad_scale) {
  constexpr std::string_view kOp = "fused_opt::grad_norm_";
  check_grad_norm_args(grads, norm, found_inf, workspace, grad_scale, kGradNormWorkspaceNumel);
  // The kernel keeps doubles in the workspace.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(workspace.const_data_ptr()) % alignof(double) == 0, kOp,
              ": workspace must be 8-byte aligned (a fresh tensor is)");

  const c10::DeviceGuard guard(norm.device());
  thread_local std::vector<GradArgs> args;
  args.clear();
  for (const at::Tensor& grad : grads) {
    args.push_back(
        {grad.const_data_ptr(), grad.numel(), dtype_code(kOp, "grads", grad.scalar_type())});
  }
  grad_norm(args.data(), args.size(), norm.data_ptr<float>(), found_inf.data_ptr<float>(),
            workspace.data_ptr<float>(), grad_scale ? grad_scale->const_data_ptr<float>() : nullptr,
            current_stream(norm.device()));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CUDA, m) {
  m.impl("adam_", &adam_cuda);
  m.impl("sgd_", &sgd_cuda);
  m.impl("rmsprop_", &rmsprop_cuda);
  m.impl("adagrad_", &adagrad_cuda);
  m.impl("grad_norm_", &grad_norm_cuda);
}

}  // namespace fused_opt::cuda

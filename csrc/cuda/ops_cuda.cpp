// CUDA registrations of the ops: validation, the device guard and the caller's stream here, the
// kernels behind the torch-free API of launch.h. Only device-generic torch headers are included
// (c10/cuda is not), so this file compiles against a CPU build of torch as well; the one CUDA
// entry point it needs, the current stream, comes from torch's C shim, which libtorch_cuda exports.
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/library.h>

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

DeviceScalar device_lr(std::string_view op, const std::optional<at::Tensor>& lr_tensor) {
  if (!lr_tensor) return {nullptr, DType::kFloat32};
  return {lr_tensor->const_data_ptr(), dtype_code(op, "lr_tensor", lr_tensor->scalar_type())};
}

// The kernels' view of the lists: one entry per param, with its used states packed in the order
// the element functor expects (empty lists are the states of modes that are off). The buffer is
// reused across calls, so a step allocates no host memory after the first. first_step is SGD's
// is_first_step, null for the other ops.
const std::vector<TensorArgs>& gather(std::string_view op, at::TensorList params,
                                      at::TensorList grads,
                                      std::initializer_list<at::TensorList> state_lists,
                                      at::TensorList steps,
                                      const c10::List<bool>* first_step = nullptr) {
  thread_local std::vector<TensorArgs> args;
  args.clear();
  for (size_t i = 0; i < params.size(); ++i) {
    TensorArgs arg{};
    arg.param = params[i].data_ptr();
    arg.grad = grads[i].const_data_ptr();
    int used = 0;
    for (const auto& list : state_lists) {
      if (!list.empty()) arg.states[used++] = list[i].data_ptr();
    }
    arg.step = steps.empty() ? nullptr : steps[i].data_ptr<float>();
    arg.numel = params[i].numel();
    arg.dtype = dtype_code(op, "params", params[i].scalar_type());
    arg.first_step = first_step != nullptr && !first_step->empty() && first_step->get(i);
    args.push_back(arg);
  }
  return args;
}

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
               double lr, double beta1, double beta2, double weight_decay, double eps,
               bool amsgrad, bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& lr_tensor) {
  constexpr std::string_view kOp = "fused_opt::adam_";
  check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad,
                  lr_tensor);
  if (params.empty()) return;
  const at::Device device = params[0].device();

  const c10::DeviceGuard guard(device);
  const auto& args = gather(kOp, params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, steps);
  adam_step(args.data(), args.size(), {lr, beta1, beta2, eps, weight_decay},
            device_lr(kOp, lr_tensor), amsgrad, maximize, decoupled_weight_decay,
            current_stream(device));
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const c10::List<bool>& is_first_step, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize,
              const std::optional<at::Tensor>& lr_tensor) {
  constexpr std::string_view kOp = "fused_opt::sgd_";
  check_sgd_args(params, grads, momentum_buffers, is_first_step, momentum, nesterov, lr_tensor);
  if (params.empty()) return;
  const at::Device device = params[0].device();

  const c10::DeviceGuard guard(device);
  const auto& args = gather(kOp, params, grads, {momentum_buffers}, {}, &is_first_step);
  sgd_step(args.data(), args.size(), {lr, momentum, dampening, weight_decay},
           device_lr(kOp, lr_tensor), nesterov, maximize, current_stream(device));
}

void rmsprop_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                  at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
                  double lr, double alpha, double eps, double weight_decay, double momentum,
                  bool centered, bool maximize, const std::optional<at::Tensor>& lr_tensor) {
  constexpr std::string_view kOp = "fused_opt::rmsprop_";
  check_rmsprop_args(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, momentum,
                     centered, lr_tensor);
  if (params.empty()) return;
  const at::Device device = params[0].device();

  const c10::DeviceGuard guard(device);
  const auto& args =
      gather(kOp, params, grads, {square_avgs, grad_avgs, momentum_buffers}, steps);
  rmsprop_step(args.data(), args.size(), {lr, alpha, eps, weight_decay, momentum},
               device_lr(kOp, lr_tensor), centered, maximize, current_stream(device));
}

void adagrad_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                  at::TensorList steps, double lr, double lr_decay, double weight_decay,
                  double eps, bool maximize, const std::optional<at::Tensor>& lr_tensor) {
  constexpr std::string_view kOp = "fused_opt::adagrad_";
  check_adagrad_args(params, grads, state_sums, steps, lr_tensor);
  if (params.empty()) return;
  const at::Device device = params[0].device();

  const c10::DeviceGuard guard(device);
  const auto& args = gather(kOp, params, grads, {state_sums}, steps);
  adagrad_step(args.data(), args.size(), {lr, lr_decay, weight_decay, eps},
               device_lr(kOp, lr_tensor), maximize, current_stream(device));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CUDA, m) {
  m.impl("adam_", &adam_cuda);
  m.impl("sgd_", &sgd_cuda);
  m.impl("rmsprop_", &rmsprop_cuda);
  m.impl("adagrad_", &adagrad_cuda);
}

}  // namespace fused_opt::cuda

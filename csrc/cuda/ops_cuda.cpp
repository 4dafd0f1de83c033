// The CUDA implementations of the ops: validation, the device guard and the caller's stream here,
// the kernels behind the torch-free API of launch.h. Only device-generic torch headers are included
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
#include "cuda/ops_cuda.h"
#include "fused_opt/math/rounding.h"
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

// One group's hyperparameter as the kernels take it: its value, and the tensor to read on the
// device instead when there is one beside the params. A CPU tensor with params on a GPU (torch's
// compiled-optimizer recipes pass lr that way) is host memory: it is read here, without a sync,
// and a captured graph keeps the value it had at capture.
struct GroupHyper {
  double value;
  DeviceScalar on_device;
};

GroupHyper group_hyper(std::string_view op, std::string_view name, double value,
                       const HyperTensors& tensors, size_t group, const at::Device& device) {
  const std::optional<at::Tensor> tensor = tensors.get(group);
  if (tensor && tensor->device() != device && tensor->device().is_cpu()) {
    return {tensor->item<double>(), {nullptr, DType::kFloat32}};
  }
  return {value, device_scalar(op, name, tensor)};
}

// The kernels' view of one step call: one entry per param, with its used states packed in the
// order the element functor expects (empty lists are the states of modes that are off), and its
// group. A float16/bfloat16 param with a master is updated through it and receives its rounding;
// a bfloat16 param whose entry of master_params is its compensation is updated with it.
// The buffer is reused across calls, so a step allocates no host memory after the first.
StepCall step_call(std::string_view op, at::TensorList params, at::TensorList grads,
                   at::TensorList master_params,
                   std::initializer_list<at::TensorList> state_lists, at::TensorList steps,
                   const StepArgs& step) {
  thread_local std::vector<TensorArgs> args;
  args.clear();
  const bool master_weights = !master_params.empty();
  size_t next_master = 0;
  bool any_compensated = false;
  bool any_quantized = false;
  step.groups.for_each(params, master_weights, [&](const GroupRange& group) {
    const std::optional<int64_t> seed = step.rounding_seed(group.group);
    for (size_t i = group.offset; i < group.offset + group.size; ++i) {
      const bool takes_entry = master_weights && takes_master(params[i]);
      const at::Tensor* entry = takes_entry ? &master_params[next_master++] : nullptr;
      const bool compensated = entry != nullptr && is_compensation(*entry, params[i]);
      const bool has_master = entry != nullptr && !compensated;
      any_compensated = any_compensated || compensated;
      TensorArgs arg{};
      arg.param = has_master ? entry->data_ptr() : params[i].data_ptr();
      arg.param_copy = !takes_entry ? nullptr
                       : compensated ? entry->data_ptr()
                                     : params[i].data_ptr();
      arg.grad = grads[i].const_data_ptr();
      int used = 0;
      for (const auto& list : state_lists) {
        if (list.empty()) continue;
        if (used == 0) {
          // Narrower states exist only beside float32 (validate.cpp); a bfloat16 param's states
          // are its own storage.
          const bool beside_float32 = has_master || params[i].scalar_type() == at::kFloat;
          const at::ScalarType stored = list[i].scalar_type();
          arg.state_store = !beside_float32             ? StateStore::kAsUpdated
                            : stored == at::kBFloat16 ? StateStore::kBFloat16
                            : stored == at::kByte     ? StateStore::kBlockwise8
                                                      : StateStore::kAsUpdated;
          any_quantized = any_quantized || arg.state_store == StateStore::kBlockwise8;
        }
        arg.states[used++] = list[i].data_ptr();
      }
      arg.step = steps.empty() ? nullptr : steps[i].data_ptr<float>();
      arg.numel = params[i].numel();
      arg.group = static_cast<uint32_t>(group.group);
      arg.dtype = dtype_code(op, "params", params[i].scalar_type());
      arg.param_store = compensated ? ParamStore::kCompensated
                        : seed && arg.dtype == DType::kBFloat16 && !has_master
                            ? ParamStore::kStochastic
                            : ParamStore::kNearest;
      if (arg.param_store == ParamStore::kStochastic) {
        arg.rounding_key = math::rounding_tensor_key(static_cast<uint64_t>(*seed), i);
      }
      args.push_back(arg);
    }
  });
  thread_local std::vector<math::L1Mode> l1_modes;
  l1_modes.clear();
  for (size_t g = 0; g < step.groups.count(); ++g) l1_modes.push_back(step.l1_mode(g));
  unsigned* finished_blocks =
      steps.empty() ? nullptr : static_cast<unsigned*>(step.workspace->data_ptr());
  return {args.data(),         args.size(),     step.groups.count(),
          step.scaling.view(), l1_modes.data(), master_weights,
          any_compensated,     any_quantized,   finished_blocks,
          current_stream(params[0].device())};
}

// Each op's per-group hyperparameters, in a buffer reused across calls.
template <typename Group, typename Make>
const Group* make_groups(const ParamGroups& groups, const Make& make) {
  thread_local std::vector<Group> table;
  table.clear();
  for (size_t g = 0; g < groups.count(); ++g) table.push_back(make(g));
  return table.data();
}

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
               at::TensorList master_params, c10::ArrayRef<int64_t> group_sizes,
               c10::ArrayRef<double> lr, c10::ArrayRef<double> beta1, c10::ArrayRef<double> beta2,
               c10::ArrayRef<double> weight_decay, c10::ArrayRef<double> eps, bool amsgrad,
               bool maximize, bool decoupled_weight_decay, const HyperTensors& beta1_tensor,
               const HyperTensors& beta2_tensor, c10::ArrayRef<double> l1_decay,
               const c10::List<bool>& l1_proximal,
               const c10::List<std::optional<int64_t>>& stochastic_rounding_seed,
               const HyperTensors& lr_tensor,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm,
               const std::optional<at::Tensor>& workspace) {
  const StepArgs step{ParamGroups(kAdamOp, group_sizes, params.size()), lr, l1_decay,
                      l1_proximal, stochastic_rounding_seed, lr_tensor,
                      {grad_scale, found_inf, grad_norm, max_grad_norm}, workspace};
  check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params,
                  step, beta1, beta2, weight_decay, eps, amsgrad, beta1_tensor, beta2_tensor);
  if (params.empty()) return;

  const c10::DeviceGuard guard(params[0].device());
  const at::Device device = params[0].device();
  const AdamGroup* groups = make_groups<AdamGroup>(step.groups, [&](size_t g) {
    const GroupHyper group_lr = group_hyper(kAdamOp, "lr_tensor", lr[g], lr_tensor, g, device);
    const GroupHyper group_beta1 =
        group_hyper(kAdamOp, "beta1_tensor", beta1[g], beta1_tensor, g, device);
    const GroupHyper group_beta2 =
        group_hyper(kAdamOp, "beta2_tensor", beta2[g], beta2_tensor, g, device);
    return AdamGroup{
        {group_lr.value, group_beta1.value, group_beta2.value, eps[g], weight_decay[g],
         l1_decay[g]},
        group_lr.on_device, group_beta1.on_device, group_beta2.on_device};
  });
  adam_step(step_call(kAdamOp, params, grads, master_params,
                      {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, steps, step),
            groups, amsgrad, maximize, decoupled_weight_decay);
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              at::TensorList steps, at::TensorList master_params,
              c10::ArrayRef<int64_t> group_sizes, c10::ArrayRef<double> lr,
              c10::ArrayRef<double> momentum, c10::ArrayRef<double> dampening,
              c10::ArrayRef<double> weight_decay, bool nesterov, bool maximize,
              c10::ArrayRef<double> l1_decay, const c10::List<bool>& l1_proximal,
              const c10::List<std::optional<int64_t>>& stochastic_rounding_seed,
              const HyperTensors& lr_tensor, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& grad_norm, std::optional<double> max_grad_norm,
              const std::optional<at::Tensor>& workspace) {
  const StepArgs step{ParamGroups(kSgdOp, group_sizes, params.size()), lr, l1_decay,
                      l1_proximal, stochastic_rounding_seed, lr_tensor,
                      {grad_scale, found_inf, grad_norm, max_grad_norm}, workspace};
  check_sgd_args(params, grads, momentum_buffers, steps, master_params, step, momentum,
                 dampening, weight_decay, nesterov);
  if (params.empty()) return;

  const c10::DeviceGuard guard(params[0].device());
  const SgdGroup* groups = make_groups<SgdGroup>(step.groups, [&](size_t g) {
    const GroupHyper group_lr =
        group_hyper(kSgdOp, "lr_tensor", lr[g], lr_tensor, g, params[0].device());
    return SgdGroup{{group_lr.value, momentum[g], dampening[g], weight_decay[g], l1_decay[g]},
                    group_lr.on_device};
  });
  sgd_step(step_call(kSgdOp, params, grads, master_params, {momentum_buffers}, steps, step),
           groups, nesterov, maximize);
}

void rmsprop_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                  at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
                  at::TensorList master_params, c10::ArrayRef<int64_t> group_sizes,
                  c10::ArrayRef<double> lr, c10::ArrayRef<double> alpha,
                  c10::ArrayRef<double> eps, c10::ArrayRef<double> weight_decay,
                  c10::ArrayRef<double> momentum, bool centered, bool maximize,
                  c10::ArrayRef<double> l1_decay, const c10::List<bool>& l1_proximal,
                  const c10::List<std::optional<int64_t>>& stochastic_rounding_seed,
                  const HyperTensors& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& grad_norm,
                  std::optional<double> max_grad_norm,
                  const std::optional<at::Tensor>& workspace) {
  const StepArgs step{ParamGroups(kRmspropOp, group_sizes, params.size()), lr, l1_decay,
                      l1_proximal, stochastic_rounding_seed, lr_tensor,
                      {grad_scale, found_inf, grad_norm, max_grad_norm}, workspace};
  check_rmsprop_args(params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
                     master_params, step, alpha, eps, weight_decay, momentum, centered);
  if (params.empty()) return;

  const c10::DeviceGuard guard(params[0].device());
  const RmspropGroup* groups = make_groups<RmspropGroup>(step.groups, [&](size_t g) {
    const GroupHyper group_lr =
        group_hyper(kRmspropOp, "lr_tensor", lr[g], lr_tensor, g, params[0].device());
    return RmspropGroup{
        {group_lr.value, alpha[g], eps[g], weight_decay[g], momentum[g], l1_decay[g]},
                        group_lr.on_device};
  });
  rmsprop_step(step_call(kRmspropOp, params, grads, master_params,
                         {square_avgs, grad_avgs, momentum_buffers}, steps, step),
               groups, centered, maximize);
}

void adagrad_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                  at::TensorList steps, at::TensorList master_params,
                  c10::ArrayRef<int64_t> group_sizes, c10::ArrayRef<double> lr,
                  c10::ArrayRef<double> lr_decay, c10::ArrayRef<double> weight_decay,
                  c10::ArrayRef<double> eps, bool maximize, c10::ArrayRef<double> l1_decay,
                  const c10::List<bool>& l1_proximal,
                  const c10::List<std::optional<int64_t>>& stochastic_rounding_seed,
                  const HyperTensors& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& grad_norm,
                  std::optional<double> max_grad_norm,
                  const std::optional<at::Tensor>& workspace) {
  const StepArgs step{ParamGroups(kAdagradOp, group_sizes, params.size()), lr, l1_decay,
                      l1_proximal, stochastic_rounding_seed, lr_tensor,
                      {grad_scale, found_inf, grad_norm, max_grad_norm}, workspace};
  check_adagrad_args(params, grads, state_sums, steps, master_params, step, lr_decay,
                     weight_decay, eps);
  if (params.empty()) return;

  const c10::DeviceGuard guard(params[0].device());
  const AdagradGroup* groups = make_groups<AdagradGroup>(step.groups, [&](size_t g) {
    const GroupHyper group_lr =
        group_hyper(kAdagradOp, "lr_tensor", lr[g], lr_tensor, g, params[0].device());
    return AdagradGroup{{group_lr.value, lr_decay[g], weight_decay[g], eps[g], l1_decay[g]},
                        group_lr.on_device};
  });
  adagrad_step(step_call(kAdagradOp, params, grads, master_params, {state_sums}, steps, step),
               groups, maximize);
}

void grad_norm_cuda(at::TensorList grads, const at::Tensor& norm, const at::Tensor& found_inf,
                    const at::Tensor& workspace, const std::optional<at::Tensor>& grad_scale) {
  constexpr std::string_view kOp = kGradNormOp;
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

void register_cuda_kernels(torch::Library& library) {
  library.impl("adam_", &adam_cuda);
  library.impl("sgd_", &sgd_cuda);
  library.impl("rmsprop_", &rmsprop_cuda);
  library.impl("adagrad_", &adagrad_cuda);
  library.impl("grad_norm_", &grad_norm_cuda);
}

}  // namespace fused_opt::cuda

#include "fused_opt/validate.h"

#include <cmath>
#include <cstdint>

#include "fused_opt/math/quantize.h"
#include "fused_opt/prefetch.h"

namespace fused_opt {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

constexpr const char* kSupportedDtypes = "float32, float64, float16, bfloat16";

// The checks ask for the TensorImpls of the tensors this many params ahead (fused_opt/prefetch.h):
// on 4,096 one-element AdamW params, one thread, this project's 2-core AMD EPYC, a cold step
// (after torch's fused AdamW over other params, or after an in-place add over 64 MB) took
// 0.78-0.83x the time in alternating steps of one process, and a repeating one 0.97-0.99x;
// distances 4 to 24 measured alike. (An earlier try of prefetches here measured no gain.)
constexpr size_t kChecksAhead = 8;

void prefetch_tensors_ahead(at::TensorList params, at::TensorList grads,
                            std::initializer_list<NamedList> states,
                            std::optional<at::TensorList> steps, size_t i) {
  const size_t ahead = i + kChecksAhead;
  if (ahead >= params.size()) return;
  prefetch_tensor_impl(params[ahead]);
  prefetch_tensor_impl(grads[ahead]);
  for (const auto& list : states) {
    if (!list.tensors.empty()) prefetch_tensor_impl(list.tensors[ahead]);
  }
  if (steps) prefetch_tensor_impl((*steps)[ahead]);
}

// What a state of params[i] may be stored as, beside its reference (the param, or the float32
// master): the reference's dtype, or bfloat16 beside float32 (state_dtype=torch.bfloat16); every
// state of one param in the same dtype, which the kernels read them all as.
struct StateDtype {
  const at::Tensor* first_state;  // the param's first state, or null for the first itself

  bool allows(at::ScalarType dtype, at::ScalarType reference) const {
    if (first_state != nullptr) return dtype == first_state->scalar_type();
    return dtype == reference ||
           ((dtype == at::kBFloat16 || dtype == at::kByte) && reference == at::kFloat);
  }
};

// `t` is an entry of a list that lives beside `reference` (params[i], or master_params[i] for
// states kept in float32): same device, dtype (or one `state` allows), shape, and the same flat
// walk through memory.
void check_matches(std::string_view op, std::string_view list, size_t i, const at::Tensor& t,
                   std::string_view reference_list, const at::Tensor& reference,
                   std::optional<StateDtype> state = std::nullopt) {
  TORCH_CHECK(t.defined(), op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK(!t.is_sparse(), op, ": ", list, "[", i, "] is sparse; this op takes dense tensors");
  TORCH_CHECK(t.device() == reference.device(), op, ": ", list, "[", i, "] is on ", t.device(),
              " but ", reference_list, "[", i, "] is on ", reference.device());
  if (!state) {
    TORCH_CHECK(t.scalar_type() == reference.scalar_type(), op, ": ", list, "[", i,
                "] has dtype ", t.scalar_type(), " but ", reference_list, "[", i,
                "] has dtype ", reference.scalar_type());
  } else if (state->first_state != nullptr) {
    TORCH_CHECK(state->allows(t.scalar_type(), reference.scalar_type()), op, ": ", list, "[", i,
                "] has dtype ", t.scalar_type(), " but the first state of params[", i,
                "] has dtype ", state->first_state->scalar_type(),
                "; the states of one param share a dtype");
  } else {
    TORCH_CHECK(state->allows(t.scalar_type(), reference.scalar_type()), op, ": ", list, "[", i,
                "] has dtype ", t.scalar_type(), " but ", reference_list, "[", i,
                "] has dtype ", reference.scalar_type(),
                "; states take that dtype, or bfloat16 or uint8 beside float32");
  }
  if (t.scalar_type() == at::kByte) {
    // Blockwise 8-bit (math/quantize.h): the codes of the reference's elements in its memory
    // order, then the blocks' float32 maxima, which the kernels read in place.
    const int64_t bytes = math::quantized_state_bytes(reference.numel());
    TORCH_CHECK(t.dim() == 1 && t.numel() == bytes && t.is_contiguous(), op, ": ", list, "[", i,
                "] is uint8, a blockwise 8-bit state, so it must be a contiguous 1-D tensor of ",
                bytes, " bytes for the ", reference.numel(), " elements of ", reference_list, "[",
                i, "], got shape ", t.sizes());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 4 == 0, op, ": ", list, "[", i,
                "] must start at an address aligned to 4 bytes (its block maxima are float32)");
    return;
  }
  TORCH_CHECK(t.sizes() == reference.sizes(), op, ": ", list, "[", i, "] has shape ", t.sizes(),
              " but ", reference_list, "[", i, "] has shape ", reference.sizes());
  // The kernels walk every tensor of one param as the same flat range of memory.
  TORCH_CHECK(t.numel() <= 1 || t.strides() == reference.strides(), op, ": ", list, "[", i,
              "] has strides ", t.strides(), " but ", reference_list, "[", i, "] has strides ",
              reference.strides());
}

void check_scalar_tensor(std::string_view op, std::string_view name,
                         const std::optional<at::Tensor>& t, const at::Device& device) {
  if (!t) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, op, ": ", name,
              " must be a one-element float32 tensor, got ", t->scalar_type(), " with ",
              t->numel(), " elements");
  // Read by the kernels through its pointer: it must live where they run.
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(),
              " but the params are on ", device);
}

}  // namespace

math::GradScaling ScalingArgs::view() const {
  const auto pointer = [](const std::optional<at::Tensor>& t) -> const float* {
    return t ? t->const_data_ptr<float>() : nullptr;
  };
  return {pointer(grad_scale), pointer(found_inf), pointer(grad_norm),
          static_cast<float>(max_grad_norm.value_or(0.0)), max_grad_norm.has_value()};
}

void check_tensor_lists(std::string_view op, at::TensorList params, at::TensorList grads,
                        at::TensorList master_params, std::initializer_list<NamedList> states,
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
  const bool with_masters = !master_params.empty();
  size_t masters_taken = 0;
  for (size_t i = 0; i < n; ++i) {
    prefetch_tensors_ahead(params, grads, states, steps, i);
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(supported_dtype(param.scalar_type()), op, ": params[", i, "] has dtype ",
                param.scalar_type(), "; supported: ", kSupportedDtypes);
    TORCH_CHECK(param.device() == params[0].device(), op, ": params[", i, "] is on ",
                param.device(), " but params[0] is on ", params[0].device());
    TORCH_CHECK(param.is_non_overlapping_and_dense(), op, ": params[", i,
                "] is not dense in memory (a strided view); pass a dense parameter");
    check_matches(op, "grads", i, grads[i], "params", param);
    const bool own_master = with_masters && !takes_master(param);
    TORCH_CHECK(!own_master || param.scalar_type() == at::kFloat, op, ": params[", i,
                "] has dtype ", param.scalar_type(), "; with master_params, params are float16 or ",
                "bfloat16 (with a master) or float32 (their own master)");
    const bool has_master = with_masters && !own_master;
    if (has_master) {
      const size_t m = masters_taken++;
      TORCH_CHECK(m < master_params.size(), op, ": params up to params[", i, "] include ",
                  m + 1, " float16/bfloat16 params but there are ", master_params.size(),
                  " master_params (one per float16/bfloat16 param)");
      const at::Tensor& master = master_params[m];
      TORCH_CHECK(master.defined() && (master.scalar_type() == at::kFloat ||
                                       is_compensation(master, param)),
                  op, ": master_params[", m, "] (of params[", i, "]) must be a float32 tensor",
                  " (a master), or a bfloat16 tensor beside a bfloat16 param (its Kahan "
                  "compensation)");
      TORCH_CHECK(master.device() == param.device() && master.sizes() == param.sizes() &&
                      (master.numel() <= 1 || master.strides() == param.strides()),
                  op, ": master_params[", m, "] must have the device, shape and strides of ",
                  "params[", i, "]");
    }
    // A compensation is no master: the states live beside the param.
    const bool updates_master =
        has_master && !is_compensation(master_params[masters_taken - 1], param);
    const at::Tensor& state_reference =
        updates_master ? master_params[masters_taken - 1] : param;
    const std::string_view reference_list = updates_master ? "the master of params" : "params";
    const at::Tensor* first_state = nullptr;
    for (const auto& list : states) {
      if (!list.tensors.empty()) {
        check_matches(op, list.name, i, list.tensors[i], reference_list, state_reference,
                      StateDtype{first_state});
        if (first_state == nullptr) first_state = &list.tensors[i];
      }
    }
    if (steps) {
      const at::Tensor& step = (*steps)[i];
      TORCH_CHECK(step.defined() && step.numel() == 1 && step.scalar_type() == at::kFloat, op,
                  ": steps[", i, "] must be a one-element float32 tensor");
      TORCH_CHECK(step.device() == param.device(), op, ": steps[", i, "] is on ", step.device(),
                  " but params[", i, "] is on ", param.device());
    }
  }
  TORCH_CHECK(masters_taken == master_params.size(), op, ": got ", master_params.size(),
              " master_params but ", masters_taken,
              " float16/bfloat16 params (one master each)");
}

void check_hyper_tensor(std::string_view op, std::string_view name,
                        const std::optional<at::Tensor>& tensor, const at::Device& device,
                        std::optional<size_t> group) {
  if (!tensor) return;
  const auto label = [&] { return group ? c10::str(name, "[", *group, "]") : std::string(name); };
  TORCH_CHECK(tensor->numel() == 1, op, ": ", label(), " must have one element");
  TORCH_CHECK(tensor->device() == device || tensor->device().is_cpu(), op, ": ", label(),
              " is on ", tensor->device(), " but the params are on ", device,
              " (a CPU tensor is read on the host)");
}

void check_scaling(std::string_view op, const ScalingArgs& scaling, const at::Device& device) {
  check_scalar_tensor(op, "grad_scale", scaling.grad_scale, device);
  check_scalar_tensor(op, "found_inf", scaling.found_inf, device);
  check_scalar_tensor(op, "grad_norm", scaling.grad_norm, device);
  TORCH_CHECK(scaling.grad_norm.has_value() == scaling.max_grad_norm.has_value(), op,
              ": grad_norm must be given exactly when max_grad_norm is");
  if (scaling.max_grad_norm) {
    TORCH_CHECK(*scaling.max_grad_norm >= 0.0, op, ": max_grad_norm must be >= 0, got ",
                *scaling.max_grad_norm);
  }
}

ParamGroups::ParamGroups(std::string_view op, c10::ArrayRef<int64_t> group_sizes,
                         size_t num_params)
    : op_(op), sizes_(group_sizes) {
  int64_t total = 0;
  for (size_t g = 0; g < group_sizes.size(); ++g) {
    TORCH_CHECK(group_sizes[g] >= 0, op, ": group_sizes[", g, "] is ", group_sizes[g],
                "; sizes must be >= 0");
    total += group_sizes[g];
  }
  TORCH_CHECK(total == static_cast<int64_t>(num_params), op, ": group_sizes add up to ", total,
              " but there are ", num_params, " params");
}

void ParamGroups::check_entries(std::string_view name, size_t entries) const {
  TORCH_CHECK(entries == count(), op_, ": got ", count(), " param groups but ", entries, " ",
              name, " (one per group)");
}

void ParamGroups::check_hyper_tensors(std::string_view name, const HyperTensors& tensors,
                                      const at::Device& device) const {
  check_entries(name, tensors.size());
  for (size_t g = 0; g < tensors.size(); ++g) {
    check_hyper_tensor(op_, name, tensors.get(g), device, g);
  }
}

bool StepArgs::any_stochastic_rounding() const {
  for (size_t g = 0; g < stochastic_rounding_seed.size(); ++g) {
    if (rounding_seed(g)) return true;
  }
  return false;
}

namespace {

// A call-wide mode that follows from a per-group hyperparameter (momentum on or off, which
// decides whether buffers exist) must be the same in every group of the call.
bool same_in_every_group(std::string_view op, std::string_view name,
                         c10::ArrayRef<double> values, bool (*is_on)(double)) {
  const bool on = !values.empty() && is_on(values[0]);
  for (size_t g = 1; g < values.size(); ++g) {
    TORCH_CHECK(is_on(values[g]) == on, op, ": ", name, "[", g, "] is ", values[g], " but ",
                name, "[0] is ", values[0], "; groups with and without ", name,
                " go in separate calls");
  }
  return on;
}

// The checks every step op ends with, once its lists are known to be consistent.
void check_step_args(std::string_view op, at::TensorList params, at::TensorList steps,
                     at::TensorList master_params, const StepArgs& step) {
  step.groups.check_entries("lr", step.lr.size());
  step.groups.check_entries("l1_decay", step.l1_decay.size());
  step.groups.check_entries("l1_proximal", step.l1_proximal.size());
  step.groups.check_entries("stochastic_rounding_seed", step.stochastic_rounding_seed.size());
  if (!params.empty() && step.any_stochastic_rounding()) {
    // The step is part of each element's random bits: without it every step would round an
    // element alike, and the rounding would be biased.
    TORCH_CHECK(!steps.empty(), op, ": stochastic rounding needs the params' step counters");
    TORCH_CHECK(master_params.empty(), op,
                ": stochastic rounding rounds params that have no master weights; with "
                "master_params the float32 masters keep the exact values");
    step.groups.for_each(params, false, [&](const GroupRange& group) {
      if (!step.rounding_seed(group.group)) return;
      for (size_t i = group.offset; i < group.offset + group.size; ++i) {
        TORCH_CHECK(params[i].scalar_type() != at::kHalf, op, ": params[", i,
                    "] is float16, which stochastic rounding does not cover (bfloat16 params "
                    "round stochastically, float32 and float64 params need no rounding); group ",
                    group.group, " has a stochastic_rounding_seed");
      }
    });
  }
  for (size_t g = 0; g < step.l1_decay.size(); ++g) {
    // Also refuses NaN; an infinite penalty would zero (proximal) or NaN (subgradient) weights.
    TORCH_CHECK(step.l1_decay[g] >= 0.0 && std::isfinite(step.l1_decay[g]), op, ": l1_decay[", g,
                "] is ", step.l1_decay[g], "; it must be a finite number >= 0");
  }
  if (params.empty()) {
    step.groups.check_entries("lr_tensor", step.lr_tensor.size());
    return;
  }
  const at::Device device = params[0].device();
  step.groups.check_hyper_tensors("lr_tensor", step.lr_tensor, device);
  check_scaling(op, step.scaling, device);
  if (steps.empty()) return;
  const std::optional<at::Tensor>& workspace = step.workspace;
  TORCH_CHECK(workspace.has_value(), op,
              ": a workspace is required with step counters (a zeroed one-element int32 tensor "
              "on the params' device)");
  TORCH_CHECK(workspace->scalar_type() == at::kInt && workspace->numel() >= 1 &&
                  workspace->is_contiguous() && workspace->device() == device,
              op, ": workspace must be a contiguous int32 tensor of at least one element on ",
              device, ", got ", workspace->scalar_type(), " with ", workspace->numel(),
              " elements on ", workspace->device());
}

}  // namespace

void check_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList steps, at::TensorList master_params, const StepArgs& step,
                     c10::ArrayRef<double> beta1, c10::ArrayRef<double> beta2,
                     c10::ArrayRef<double> weight_decay, c10::ArrayRef<double> eps, bool amsgrad,
                     const HyperTensors& beta1_tensor, const HyperTensors& beta2_tensor) {
  constexpr std::string_view kOp = kAdamOp;
  check_tensor_lists(kOp, params, grads, master_params,
                     {{"exp_avgs", exp_avgs, true},
                      {"exp_avg_sqs", exp_avg_sqs, true},
                      {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad}},
                     steps);
  TORCH_CHECK(amsgrad == !max_exp_avg_sqs.empty() || params.empty(), kOp,
              ": max_exp_avg_sqs must be given exactly when amsgrad is set");
  const ParamGroups& groups = step.groups;
  groups.check_entries("beta1", beta1.size());
  groups.check_entries("beta2", beta2.size());
  groups.check_entries("weight_decay", weight_decay.size());
  groups.check_entries("eps", eps.size());
  check_step_args(kOp, params, steps, master_params, step);
  if (!params.empty()) {
    groups.check_hyper_tensors("beta1_tensor", beta1_tensor, params[0].device());
    groups.check_hyper_tensors("beta2_tensor", beta2_tensor, params[0].device());
  }
}

void check_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList steps, at::TensorList master_params, const StepArgs& step,
                    c10::ArrayRef<double> momentum, c10::ArrayRef<double> dampening,
                    c10::ArrayRef<double> weight_decay, bool nesterov) {
  constexpr std::string_view kOp = kSgdOp;
  const ParamGroups& groups = step.groups;
  groups.check_entries("momentum", momentum.size());
  groups.check_entries("dampening", dampening.size());
  groups.check_entries("weight_decay", weight_decay.size());
  const bool has_momentum =
      same_in_every_group(kOp, "momentum", momentum, [](double m) { return m != 0.0; });
  // With momentum, each buffer has a step counter beside it: the kernel starts the buffer when
  // the counter reaches one, so a skipped first step leaves nothing half-initialized. Stochastic
  // rounding hashes the step.
  const bool counts_steps = has_momentum || step.any_stochastic_rounding();
  TORCH_CHECK(params.empty() || counts_steps == !steps.empty(), kOp,
              ": steps must be given exactly when momentum != 0 or a group rounds "
              "stochastically");
  check_tensor_lists(kOp, params, grads, master_params,
                     {{"momentum_buffers", momentum_buffers, has_momentum}},
                     counts_steps ? std::optional<at::TensorList>(steps) : std::nullopt);
  TORCH_CHECK(params.empty() || has_momentum == !momentum_buffers.empty(), kOp,
              ": momentum_buffers must be given exactly when momentum != 0");
  TORCH_CHECK(!nesterov || has_momentum || groups.count() == 0, kOp,
              ": nesterov requires momentum");
  check_step_args(kOp, params, steps, master_params, step);
}

void check_rmsprop_args(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                        at::TensorList grad_avgs, at::TensorList momentum_buffers,
                        at::TensorList steps, at::TensorList master_params, const StepArgs& step,
                        c10::ArrayRef<double> alpha, c10::ArrayRef<double> eps,
                        c10::ArrayRef<double> weight_decay, c10::ArrayRef<double> momentum,
                        bool centered) {
  constexpr std::string_view kOp = kRmspropOp;
  const ParamGroups& groups = step.groups;
  groups.check_entries("alpha", alpha.size());
  groups.check_entries("eps", eps.size());
  groups.check_entries("weight_decay", weight_decay.size());
  groups.check_entries("momentum", momentum.size());
  const bool has_momentum =
      same_in_every_group(kOp, "momentum", momentum, [](double m) { return m > 0.0; });
  check_tensor_lists(kOp, params, grads, master_params,
                     {{"square_avgs", square_avgs, true},
                      {"grad_avgs", grad_avgs, centered},
                      {"momentum_buffers", momentum_buffers, has_momentum}},
                     steps);
  TORCH_CHECK(params.empty() || (centered == !grad_avgs.empty() &&
                                 has_momentum == !momentum_buffers.empty()),
              kOp, ": grad_avgs must be given exactly when centered, momentum_buffers exactly ",
              "when momentum > 0");
  // The centered variance square_avg - grad_avg^2 is a small difference of two values that 8-bit
  // codes round by up to 1/16 each: measured, a steady gradient made params NaN within 140 steps.
  for (size_t i = 0; centered && i < square_avgs.size(); ++i) {
    TORCH_CHECK(square_avgs[i].scalar_type() != at::kByte, kOp, ": square_avgs[", i,
                "] is a blockwise 8-bit state (uint8), which centered RMSprop does not take");
  }
  check_step_args(kOp, params, steps, master_params, step);
}

void check_adagrad_args(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                        at::TensorList steps, at::TensorList master_params, const StepArgs& step,
                        c10::ArrayRef<double> lr_decay, c10::ArrayRef<double> weight_decay,
                        c10::ArrayRef<double> eps) {
  constexpr std::string_view kOp = kAdagradOp;
  const ParamGroups& groups = step.groups;
  groups.check_entries("lr_decay", lr_decay.size());
  groups.check_entries("weight_decay", weight_decay.size());
  groups.check_entries("eps", eps.size());
  check_tensor_lists(kOp, params, grads, master_params, {{"state_sums", state_sums, true}},
                     steps);
  check_step_args(kOp, params, steps, master_params, step);
}

void check_grad_norm_args(at::TensorList grads, const at::Tensor& norm,
                          const at::Tensor& found_inf, const at::Tensor& workspace,
                          const std::optional<at::Tensor>& grad_scale,
                          int64_t min_workspace_numel) {
  constexpr std::string_view kOp = kGradNormOp;
  const at::Device device = norm.device();
  check_scalar_tensor(kOp, "norm", norm, device);
  check_scalar_tensor(kOp, "found_inf", found_inf, device);
  check_scalar_tensor(kOp, "grad_scale", grad_scale, device);
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous() &&
                  workspace.device() == device && workspace.numel() >= min_workspace_numel,
              kOp, ": workspace must be a contiguous float32 tensor on ", device, " with at least ",
              min_workspace_numel, " elements");
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& grad = grads[i];
    TORCH_CHECK(grad.defined() && !grad.is_sparse(), kOp, ": grads[", i,
                "] must be a defined dense tensor");
    TORCH_CHECK(supported_dtype(grad.scalar_type()), kOp, ": grads[", i, "] has dtype ",
                grad.scalar_type(), "; supported: ", kSupportedDtypes);
    TORCH_CHECK(grad.device() == device, kOp, ": grads[", i, "] is on ", grad.device(),
                " but norm is on ", device);
    TORCH_CHECK(grad.is_non_overlapping_and_dense(), kOp, ": grads[", i,
                "] is not dense in memory");
  }
}

}  // namespace fused_opt

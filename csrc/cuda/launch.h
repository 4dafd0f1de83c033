// The boundary between the torch glue (ops_cuda.cpp, compiled by the C++ compiler against torch)
// and the kernels (*.cu, compiled by nvcc without torch): plain pointers and the math headers'
// hyperparameter structs only, so each side builds without the other's headers. Streams travel as
// void* (a cudaStream_t) for the same reason.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fused_opt/math/adagrad.h"
#include "fused_opt/math/adam.h"
#include "fused_opt/math/grad_scaling.h"
#include "fused_opt/math/l1.h"
#include "fused_opt/math/rmsprop.h"
#include "fused_opt/math/sgd.h"

namespace fused_opt::cuda {

// Storage dtype of one param and all of its tensors (the validation makes them agree); with
// master weights, the dtype of the 16-bit param and its grad.
enum class DType : uint8_t { kFloat32, kFloat64, kFloat16, kBFloat16 };

constexpr int kMaxStates = 3;

// How a kernel stores an updated param: rounded to nearest (every param but ...), stochastically
// (a bfloat16 param without a master in a group with a stochastic_rounding_seed), or to nearest
// with a Kahan compensation (a bfloat16 param of a master-weight call whose entry of
// master_params is bfloat16: then param is the bfloat16 param itself and param_copy its
// compensation, which the update adds to the param and rewrites; its states have its storage).
enum class ParamStore : uint8_t { kNearest, kStochastic, kCompensated };

// How a param's states are stored: as what the update updates (the param, or its float32
// master), as bfloat16 beside a float32 param or master (state_dtype=torch.bfloat16), or
// blockwise 8-bit beside one (state_dtype=torch.uint8, math/quantize.h: each state a byte tensor
// of codes and block maxima).
enum class StateStore : uint8_t { kAsUpdated, kBFloat16, kBlockwise8 };

// One param's tensors. All of them cover the same numel elements in the same flat order; states
// beyond the optimizer's count are ignored; step is null for optimizers without a counter. With
// master weights, param is the float32 master that the update math updates (states are float32
// too), and param_copy the float16/bfloat16 param that receives its rounding; otherwise (a
// float32 param of a master-weight call included) param_copy is null. group indexes the call's
// per-group hyperparameters. state_store: how the states are stored (StateStore).
// param_store: how the updated param is stored (ParamStore); with kStochastic, with the random
// bits of math::rounding_tensor_key(its group's seed, its index in the call) = rounding_key.
struct TensorArgs {
  void* param;
  const void* grad;
  void* states[kMaxStates];
  void* param_copy;
  float* step;
  int64_t numel;
  uint32_t group;
  DType dtype;
  StateStore state_store;
  ParamStore param_store;
  uint32_t rounding_key;
};

// A one-element tensor the kernels read on the device when ptr is set, so that a value changed
// in place (a scheduler's tensor lr) reaches graph replays; when ptr is null the host value holds.
struct DeviceScalar {
  const void* ptr;
  DType dtype;
};

// What every step call has besides its optimizer's hyperparameters and modes. The tensors of a
// group are consecutive.
struct StepCall {
  const TensorArgs* tensors;
  size_t count;
  size_t group_count;
  // Device pointers, read by the kernels: a step whose found_inf is nonzero changes nothing,
  // step counters included, without the host ever reading the flag.
  math::GradScaling scaling;
  // Per group, its compiled L1 mode (math::l1_mode of its l1_decay and l1_proximal): groups that
  // differ in it go in separate launches; the value l1_decay is each Group's hyper.l1_decay.
  const math::L1Mode* l1_modes;
  // Every TensorArgs has a param_copy (the 16-bit param, or a compensation), but float32 params,
  // which are their own masters.
  bool master_weights;
  // Some TensorArgs has ParamStore::kCompensated (they go in launches of their own).
  bool compensated;
  // Some TensorArgs has StateStore::kBlockwise8 (they go in launches of their own).
  bool quantized;
  // With step counters: a zeroed device counter, which each launch counts its finished blocks
  // in (and leaves zero), so that the last block advances the counters every block has read.
  unsigned* finished_blocks;
  void* stream;
};

// Each optimizer's hyperparameters for one param group; lr (Adam: beta1, beta2 too), when set,
// is read on the device in place of the host value.
struct AdamGroup {
  math::AdamHyper hyper;
  DeviceScalar lr, beta1, beta2;
};
struct SgdGroup {
  math::SgdHyper hyper;
  DeviceScalar lr;
};
struct RmspropGroup {
  math::RmspropHyper hyper;
  DeviceScalar lr;
};
struct AdagradGroup {
  math::AdagradHyper hyper;
  DeviceScalar lr;
};

// Each call updates every tensor of the list in place on the call's stream, without
// synchronizing with the host and without allocating memory, and advances its step counters in
// the same launch. `groups` has call.group_count entries. Modes that select a compiled kernel are
// explicit arguments or follow from the hyperparameters (weight decay on or off), as in the CPU
// kernels; groups that differ in such a mode go in separate launches, unless the mode with the
// hyperparameter at zero computes the same bits (AdamW's decoupled decay). L1 (call.l1_modes)
// splits launches the same way in every optimizer. Failures to launch
// throw std::runtime_error.
void adam_step(const StepCall& call, const AdamGroup* groups, bool amsgrad, bool maximize,
               bool decoupled_weight_decay);

// With momentum, every tensor has a step counter, which decides on the device whether its
// momentum buffer starts on this step (math::sgd_first_step); without it, tensors have counters
// only when a group rounds stochastically. Momentum is on in every group or in none.
void sgd_step(const StepCall& call, const SgdGroup* groups, bool nesterov, bool maximize);

// Momentum is on in every group or in none.
void rmsprop_step(const StepCall& call, const RmspropGroup* groups, bool centered,
                  bool maximize);

void adagrad_step(const StepCall& call, const AdagradGroup* groups, bool maximize);

// One gradient tensor of grad_norm, read as numel elements from data on.
struct GradArgs {
  const void* data;
  int64_t numel;
  DType dtype;
};

// The reduction keeps one partial per block of its grid in the workspace. The grid is the blocks
// the device keeps resident (264 on an H100), fewer for small grads, and never more than this,
// so that one workspace size, fixed before any device is seen, serves every GPU.
constexpr int kMaxNormBlocks = 1000;
// float32 elements of the workspace that grad_norm uses: two doubles per block and an unsigned
// counter after them. The workspace starts zeroed, and every call leaves it fit for the next
// (a CUDA graph replay included), so one zeroed buffer per device serves every call; calls
// sharing a workspace must not run concurrently.
constexpr int64_t kGradNormWorkspaceNumel = 4 * kMaxNormBlocks + 1;

// Writes *norm = sqrt(sum of squares of every element of every grad) * (1 / *grad_scale, when
// grad_scale is not null), and *found_inf = 1 if any element is inf or NaN, else 0. The workspace
// must be 8-byte aligned. The sums are in double and in an order fixed by the grads' sizes and
// the device, so equal grads give equal bits on every run. One launch, unless the grads
// outnumber a kernel's parameter space (over a thousand tensors), then one per table of them.
void grad_norm(const GradArgs* grads, size_t count, float* norm, float* found_inf,
               float* workspace, const float* grad_scale, void* stream);

}  // namespace fused_opt::cuda

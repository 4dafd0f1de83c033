// Generic CPU plumbing: spreads the elements of all tensors of one op call over the threads and
// runs an optimizer's element functor (from csrc/include/fused_opt/math) over each range.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <optional>
#include <type_traits>
#include <vector>

#include "fused_opt/math/grad_scaling.h"
#include "fused_opt/math/macros.h"
#include "fused_opt/math/quantize.h"
#include "fused_opt/math/rounding.h"
#include "fused_opt/prefetch.h"
#include "fused_opt/validate.h"

namespace fused_opt::cpu {

// Each element loop is compiled for several x86-64 levels and picked at load time, so one wheel
// runs everywhere. Loops over 16-bit storage (grads, or bfloat16 states beside float32 params)
// are bound by the conversions to and from fp32 and gain from AVX-512 (measured: bf16 AdamW
// 17 ms with it, 26 ms with AVX2 alone, on 64M params);
// loops over 32/64-bit storage are bound by memory, where 512-bit vectors only cost (measured on
// an AMD EPYC: 7% slower than the AVX2 loop on one thread), so they stop at AVX2+FMA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSED_OPT_CPU_CLONES_16BIT \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FUSED_OPT_CPU_CLONES_WIDE __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FUSED_OPT_CPU_CLONES_16BIT
#define FUSED_OPT_CPU_CLONES_WIDE
#endif

constexpr int kMaxStates = 3;

// The param-copy pointer type of loops without master weights: nothing is written through it.
struct NoCopy {};

// The element loop prefetches every stream kPrefetchAhead elements ahead, once per block of
// kPrefetchBlock elements. One core's hardware prefetchers alone keep too few cache misses in
// flight: the loops ran 10-30% above the time of the same traffic, and each uop an element added
// (L1's compares and selects) cost time as if it moved bytes. Measured on this project's 2-core
// Xeon, 16M params, old and new builds in alternating processes: a step took 0.88-0.95x the time
// on one thread and 0.87-0.95x on two (AdamW, SGD with momentum, Adagrad, float32 and float64,
// bfloat16 with float32 masters), 0.69-0.74x for bfloat16 states and 0.50-0.57x for bfloat16
// params, and L1's extra uops now mostly fit into the time the loop waits for memory. A block
// of 32: one of 16 is peeled completely before vectorizing and lost its vectors, and one of 64
// bunched its prefetches and gained less.
constexpr int64_t kPrefetchBlock = 32;
constexpr int64_t kPrefetchAhead = 1024;

template <typename T>
FUSED_OPT_HD void prefetch_block(const T* block) {
  const char* bytes = reinterpret_cast<const char*>(block);
  for (size_t byte = 0; byte < kPrefetchBlock * sizeof(T); byte += kCacheLine) {
    __builtin_prefetch(bytes + byte);
  }
}

// How a loop stores the updated value into its param: rounded to nearest (every param but ...)
struct RoundToNearest {
  // Whether the loop's param_copy is the param's Kahan compensation (see CompensateRounding).
  static constexpr bool kCompensates = false;

  template <typename ParamT, typename T>
  FUSED_OPT_HD ParamT store(T value, int64_t) const {
    return static_cast<ParamT>(value);
  }
};

// ... or, for bfloat16 params of a group with a stochastic_rounding_seed, stochastically, with the
// random bits of the loop's element i (math/rounding.h): the tensor's element whose index has
// the low 32 bits first_low + i, in the block of block_key (a loop never crosses blocks).
struct RoundStochastically {
  static constexpr bool kCompensates = false;
  uint32_t block_key;
  uint32_t first_low;

  template <typename ParamT, typename T>
  FUSED_OPT_HD ParamT store(T value, int64_t i) const {
    static_assert(std::is_same_v<ParamT, c10::BFloat16> && std::is_same_v<T, float>,
                  "stochastic rounding stores float32 values into bfloat16 params");
    const uint32_t random =
        math::rounding_bits(block_key, first_low + static_cast<uint32_t>(i));
    return c10::BFloat16(math::bfloat16_bits_stochastic(value, random),
                         c10::BFloat16::from_bits());
  }
};

// ... or, for bfloat16 params of a group with param_rounding="kahan", to nearest with a
// compensation (math/rounding.h): the loop's param_copy is then the param's bfloat16
// compensation buffer, which the update reads and rewrites.
struct CompensateRounding : RoundToNearest {
  static constexpr bool kCompensates = true;
};

// Element i of one pass (update_elements). A function with restrict pointers, not a lambda: a
// lambda's captures do not carry restrict, and with one six float16 SGD loops lost their
// AVX-512 vectors.
template <typename ParamT, typename GradT, typename StateT, typename CopyT, typename Element,
          typename Rounding>
FUSED_OPT_HD void update_element(ParamT* __restrict param, const GradT* __restrict grad,
                                 StateT* __restrict state0, StateT* __restrict state1,
                                 StateT* __restrict state2, CopyT* __restrict param_copy,
                                 int64_t i, typename Element::opmath grad_factor,
                                 const Element& element, const Rounding& rounding) {
  using T = typename Element::opmath;
  constexpr int kStates = Element::kNumStates;
  T states[kStates > 0 ? kStates : 1];
  if constexpr (kStates > 0) states[0] = static_cast<T>(state0[i]);
  if constexpr (kStates > 1) states[1] = static_cast<T>(state1[i]);
  if constexpr (kStates > 2) states[2] = static_cast<T>(state2[i]);
  T p = static_cast<T>(param[i]);
  if constexpr (Rounding::kCompensates) {
    p = math::compensated_value(p, static_cast<T>(param_copy[i]));
  }
  element(p, static_cast<T>(grad[i]) * grad_factor, states);
  if constexpr (kStates > 0) state0[i] = static_cast<StateT>(states[0]);
  if constexpr (kStates > 1) state1[i] = static_cast<StateT>(states[1]);
  if constexpr (kStates > 2) state2[i] = static_cast<StateT>(states[2]);
  param[i] = rounding.template store<ParamT>(p, i);
  if constexpr (Rounding::kCompensates) {
    // Read back, not kept in a local: a local c10::BFloat16 stays an aggregate in memory, which
    // the vectorizer refuses.
    param_copy[i] = static_cast<CopyT>(math::compensation_after(p, static_cast<T>(param[i])));
  } else if constexpr (!std::is_same_v<CopyT, NoCopy>) {
    param_copy[i] = static_cast<CopyT>(p);
  }
}

// One pass over n elements. `param` is what the update math updates (the float32 master when
// there is one); `param_copy`, unless NoCopy, receives its rounding to the 16-bit param, or, with
// CompensateRounding, is the param's compensation. Every gradient is multiplied by grad_factor
// (loss scale and clipping, math/grad_scaling.h) before the math sees it; x * 1 is exact, so
// the factor costs no accuracy when there is none. Unused state pointers are never touched (the
// functor's kNumStates is a compile-time constant), so separate restrict pointers keep the loop
// free of aliasing checks and let it vectorize. `rounding` stores the updated param
// (RoundToNearest, RoundStochastically or CompensateRounding).
template <typename ParamT, typename GradT, typename StateT, typename CopyT, typename Element,
          typename Rounding>
FUSED_OPT_HD void update_elements(ParamT* __restrict param, const GradT* __restrict grad,
                                  StateT* __restrict state0, StateT* __restrict state1,
                                  StateT* __restrict state2, CopyT* __restrict param_copy,
                                  int64_t n, typename Element::opmath grad_factor,
                                  const Element& element, const Rounding& rounding) {
  constexpr int kStates = Element::kNumStates;
  static_assert(kStates <= kMaxStates, "update_elements handles at most three state tensors");
  constexpr bool kHasCopy = !std::is_same_v<CopyT, NoCopy>;
  // Two streams (plain SGD) the hardware prefetchers keep up with: prefetching them too made
  // that step 7% slower.
  constexpr bool kPrefetches = kStates > 0 || kHasCopy;
  int64_t i = 0;
  // The last kPrefetchAhead elements were prefetched by the blocks before them.
  for (; kPrefetches && i + kPrefetchAhead + kPrefetchBlock <= n; i += kPrefetchBlock) {
    const int64_t ahead = i + kPrefetchAhead;
    prefetch_block(param + ahead);
    prefetch_block(grad + ahead);
    if constexpr (kStates > 0) prefetch_block(state0 + ahead);
    if constexpr (kStates > 1) prefetch_block(state1 + ahead);
    if constexpr (kStates > 2) prefetch_block(state2 + ahead);
    if constexpr (kHasCopy) prefetch_block(param_copy + ahead);
    for (int64_t j = 0; j < kPrefetchBlock; ++j) {
      update_element(param, grad, state0, state1, state2, param_copy, i + j, grad_factor, element,
                     rounding);
    }
  }
  for (; i < n; ++i) {
    update_element(param, grad, state0, state1, state2, param_copy, i, grad_factor, element,
                   rounding);
  }
}

#define FUSED_OPT_UPDATE_RANGE(name, clones)                                                  \
  template <typename ParamT, typename GradT, typename StateT, typename CopyT, typename Element, \
            typename Rounding>                                                                 \
  clones void name(ParamT* __restrict param, const GradT* __restrict grad,                     \
                   StateT* __restrict state0, StateT* __restrict state1,                       \
                   StateT* __restrict state2, CopyT* __restrict param_copy, int64_t n,         \
                   typename Element::opmath grad_factor, const Element element,                \
                   const Rounding rounding) {                                                  \
    update_elements(param, grad, state0, state1, state2, param_copy, n, grad_factor, element,  \
                    rounding);                                                                 \
  }
// An attribute cannot depend on a template parameter, hence one wrapper per set of clones.
FUSED_OPT_UPDATE_RANGE(update_range_16bit, FUSED_OPT_CPU_CLONES_16BIT)
FUSED_OPT_UPDATE_RANGE(update_range_wide, FUSED_OPT_CPU_CLONES_WIDE)
#undef FUSED_OPT_UPDATE_RANGE

template <typename ParamT, typename GradT, typename StateT, typename CopyT, typename Element,
          typename Rounding = RoundToNearest>
void update_range(ParamT* param, const GradT* grad, StateT* state0, StateT* state1,
                  StateT* state2, CopyT* param_copy, int64_t n,
                  typename Element::opmath grad_factor, const Element& element,
                  const Rounding& rounding = {}) {
  if constexpr (Element::kNumStates == 0 && !std::is_same_v<StateT, ParamT>) {
    // Nothing to store as StateT (plain SGD): the loop of the param's own storage, not a copy.
    update_range(param, grad, static_cast<ParamT*>(nullptr), static_cast<ParamT*>(nullptr),
                 static_cast<ParamT*>(nullptr), param_copy, n, grad_factor, element, rounding);
  } else if constexpr (sizeof(GradT) == 2 || sizeof(StateT) == 2) {
    update_range_16bit(param, grad, state0, state1, state2, param_copy, n, grad_factor, element,
                       rounding);
  } else {
    update_range_wide(param, grad, state0, state1, state2, param_copy, n, grad_factor, element,
                      rounding);
  }
}

// Blockwise 8-bit states (state_dtype=torch.uint8, math/quantize.h) are updated one block of
// kQuantBlock elements at a time, in two passes over the block: the first decodes each element's
// states, runs the element functor, stores the param and keeps the new states (in a local array,
// which stays in L1) and their block maximum; the second encodes them against that maximum,
// which every code needs before the first is stored. Each block's codes and maximum are read and
// written once. The maximum is taken over the magnitudes' bits, which order like the magnitudes
// (NaN above infinity, so a NaN state makes its block NaN, as it would stay NaN in float32),
// because an integer maximum vectorizes where a float one, without -ffast-math, does not.
template <bool kSigned>
FUSED_OPT_HD void encode_block(const float* __restrict values, uint8_t* __restrict codes,
                               int64_t n, float absmax) {
  const float inverse = math::StateCode<kSigned>::inverse_scale(absmax);
  for (int64_t i = 0; i < n; ++i) codes[i] = math::StateCode<kSigned>::encode(values[i], inverse);
}

FUSED_OPT_HD uint32_t max_magnitude_bits(uint32_t max_bits, float value) {
  const uint32_t bits = math::float_bits(value) & 0x7fffffffu;
  return bits > max_bits ? bits : max_bits;
}

// The first pass over one block of n elements (see above): the states decoded from codes0..2
// with the block's scales, updated, and left in values0..2; returns nothing but fills
// max_bits[s], the bits of each new state's largest magnitude.
template <typename GradT, typename CopyT, typename Element>
FUSED_OPT_HD void update_quantized_block(
    float* __restrict param, const GradT* __restrict grad, const uint8_t* __restrict codes0,
    const uint8_t* __restrict codes1, const uint8_t* __restrict codes2,
    float* __restrict values0, float* __restrict values1, float* __restrict values2,
    CopyT* __restrict param_copy, int64_t n, const float (&scale)[kMaxStates],
    uint32_t (&max_bits)[kMaxStates], float grad_factor, const Element& element) {
  constexpr int kStates = Element::kNumStates;
  uint32_t max0 = 0, max1 = 0, max2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    float states[kStates];
    states[0] = math::StateCode<math::signed_state<Element>(0)>::decode(codes0[i], scale[0]);
    if constexpr (kStates > 1) {
      states[1] = math::StateCode<math::signed_state<Element>(1)>::decode(codes1[i], scale[1]);
    }
    if constexpr (kStates > 2) {
      states[2] = math::StateCode<math::signed_state<Element>(2)>::decode(codes2[i], scale[2]);
    }
    float p = param[i];
    element(p, static_cast<float>(grad[i]) * grad_factor, states);
    param[i] = p;
    if constexpr (!std::is_same_v<CopyT, NoCopy>) param_copy[i] = static_cast<CopyT>(p);
    values0[i] = states[0];
    max0 = max_magnitude_bits(max0, states[0]);
    if constexpr (kStates > 1) {
      values1[i] = states[1];
      max1 = max_magnitude_bits(max1, states[1]);
    }
    if constexpr (kStates > 2) {
      values2[i] = states[2];
      max2 = max_magnitude_bits(max2, states[2]);
    }
  }
  max_bits[0] = max0;
  max_bits[1] = max1;
  max_bits[2] = max2;
}

// Updates the blocks [first_block, end_block) of one tensor of `numel` elements whose states are
// the quantized tensors `states` (their starts, math/quantize.h's layout). `param` is float32 (a
// param, or the master of `copy`, which then receives its rounding); the grad is stored as
// GradT. Ranges of threads own the blocks that start in them, so no block is split.
template <typename GradT, typename CopyT, typename Element>
FUSED_OPT_CPU_CLONES_16BIT void update_quantized_blocks(
    float* param, const GradT* grad, const std::array<uint8_t*, kMaxStates> states,
    CopyT* param_copy, int64_t numel, int64_t first_block, int64_t end_block, float grad_factor,
    const Element element) {
  constexpr int kStates = Element::kNumStates;
  static_assert(kStates > 0, "quantized states need a state");
  alignas(64) float values[kMaxStates][math::kQuantBlock];
  float* maxima[kMaxStates] = {};
  for (int s = 0; s < kStates; ++s) {
    maxima[s] = reinterpret_cast<float*>(states[s] + math::quantized_scales_offset(numel));
  }
  const auto for_each_state = [&](const auto& fn) {
    fn(std::integral_constant<int, 0>{});
    if constexpr (kStates > 1) fn(std::integral_constant<int, 1>{});
    if constexpr (kStates > 2) fn(std::integral_constant<int, 2>{});
  };
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t begin = block * math::kQuantBlock;
    const int64_t n = std::min(math::kQuantBlock, numel - begin);
    float scale[kMaxStates] = {};
    for_each_state([&](auto s) {
      scale[s] = math::StateCode<math::signed_state<Element>(s)>::scale(maxima[s][block]);
    });
    CopyT* copy = nullptr;
    if constexpr (!std::is_same_v<CopyT, NoCopy>) copy = param_copy + begin;
    const auto codes_at = [&](int s) -> const uint8_t* {
      return s < kStates ? states[s] + begin : nullptr;
    };
    uint32_t max_bits[kMaxStates];
    update_quantized_block(param + begin, grad + begin, codes_at(0), codes_at(1), codes_at(2),
                           values[0], values[1], values[2], copy, n, scale, max_bits,
                           grad_factor, element);
    for_each_state([&](auto s) {
      const float absmax = math::float_from_bits(max_bits[s]);
      encode_block<math::signed_state<Element>(s)>(values[s], states[s] + begin, n, absmax);
      maxima[s][block] = absmax;
    });
  }
}

// A tensor's elements as T. The op's checks (validate.cpp) have established every tensor's dtype
// and storage, and data_ptr<T>() checking both again for every tensor and every list costs more
// than the arithmetic of a small tensor (a quarter of a step over 4,096 one-element params).
template <typename T>
T* elements(const at::Tensor& t) {
  if constexpr (std::is_const_v<T>) {
    return static_cast<T*>(t.const_data_ptr());
  } else {
    return static_cast<T*>(t.mutable_data_ptr());
  }
}

// A step over thousands of small tensors waits on each tensor's metadata more than on its
// elements: its TensorImpl, then its StorageImpl, then its first elements, three cache misses
// one after the other when the step comes cold (after a forward and backward pass), for every
// tensor of every list. Asking ahead for the TensorImpl of the tensor kTensorsAhead positions
// on, for the StorageImpl of a nearer one (whose TensorImpl is on its way by then) and for the
// first elements of a nearer one still lets the misses of several tensors overlap. Measured with
// 4,096 one-element params (AdamW, one thread, this project's 2-core AMD EPYC, a 64 MB in-place
// add before each step): with and without in alternating steps of one process, the element
// loops took 0.71-0.85x the time; this build against the one before in six alternating
// processes, a step's median 3.01 ms against 3.16 (faster in five). The op's checks prefetch
// too (kChecksAhead in validate.cpp).
constexpr size_t kTensorsAhead = 12;
constexpr size_t kStorageAhead = 8;
constexpr size_t kDataAhead = 4;

inline const c10::StorageImpl* storage_of(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
}

inline void prefetch_metadata_ahead(at::TensorList list, size_t t) {
  const size_t n = list.size();
  if (t + kTensorsAhead < n) prefetch_tensor_impl(list[t + kTensorsAhead]);
  if (t + kStorageAhead < n) {
    if (const c10::StorageImpl* storage = storage_of(list[t + kStorageAhead])) {
      __builtin_prefetch(storage);
    }
  }
  if (t + kDataAhead < n) {
    // The tensor's own first element: a small param's state is a view into a shared buffer, whose
    // storage begins at the first param's.
    if (storage_of(list[t + kDataAhead]) != nullptr) {
      __builtin_prefetch(list[t + kDataAhead].unsafeGetTensorImpl()->data());
    }
  }
}

// Below this many elements a call runs on one thread: waking the pool costs more than it saves.
constexpr int64_t kParallelGrain = 32768;

// Calls body(t, begin, end) on element ranges that cover every element of every tensor once.
// Threads split the concatenation of all tensors by element count, so many small tensors and
// one huge tensor both keep every thread busy.
template <typename Body>
void parallel_over_elements(at::TensorList params, const Body& body) {
  // Reused across calls: after the first step no host memory is allocated here.
  thread_local std::vector<int64_t> offsets;
  offsets.resize(params.size() + 1);
  offsets[0] = 0;
  for (size_t t = 0; t < params.size(); ++t) offsets[t + 1] = offsets[t] + params[t].numel();
  const int64_t total = offsets.back();
  if (total == 0) return;
  const int64_t* starts = offsets.data();
  const size_t num_tensors = params.size();

  at::parallel_for(0, total, kParallelGrain, [&](int64_t begin, int64_t end) {
    // The last tensor starting at or before `begin`; zero-element tensors share their start
    // with the next tensor, and upper_bound steps past them.
    size_t t = std::upper_bound(starts, starts + num_tensors, begin) - starts - 1;
    for (int64_t pos = begin; pos < end; ++t) {
      const int64_t stop = std::min(end, starts[t + 1]);
      if (stop > pos) body(t, pos - starts[t], stop - starts[t]);
      pos = std::max(pos, stop);
    }
  });
}

// Calls fn(StateT{}) with the storage type of tensor t's states: bfloat16 when they are stored so
// beside a float32 param or master (state_dtype=torch.bfloat16; validate.cpp allows no other
// mix), else the param's own storage type ParamT.
template <typename ParamT, size_t kLists, typename Fn>
void with_state_storage(const std::array<at::TensorList, kLists>& state_lists, size_t t,
                        const Fn& fn) {
  if constexpr (std::is_same_v<ParamT, float>) {
    for (const auto& list : state_lists) {
      if (list.empty()) continue;
      if (list[t].scalar_type() == at::kBFloat16) {
        fn(c10::BFloat16{});
        return;
      }
      break;
    }
  }
  fn(ParamT{});
}

// Whether tensor t's states are blockwise 8-bit (validate.cpp: only beside a float32 param or
// master, all of one param's states alike).
template <size_t kLists>
bool quantized_states(const std::array<at::TensorList, kLists>& state_lists, size_t t) {
  for (const auto& list : state_lists) {
    if (!list.empty()) return list[t].scalar_type() == at::kByte;
  }
  return false;
}

// The part of apply_elementwise for a tensor with quantized states: the blocks that start in
// [begin, end). `master`: null, or the float32 master of the float16/bfloat16 `param`.
template <size_t kLists, typename WithElement>
void update_quantized_range(const at::Tensor& param, const at::Tensor& grad,
                            const at::Tensor* master,
                            const std::array<at::TensorList, kLists>& state_lists, size_t t,
                            int64_t begin, int64_t end, float grad_factor,
                            const WithElement& with_element) {
  std::array<uint8_t*, kMaxStates> states{};
  size_t used = 0;
  for (const auto& list : state_lists) {
    if (!list.empty()) states[used++] = elements<uint8_t>(list[t]);
  }
  const int64_t numel = param.numel();
  const int64_t first_block = math::quantized_blocks(begin);
  const int64_t end_block = math::quantized_blocks(end);
  if (first_block == end_block) return;
  const auto update_quantized = [&](const auto& element) {
    if (master == nullptr) {
      update_quantized_blocks(elements<float>(param), elements<const float>(grad), states,
                              static_cast<NoCopy*>(nullptr), numel, first_block, end_block,
                              grad_factor, element);
      return;
    }
    AT_DISPATCH_REDUCED_FLOATING_TYPES(param.scalar_type(), "fused_opt_cpu_quantized", [&] {
      update_quantized_blocks(elements<float>(*master), elements<const scalar_t>(grad), states,
                              elements<scalar_t>(param), numel, first_block, end_block,
                              grad_factor, element);
    });
  };
  with_element(float{}, t, [&](const auto& element) {
    // A functor without states (plain SGD) has no quantized states to come here with.
    if constexpr (std::decay_t<decltype(element)>::kNumStates > 0) update_quantized(element);
  });
}

// How one group's params are stored: to nearest, or, with a seed, bfloat16 params stochastically.
struct GroupRounding {
  std::optional<int64_t> seed;
  size_t first_tensor;  // the call-wide index of the group's first param
  at::TensorList steps;  // the group's step counters, already counting this step

  GroupRounding(const StepArgs& step, const GroupRange& group, at::TensorList call_steps)
      : seed(step.rounding_seed(group.group)),
        first_tensor(group.offset),
        steps(group.of(call_steps)) {}

  // Tensor t's (of the group) elements from `first_element` to the end of its block of 2^32,
  // rounding stochastically.
  RoundStochastically stochastic(size_t t, int64_t first_element) const {
    const uint32_t tensor_key =
        math::rounding_tensor_key(static_cast<uint64_t>(*seed), first_tensor + t);
    const uint32_t step_key =
        math::rounding_step_key(tensor_key, *elements<const float>(steps[t]));
    return {math::rounding_block_key(step_key, first_element),
            static_cast<uint32_t>(first_element)};
  }
};

// For every tensor t, with_element(opmath_tag, t, run) picks the element functor for t and calls
// run(functor); run then applies it to every element of params[t], grads[t] and the matching
// entries of the state lists (an empty list: that state is unused). Passing the functor to a
// continuation lets per-tensor facts (a first step, say) select a different compiled loop.
// With master_params, the functor updates the master of each float16/bfloat16 param (they take
// master_params in order) and float32 states, and the param receives the result rounded to its
// 16-bit type; float32 params are their own masters. A bfloat16 entry of master_params is
// instead the Kahan compensation of its bfloat16 param (CompensateRounding), whose states are
// stored as the param is. States of float32 params and masters may be stored as bfloat16 (see
// with_state_storage); the math runs in float32 all the same.
// `rounding` says how bfloat16 params without masters are stored.
template <size_t kLists, typename WithElement>
void apply_elementwise(at::TensorList params, at::TensorList grads, at::TensorList master_params,
                       const std::array<at::TensorList, kLists>& state_lists, float grad_factor,
                       const GroupRounding& rounding, const WithElement& with_element) {
  static_assert(kLists <= kMaxStates, "at most three state lists");
  const auto state_pointers = [&](size_t t, int64_t begin, auto state_tag) {
    using StateT = decltype(state_tag);
    std::array<StateT*, kMaxStates> states{};
    size_t used = 0;
    for (const auto& list : state_lists) {
      if (!list.empty()) states[used++] = elements<StateT>(list[t]) + begin;
    }
    return states;
  };
  // Reused across calls: after the first step no host memory is allocated here.
  thread_local std::vector<int64_t> master_of;
  master_of.assign(params.size(), -1);
  if (!master_params.empty()) {
    int64_t next = 0;
    for (size_t t = 0; t < params.size(); ++t) {
      if (takes_master(params[t])) master_of[t] = next++;
    }
  }
  const int64_t* master_index = master_of.data();
  parallel_over_elements(params, [&](size_t t, int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    if (begin == 0) {
      prefetch_metadata_ahead(params, t);
      prefetch_metadata_ahead(grads, t);
      prefetch_metadata_ahead(rounding.steps, t);
      for (const auto& list : state_lists) prefetch_metadata_ahead(list, t);
    }
    if (quantized_states(state_lists, t)) {
      update_quantized_range(params[t], grads[t],
                             master_index[t] < 0 ? nullptr : &master_params[master_index[t]],
                             state_lists, t, begin, end, grad_factor, with_element);
    } else if (master_index[t] < 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, params[t].scalar_type(), "fused_opt_cpu", [&] {
            using T = math::opmath_t<scalar_t>;
            scalar_t* param = elements<scalar_t>(params[t]) + begin;
            const scalar_t* grad = elements<const scalar_t>(grads[t]) + begin;
            with_state_storage<scalar_t>(state_lists, t, [&](auto state_tag) {
              const auto states = state_pointers(t, begin, state_tag);
              with_element(T{}, t, [&](const auto& element) {
                // Elements [from, to) of the range.
                const auto run = [&](int64_t from, int64_t to, const auto& store) {
                  auto at = states;
                  for (auto& state : at) {
                    if (state != nullptr) state += from;
                  }
                  update_range(param + from, grad + from, at[0], at[1], at[2],
                               static_cast<NoCopy*>(nullptr), to - from,
                               static_cast<T>(grad_factor), element, store);
                };
                if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
                  if (rounding.seed) {
                    for (int64_t from = 0; from < n;) {
                      const int64_t block_end =
                          (begin + from) / math::kRoundingBlock * math::kRoundingBlock +
                          math::kRoundingBlock;
                      const int64_t to = std::min(n, block_end - begin);
                      run(from, to, rounding.stochastic(t, begin + from));
                      from = to;
                    }
                    return;
                  }
                }
                run(0, n, RoundToNearest{});
              });
            });
          });
    } else if (master_params[master_index[t]].scalar_type() == at::kBFloat16) {
      // A bfloat16 param's Kahan compensation (validate.cpp admits no other bfloat16 master);
      // its states are stored as the param is.
      using Storage = c10::BFloat16;
      Storage* param = elements<Storage>(params[t]) + begin;
      const Storage* grad = elements<const Storage>(grads[t]) + begin;
      Storage* compensation = elements<Storage>(master_params[master_index[t]]) + begin;
      const auto states = state_pointers(t, begin, Storage{});
      with_element(float{}, t, [&](const auto& element) {
        update_range(param, grad, states[0], states[1], states[2], compensation, n, grad_factor,
                     element, CompensateRounding{});
      });
    } else {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(params[t].scalar_type(), "fused_opt_cpu_master", [&] {
        float* master = elements<float>(master_params[master_index[t]]) + begin;
        const scalar_t* grad = elements<const scalar_t>(grads[t]) + begin;
        scalar_t* param = elements<scalar_t>(params[t]) + begin;
        with_state_storage<float>(state_lists, t, [&](auto state_tag) {
          const auto states = state_pointers(t, begin, state_tag);
          with_element(float{}, t, [&](const auto& element) {
            update_range(master, grad, states[0], states[1], states[2], param, n, grad_factor,
                         element);
          });
        });
      });
    }
  });
}

// Adds one to every step counter and returns nothing: the counters are float32 scalars on the
// CPU, as torch.optim keeps them.
inline void increment_steps(at::TensorList steps) {
  for (size_t t = 0; t < steps.size(); ++t) {
    prefetch_metadata_ahead(steps, t);
    *elements<float>(steps[t]) += 1.0f;
  }
}

inline double step_value(const at::Tensor& step) { return *elements<float>(step); }

// A hyperparameter's value: its tensor's when given (host memory here, so no sync).
inline double host_value(double value, const std::optional<at::Tensor>& tensor) {
  return tensor ? tensor->item<double>() : value;
}

// The factor every gradient of this step is multiplied by, or nullopt when found_inf says the
// step must change nothing. CPU tensors are host memory, so reading them costs no sync.
inline std::optional<float> step_grad_factor(const ScalingArgs& scaling) {
  const math::GradScaling view = scaling.view();
  if (math::skips_step(view)) return std::nullopt;
  return math::grad_factor(view);
}

// A step call's skeleton: nothing at all when found_inf says so; otherwise every step counter
// advances once and update(group, grad_factor) runs for every group that has params, with the
// group's own hyperparameters and modes.
template <typename Update>
void for_each_group_step(const StepArgs& step, at::TensorList params,
                         at::TensorList master_params, at::TensorList steps,
                         const Update& update) {
  if (params.empty()) return;
  const std::optional<float> grad_factor = step_grad_factor(step.scaling);
  if (!grad_factor) return;
  increment_steps(steps);
  step.groups.for_each(params, !master_params.empty(), [&](const GroupRange& group) {
    if (group.size > 0) update(group, *grad_factor);
  });
}

}  // namespace fused_opt::cpu

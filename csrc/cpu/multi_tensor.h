// Generic CPU plumbing: spreads the elements of all tensors of one op call over the threads and
// runs an optimizer's element functor (from csrc/include/fused_opt/math) over each range.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

#include "fused_opt/math/macros.h"

namespace fused_opt::cpu {

// Each element loop is compiled for several x86-64 levels and picked at load time, so one wheel
// runs everywhere. Loops over 16-bit storage are bound by the conversions to and from fp32 and
// gain from AVX-512 (measured: bf16 AdamW 17 ms with it, 26 ms with AVX2 alone, on 64M params);
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

// One pass over n elements. Unused state pointers are never touched (the functor's
// kNumStates is a compile-time constant), so separate restrict pointers keep the loop free of
// aliasing checks and let the compiler vectorize it.
template <typename ParamT, typename GradT, typename StateT, typename Element>
FUSED_OPT_HD void update_elements(ParamT* __restrict param, const GradT* __restrict grad,
                                  StateT* __restrict state0, StateT* __restrict state1,
                                  StateT* __restrict state2, int64_t n, const Element& element) {
  using T = typename Element::opmath;
  constexpr int kStates = Element::kNumStates;
  static_assert(kStates <= kMaxStates, "update_elements handles at most three state tensors");
  for (int64_t i = 0; i < n; ++i) {
    T states[kStates > 0 ? kStates : 1];
    if constexpr (kStates > 0) states[0] = static_cast<T>(state0[i]);
    if constexpr (kStates > 1) states[1] = static_cast<T>(state1[i]);
    if constexpr (kStates > 2) states[2] = static_cast<T>(state2[i]);
    T p = static_cast<T>(param[i]);
    element(p, static_cast<T>(grad[i]), states);
    if constexpr (kStates > 0) state0[i] = static_cast<StateT>(states[0]);
    if constexpr (kStates > 1) state1[i] = static_cast<StateT>(states[1]);
    if constexpr (kStates > 2) state2[i] = static_cast<StateT>(states[2]);
    param[i] = static_cast<ParamT>(p);
  }
}

template <typename ParamT, typename GradT, typename StateT, typename Element>
FUSED_OPT_CPU_CLONES_16BIT void update_range_16bit(ParamT* __restrict param,
                                                   const GradT* __restrict grad,
                                                   StateT* __restrict state0,
                                                   StateT* __restrict state1,
                                                   StateT* __restrict state2, int64_t n,
                                                   const Element element) {
  update_elements(param, grad, state0, state1, state2, n, element);
}

template <typename ParamT, typename GradT, typename StateT, typename Element>
FUSED_OPT_CPU_CLONES_WIDE void update_range_wide(ParamT* __restrict param,
                                                 const GradT* __restrict grad,
                                                 StateT* __restrict state0,
                                                 StateT* __restrict state1,
                                                 StateT* __restrict state2, int64_t n,
                                                 const Element element) {
  update_elements(param, grad, state0, state1, state2, n, element);
}

template <typename ParamT, typename GradT, typename StateT, typename Element>
void update_range(ParamT* param, const GradT* grad, StateT* state0, StateT* state1,
                  StateT* state2, int64_t n, const Element& element) {
  if constexpr (sizeof(ParamT) == 2) {
    update_range_16bit(param, grad, state0, state1, state2, n, element);
  } else {
    update_range_wide(param, grad, state0, state1, state2, n, element);
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

// For every tensor t, with_element(opmath_tag, t, run) picks the element functor for t and calls
// run(functor); run then applies it to every element of params[t], grads[t] and the matching
// entries of the state lists (an empty list: that state is unused). Passing the functor to a
// continuation lets per-tensor facts (a first step, say) select a different compiled loop.
template <size_t kLists, typename WithElement>
void apply_elementwise(at::TensorList params, at::TensorList grads,
                       const std::array<at::TensorList, kLists>& state_lists,
                       const WithElement& with_element) {
  static_assert(kLists <= kMaxStates, "at most three state lists");
  parallel_over_elements(params, [&](size_t t, int64_t begin, int64_t end) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, params[t].scalar_type(), "fused_opt_cpu", [&] {
          using T = math::opmath_t<scalar_t>;
          std::array<scalar_t*, kMaxStates> states{};
          size_t used = 0;
          for (const auto& list : state_lists) {
            if (!list.empty()) states[used++] = list[t].template data_ptr<scalar_t>() + begin;
          }
          scalar_t* param = params[t].data_ptr<scalar_t>() + begin;
          const scalar_t* grad = grads[t].data_ptr<scalar_t>() + begin;
          with_element(T{}, t, [&](const auto& element) {
            update_range<scalar_t, scalar_t, scalar_t>(param, grad, states[0], states[1],
                                                       states[2], end - begin, element);
          });
        });
  });
}

// Adds one to every step counter and returns nothing: the counters are float32 scalars on the
// CPU, as torch.optim keeps them.
inline void increment_steps(at::TensorList steps) {
  for (const auto& step : steps) *step.data_ptr<float>() += 1.0f;
}

inline double step_value(const at::Tensor& step) { return *step.data_ptr<float>(); }

inline double effective_lr(double lr, const std::optional<at::Tensor>& lr_tensor) {
  return lr_tensor ? lr_tensor->item<double>() : lr;
}

}  // namespace fused_opt::cpu

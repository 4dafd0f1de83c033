// Turns runtime flags into compile-time constants once per op call, so that element loops are
// compiled per mode and never branch on a mode per element.
#pragma once

#include <stdexcept>
#include <type_traits>

namespace fused_opt {

// Calls fn(std::integral_constant<..., v>{}) for the candidate v equal to `value`.
template <auto... kCandidates, typename Value, typename Fn>
void with_constant(Value value, Fn&& fn) {
  const bool matched =
      ((value == kCandidates
            ? (fn(std::integral_constant<decltype(kCandidates), kCandidates>{}), true)
            : false) ||
       ...);
  if (!matched) throw std::logic_error("fused_opt: value outside the compiled candidates");
}

template <typename Fn>
void with_bool(bool value, Fn&& fn) {
  with_constant<false, true>(value, fn);
}

}  // namespace fused_opt

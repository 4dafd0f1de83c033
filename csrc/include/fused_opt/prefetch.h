// Software prefetches for the host side of a step over many small tensors. Such a step waits on
// the memory of each tensor's metadata (its TensorImpl, storage and autograd metadata, and the
// Python dict of its param's state) more than on its elements: every object is a cache miss
// when the step comes cold, after a forward and backward pass, and the misses of a loop over
// the tensors come one after another unless the loop asks for the objects of tensors a few
// positions ahead.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace fused_opt {

constexpr size_t kCacheLine = 64;

inline void prefetch_lines(const void* object, size_t bytes) {
  const char* start = static_cast<const char*>(object);
  for (size_t byte = 0; byte < bytes; byte += kCacheLine) __builtin_prefetch(start + byte);
}

inline void prefetch_tensor_impl(const at::Tensor& t) {
  prefetch_lines(t.unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
}

}  // namespace fused_opt

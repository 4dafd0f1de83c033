// The emulation tier's device side: g++ compiles each unmodified csrc/cuda/*.cu as host C++ with
// this header included first, so the kernels' own source runs on the CPU (tests/simt.py builds
// it). It supplies what nvcc would: the CUDA keywords, the built-in thread coordinates, block and
// warp barriers, atomics and fences, the device intrinsics the kernels use, and kernel launches,
// which csrc/simt/runtime.cpp executes with every CUDA thread as a fiber and every block on an
// OS thread. The toolkit's own headers provide the host halves of the runtime API and of the
// float16 / bfloat16 types.
#pragma once

// Defined before cuda_runtime.h, which keeps a definition it finds: shared memory is per block,
// and a block's threads are fibers of one OS thread that runs one block at a time.
#define __shared__ static thread_local
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// Device code calls these unqualified; nvcc declares them in the global namespace.
using std::isnan;

namespace fused_opt::simt {

struct Coordinates {
  dim3 thread, block, block_dim, grid_dim;
};

// Of the emulated thread running now on this OS thread.
const Coordinates& coordinates();

// __syncthreads: waits until every thread of the block reaches a barrier. The call site is part
// of the barrier, so threads waiting at different __syncthreads fail the launch (divergence), as
// does a barrier that some threads of the block exited before reaching.
void sync_threads(const char* file, int line);

// A barrier among the lanes of `mask` in the caller's warp; a lane of the mask that exited or
// waits elsewhere fails the launch.
void sync_warp(unsigned mask);

// The 32 exchange slots of the caller's warp, for shuffles.
uint64_t* warp_slots();

using KernelBody = void (*)(const void* closure);

// Runs body(closure) once per thread of the grid and returns the launch's status. Called by
// cudaLaunchKernel below; `signature` names the kernel's parameter types for the launch log.
cudaError_t run_grid(dim3 grid, dim3 block, size_t parameter_bytes, KernelBody body,
                     const void* closure, const char* signature);

// The bytes the kernel's parameters take in CUDA's parameter space: each at its own alignment.
template <typename... Params>
constexpr size_t parameter_bytes() {
  size_t offset = 0;
  ((offset = (offset + alignof(Params) - 1) / alignof(Params) * alignof(Params) + sizeof(Params)),
   ...);
  return offset;
}

// The kernel's arguments, copied from the pointers a cudaLaunchKernel call passes.
template <typename... Params, size_t... I>
std::tuple<Params...> arguments_from(void** args, std::index_sequence<I...>) {
  return std::tuple<Params...>(*static_cast<Params*>(args[I])...);
}

// Lane l of the warp gets the value that lane source(l) passed, or its own where source(l) is
// outside the warp or the mask.
template <typename T, typename Source>
T shuffle(unsigned mask, T value, const Source& source) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                "shuffles move at most 8 bytes");
  const unsigned lane = coordinates().thread.x % 32;
  uint64_t* slots = warp_slots();
  std::memcpy(&slots[lane], &value, sizeof(T));
  sync_warp(mask);  // every lane has published its value
  T result = value;
  const unsigned from = source(lane);
  if (from < 32 && ((mask >> from) & 1u)) std::memcpy(&result, &slots[from], sizeof(T));
  sync_warp(mask);  // every lane has read before any lane's next shuffle overwrites a slot
  return result;
}

template <typename T>
T shuffle_down(unsigned mask, T value, unsigned delta, int width) {
  return shuffle(mask, value, [&](unsigned lane) {
    const unsigned segment_end = (lane / width + 1) * width;
    return lane + delta < segment_end ? lane + delta : 32u;
  });
}

template <typename T>
T shuffle_xor(unsigned mask, T value, unsigned lane_mask, int width) {
  return shuffle(mask, value, [&](unsigned lane) {
    const unsigned source = lane ^ lane_mask;
    // A source beyond the lane's segment of `width` lanes leaves the lane its own value.
    return source / width == lane / width ? source : 32u;
  });
}

}  // namespace fused_opt::simt

#define threadIdx (::fused_opt::simt::coordinates().thread)
#define blockIdx (::fused_opt::simt::coordinates().block)
#define blockDim (::fused_opt::simt::coordinates().block_dim)
#define gridDim (::fused_opt::simt::coordinates().grid_dim)
#define __syncthreads() ::fused_opt::simt::sync_threads(__FILE__, __LINE__)

// The host's fences and atomics are real (blocks run on OS threads at the same time); x86's
// memory order is stronger than a GPU's, so a missing __threadfence goes unseen here.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

template <typename T>
inline T __ldcg(const T* address) {
  T value;
  __atomic_load(address, &value, __ATOMIC_RELAXED);
  return value;
}

// Rounded products: the emulation is built with -ffp-contract=off, as the CPU kernels are.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::fused_opt::simt::shuffle_down(mask, value, delta, width);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::fused_opt::simt::shuffle_xor(mask, value, static_cast<unsigned>(lane_mask), width);
}

// The launch the kernels' host code makes (through fused_opt::cuda::launch_kernel): more
// specialized than the runtime's `template <class T> cudaLaunchKernel(T*, ...)`, so overload
// resolution picks it, and it knows the parameter types to rebuild the arguments from `args`.
template <typename... Params>
cudaError_t cudaLaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, void** args,
                             size_t /*shared_bytes*/, cudaStream_t /*stream*/) {
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<Params...> arguments;
  };
  const Closure closure{kernel, ::fused_opt::simt::arguments_from<Params...>(
                                   args, std::index_sequence_for<Params...>{})};
  // Each thread copies the arguments into its own parameters, as by-value kernel parameters are.
  const ::fused_opt::simt::KernelBody body = [](const void* erased) {
    const auto& c = *static_cast<const Closure*>(erased);
    std::apply(c.kernel, c.arguments);
  };
  return ::fused_opt::simt::run_grid(grid, block,
                                     ::fused_opt::simt::parameter_bytes<Params...>(), body,
                                     &closure, __PRETTY_FUNCTION__);
}

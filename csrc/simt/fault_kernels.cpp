// Kernels with a known fault each, and one without, to show that the emulation tier reports what
// a GPU would fault on or hang at (tests/test_simt.py), rather than running it quietly.
#include "simt/simt.h"

#include <stdexcept>
#include <string>

#include "cuda/multi_tensor.cuh"
#include "simt/runtime.h"

namespace fused_opt::simt {
namespace {

constexpr unsigned kThreads = 256;

__global__ void count_threads(unsigned* count) { atomicAdd(count, 1u); }

// Warp sums through the same shuffle tree grad_norm's block_sum uses, then one atomic per warp.
__global__ void sum_lanes(unsigned* total) {
  unsigned value = threadIdx.x;
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  if (threadIdx.x % 32 == 0) atomicAdd(total, value);
}

__global__ void divergent_barrier(unsigned*) {
  if (threadIdx.x < kThreads / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void barrier_after_an_exit(unsigned*) {
  if (threadIdx.x == 7) return;
  __syncthreads();
}

__global__ void shuffle_with_an_exited_lane(unsigned* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, threadIdx.x, 1);
}

__global__ void misaligned_vector_load(unsigned* data) {
  using Vector = cuda::Pack<unsigned, 4>;
  const Vector v = *reinterpret_cast<const Vector*>(data + 1);
  data[threadIdx.x + 8] = v.v[0];
}

struct Oversized {
  char bytes[40 * 1024];
};

__global__ void oversized_parameters(const __grid_constant__ Oversized, unsigned*) {}

}  // namespace

std::string run_fault_kernel(const std::string& name, unsigned* buffer) {
  cudaError_t status = cudaErrorInvalidValue;
  const auto launch = [&](auto kernel, auto... args) {
    status = cuda::launch_kernel(kernel, 3, kThreads, nullptr, args...);
  };
  if (name == "count_threads") launch(&count_threads, buffer);
  if (name == "sum_lanes") launch(&sum_lanes, buffer);
  if (name == "divergent_barrier") launch(&divergent_barrier, buffer);
  if (name == "barrier_after_an_exit") launch(&barrier_after_an_exit, buffer);
  if (name == "shuffle_with_an_exited_lane") launch(&shuffle_with_an_exited_lane, buffer);
  if (name == "misaligned_vector_load") launch(&misaligned_vector_load, buffer);
  if (name == "oversized_parameters") {
    static Oversized parameters;
    launch(&oversized_parameters, parameters, buffer);
  }
  if (status == cudaErrorInvalidValue && name != "oversized_parameters") {
    throw std::invalid_argument("simt: no fault kernel named " + name);
  }
  if (status == cudaSuccess) return "";
  cudaGetLastError();
  return cudaGetErrorString(status);
}

}  // namespace fused_opt::simt

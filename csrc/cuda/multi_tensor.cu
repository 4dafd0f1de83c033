// The non-template host side of the generic launcher, and the step-counter kernel.
#include "cuda/multi_tensor.cuh"

#include <stdexcept>
#include <string>

namespace fused_opt::cuda {
namespace {

// As many counters per launch as the kernel parameter space holds beside the scaling.
struct StepList {
  static constexpr int kCapacity = static_cast<int>(
      (kKernelParamBytes - sizeof(math::GradScaling) - sizeof(int) - 8) / sizeof(float*));
  int count;
  float* steps[kCapacity];
};

constexpr int kStepBlockSize = 256;

__global__ void __launch_bounds__(kStepBlockSize)
    increment_steps_kernel(const __grid_constant__ StepList list,
                           const __grid_constant__ math::GradScaling scaling) {
  if (math::skips_step(scaling)) return;
  const int i = blockIdx.x * kStepBlockSize + threadIdx.x;
  if (i < list.count) *list.steps[i] += 1.0f;
}

void throw_on_error(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("fused_opt: ") + what + " failed: " +
                             cudaGetErrorString(status));
  }
}

}  // namespace

void throw_on_launch_error(const char* kernel) {
  throw_on_error(cudaGetLastError(), (std::string("launching ") + kernel).c_str());
}

void increment_steps(const StepCall& call) {
  const auto stream = static_cast<cudaStream_t>(call.stream);
  StepList list;
  list.count = 0;
  const auto flush = [&] {
    if (list.count == 0) return;
    const int blocks = (list.count + kStepBlockSize - 1) / kStepBlockSize;
    increment_steps_kernel<<<blocks, kStepBlockSize, 0, stream>>>(list, call.scaling);
    throw_on_launch_error("fused_opt::cuda::increment_steps_kernel");
    list.count = 0;
  };
  for (size_t i = 0; i < call.count; ++i) {
    if (call.tensors[i].step == nullptr) continue;
    if (list.count == StepList::kCapacity) flush();
    list.steps[list.count++] = call.tensors[i].step;
  }
  flush();
}

int resident_blocks(const void* kernel, int block_size, std::atomic<int>* cache, int cache_size) {
  int device = 0;
  throw_on_error(cudaGetDevice(&device), "cudaGetDevice");
  if (device < cache_size) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  int blocks_per_sm = 0;
  throw_on_error(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                 "querying the SM count");
  throw_on_error(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, block_size, 0),
      "querying the kernel occupancy");
  const int blocks = sms * std::max(blocks_per_sm, 1);
  // Racing first launches on other threads compute the same value.
  if (device < cache_size) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

}  // namespace fused_opt::cuda

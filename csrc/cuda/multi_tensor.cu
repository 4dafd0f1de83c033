// The non-template host side of the generic launcher.
#include "cuda/multi_tensor.cuh"

#include <stdexcept>
#include <string>

namespace fused_opt::cuda {
namespace {

void throw_on_error(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("fused_opt: ") + what + " failed: " +
                             cudaGetErrorString(status));
  }
}

}  // namespace

void throw_on_launch_error(cudaError_t status, const char* kernel) {
  if (status == cudaSuccess) return;
  cudaGetLastError();
  throw_on_error(status, (std::string("launching ") + kernel).c_str());
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

// The emulation tier's controls, for its Python module (csrc/simt/module.cpp) and the tests: the
// emulated device, the schedules, the log of launches, and faults to inject.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fused_opt::simt {

struct Config {
  // cudaGetDevice's answer; device d has d + 1 SMs, one resident block each, so it sets the
  // grid of a persistent launch.
  int device = 3;
  // OS threads that run a launch's blocks at the same time.
  int workers = 2;
  // Seeds the order of blocks and of threads after every barrier, with the launch's number.
  uint64_t seed = 1;
};

struct LaunchRecord {
  std::string kernel;  // the kernel's parameter types
  int blocks;
  int threads;
};

void configure(const Config& config);
Config current_config();
// The launches since the last call, oldest first.
std::vector<LaunchRecord> take_launch_log();
// The occupancy query after `queries` more succeed fails once, as for a kernel without an image
// for the device; a negative count disarms it.
void fail_occupancy_query_after(int queries);
// The error that cudaGetLastError reports next, as one left behind by other code would be.
void set_pending_error(cudaError_t status);
cudaError_t peek_pending_error();

// Launches the self-test kernel `name` (fault_kernels.cpp) on 3 blocks of 256 threads with
// `buffer` (at least 512 elements) and returns the launch's error message, empty on success.
std::string run_fault_kernel(const std::string& name, unsigned* buffer);

}  // namespace fused_opt::simt

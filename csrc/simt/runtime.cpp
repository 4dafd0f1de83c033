// The emulation tier's runtime: executes kernel launches on the CPU and stands in for the few CUDA
// runtime calls the kernels' host code makes.
//
// A launch runs its blocks on `workers` OS threads at once, in a shuffled order; each block runs
// its threads as fibers (ucontext) on one OS thread, resuming the runnable ones in a shuffled
// order after every barrier. Orders come from the configured seed and the launch's sequence
// number, so a failing schedule can be replayed. Barriers that not all threads reach the same
// way, deadlocks, misaligned accesses (reported by -fsanitize=alignment, whose handler is
// defined below) and parameters beyond the kernel parameter space fail the launch with a
// message, as a faulting kernel does on a GPU.
//
// The emulated device d has d + 1 SMs and one resident block per SM, so fused_opt's per-device
// occupancy cache stays right while tests pick the grid size by picking the device.
// First: it defines __shared__ before the toolkit's headers do.
#include "simt/simt.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "simt/runtime.h"

namespace fused_opt::simt {
namespace {

// The kernels pass 32 KB of parameters by value, which every fiber copies onto its stack.
constexpr size_t kFiberStackBytes = 256 * 1024;
constexpr size_t kKernelParameterBytes = 32764;
constexpr int kWarpSize = 32;

std::mutex config_mutex;
Config config;
std::vector<LaunchRecord> launch_log;
std::atomic<uint64_t> launch_sequence{0};
int occupancy_queries_until_failure = -1;
cudaError_t pending_error = cudaSuccess;
// The message of this OS thread's last emulated failure, and its status.
thread_local std::string error_text;
thread_local cudaError_t error_status = cudaSuccess;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kExited };

struct Fiber {
  ucontext_t context;
  Coordinates coordinates;
  State state = State::kRunnable;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  unsigned warp_mask = 0;
};

// Fiber stacks, kept between launches: mapping and faulting in 64 MB per block would cost more
// than the kernels' work. A guard page below each stack turns an overflow into a crash, not a
// silent overwrite of the next fiber's stack.
class StackPool {
 public:
  char* acquire(int threads) {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto& arena : arenas_) {
      if (!arena.in_use && arena.threads >= threads) {
        arena.in_use = true;
        return arena.base;
      }
    }
    const size_t bytes = kFiberStackBytes * threads;
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (base == MAP_FAILED) throw std::runtime_error("fused_opt simt: cannot map fiber stacks");
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (int t = 0; t < threads; ++t) {
      mprotect(static_cast<char*>(base) + kFiberStackBytes * t, page, PROT_NONE);
    }
    arenas_.push_back({static_cast<char*>(base), threads, true});
    return arenas_.back().base;
  }

  void release(char* base) {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto& arena : arenas_) {
      if (arena.base == base) arena.in_use = false;
    }
  }

 private:
  struct Arena {
    char* base;
    int threads;
    bool in_use;
  };
  std::mutex mutex_;
  std::vector<Arena> arenas_;
};

StackPool stack_pool;

// One block being executed on this OS thread.
struct BlockRun {
  KernelBody body;
  const void* closure;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> exchange;  // kWarpSize slots per warp
  ucontext_t scheduler;
  int current = -1;
  std::string error;  // the first failure of the block

  void fail(std::string message) {
    if (error.empty()) error = std::move(message);
  }
};

thread_local BlockRun* current_block = nullptr;

Fiber& current_fiber() { return current_block->fibers[current_block->current]; }

void fiber_entry() {
  BlockRun& block = *current_block;
  block.body(block.closure);
  // uc_link returns to the scheduler when this function returns.
  current_fiber().state = State::kExited;
}

// Suspends the calling fiber until the scheduler resumes it.
void yield_to_scheduler() {
  BlockRun& block = *current_block;
  swapcontext(&current_fiber().context, &block.scheduler);
}

// Releases the waiters of every barrier that all its threads have reached; false if none could
// be released (with threads left, a deadlock) or the block failed.
bool release_barriers(BlockRun& block) {
  const int threads = static_cast<int>(block.fibers.size());
  bool released = false;
  for (int warp = 0; warp * kWarpSize < threads; ++warp) {
    unsigned waiting = 0;
    unsigned mask = 0;
    for (int lane = 0; lane < kWarpSize && warp * kWarpSize + lane < threads; ++lane) {
      const Fiber& fiber = block.fibers[warp * kWarpSize + lane];
      if (fiber.state == State::kAtWarpBarrier) {
        waiting |= 1u << lane;
        if (mask != 0 && fiber.warp_mask != mask) {
          block.fail("lanes of one warp wait in shuffles with different masks");
          return false;
        }
        mask = fiber.warp_mask;
      }
    }
    if (waiting == 0) continue;
    if ((waiting & mask) != mask) {
      for (int lane = 0; lane < kWarpSize; ++lane) {
        if (!((mask >> lane) & 1u) || ((waiting >> lane) & 1u)) continue;
        const int t = warp * kWarpSize + lane;
        if (t >= threads || block.fibers[t].state == State::kExited) {
          block.fail("a shuffle's mask names lane " + std::to_string(lane) + " of warp " +
                     std::to_string(warp) + ", which has exited or does not exist");
          return false;
        }
      }
      continue;  // the missing lanes are still running or wait elsewhere
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if ((mask >> lane) & 1u) block.fibers[warp * kWarpSize + lane].state = State::kRunnable;
    }
    released = true;
  }
  if (released) return true;

  int at_barrier = 0;
  int exited = 0;
  const Fiber* first = nullptr;
  for (const Fiber& fiber : block.fibers) {
    if (fiber.state == State::kAtBlockBarrier) {
      ++at_barrier;
      if (first == nullptr) first = &fiber;
      if (fiber.barrier_line != first->barrier_line ||
          std::strcmp(fiber.barrier_file, first->barrier_file) != 0) {
        block.fail(std::string("divergent __syncthreads: threads wait at ") + first->barrier_file +
                   ":" + std::to_string(first->barrier_line) + " and at " + fiber.barrier_file +
                   ":" + std::to_string(fiber.barrier_line));
        return false;
      }
    } else if (fiber.state == State::kExited) {
      ++exited;
    }
  }
  if (at_barrier == 0) return false;
  if (at_barrier + exited < threads) return false;  // others wait in a shuffle: deadlock
  if (exited > 0) {
    block.fail(std::string("__syncthreads at ") + first->barrier_file + ":" +
               std::to_string(first->barrier_line) + " reached by " + std::to_string(at_barrier) +
               " threads of " + std::to_string(threads) + "; the others had exited");
    return false;
  }
  for (Fiber& fiber : block.fibers) fiber.state = State::kRunnable;
  return true;
}

// Runs one block to completion (or failure) on the calling OS thread.
std::string run_block(KernelBody body, const void* closure, dim3 grid, dim3 block_dim,
                      dim3 block_index, std::mt19937_64& rng, char* stacks) {
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  BlockRun block;
  block.body = body;
  block.closure = closure;
  block.fibers.resize(threads);
  block.exchange.assign(static_cast<size_t>((threads + kWarpSize - 1) / kWarpSize) * kWarpSize,
                        0);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = block.fibers[t];
    const unsigned x = t % block_dim.x;
    const unsigned y = (t / block_dim.x) % block_dim.y;
    const unsigned z = t / (block_dim.x * block_dim.y);
    fiber.coordinates = {dim3(x, y, z), block_index, block_dim, grid};
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = stacks + kFiberStackBytes * t + page;
    fiber.context.uc_stack.ss_size = kFiberStackBytes - page;
    fiber.context.uc_link = &block.scheduler;
    makecontext(&fiber.context, fiber_entry, 0);
  }
  BlockRun* const outer = current_block;
  current_block = &block;
  std::vector<int> order;
  while (block.error.empty()) {
    order.clear();
    for (int t = 0; t < threads; ++t) {
      if (block.fibers[t].state == State::kRunnable) order.push_back(t);
    }
    if (order.empty()) {
      const bool all_exited = std::all_of(block.fibers.begin(), block.fibers.end(),
                                          [](const Fiber& f) { return f.state == State::kExited; });
      if (all_exited) break;
      if (!release_barriers(block)) {
        block.fail("deadlock: no thread of the block can go on");
      }
      continue;
    }
    std::shuffle(order.begin(), order.end(), rng);
    for (const int t : order) {
      block.current = t;
      swapcontext(&block.scheduler, &block.fibers[t].context);
      if (!block.error.empty()) break;
    }
  }
  current_block = outer;
  return block.error;
}

// One seed from several (splitmix64 steps), so nearby seeds give unrelated orders.
uint64_t mix(uint64_t a, uint64_t b, uint64_t c) {
  uint64_t x = a;
  for (const uint64_t next : {b, c}) {
    x += 0x9E3779B97F4A7C15ull + next;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
  }
  return x;
}

std::string short_signature(const char* signature) {
  // "cudaError_t cudaLaunchKernel(...) [with Params = {A, B}; ...]": keep "A, B".
  const char* start = std::strstr(signature, "Params = {");
  if (start == nullptr) return signature;
  start += std::strlen("Params = {");
  int depth = 1;
  const char* end = start;
  for (; *end != '\0'; ++end) {
    depth += *end == '{' ? 1 : *end == '}' ? -1 : 0;
    if (depth == 0) break;
  }
  return std::string(start, end);
}

cudaError_t fail_launch(cudaError_t status, std::string message) {
  error_text = std::move(message);
  error_status = status;
  const std::lock_guard<std::mutex> lock(config_mutex);
  pending_error = status;
  return status;
}

}  // namespace

const Coordinates& coordinates() {
  if (current_block == nullptr) {
    throw std::logic_error("fused_opt simt: a kernel builtin was used outside a launch");
  }
  return current_fiber().coordinates;
}

void sync_threads(const char* file, int line) {
  Fiber& fiber = current_fiber();
  fiber.state = State::kAtBlockBarrier;
  fiber.barrier_file = file;
  fiber.barrier_line = line;
  yield_to_scheduler();
}

void sync_warp(unsigned mask) {
  Fiber& fiber = current_fiber();
  const unsigned lane = fiber.coordinates.thread.x % kWarpSize;
  if (!((mask >> lane) & 1u)) {
    current_block->fail("a lane called a shuffle whose mask leaves it out");
  }
  fiber.state = State::kAtWarpBarrier;
  fiber.warp_mask = mask;
  yield_to_scheduler();
}

uint64_t* warp_slots() {
  const unsigned warp = current_fiber().coordinates.thread.x / kWarpSize;
  return current_block->exchange.data() + warp * kWarpSize;
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t parameter_bytes, KernelBody body,
                     const void* closure, const char* signature) {
  Config launch_config;
  {
    const std::lock_guard<std::mutex> lock(config_mutex);
    launch_config = config;
  }
  const uint64_t sequence = launch_sequence.fetch_add(1);
  const std::string kernel = short_signature(signature);
  if (parameter_bytes > kKernelParameterBytes) {
    return fail_launch(cudaErrorInvalidValue,
                       "the kernel's parameters take " + std::to_string(parameter_bytes) +
                           " bytes, more than the " + std::to_string(kKernelParameterBytes) +
                           " of the parameter space");
  }
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  if (threads <= 0 || threads > 1024 || blocks <= 0) {
    return fail_launch(cudaErrorInvalidConfiguration, "invalid launch configuration");
  }
  {
    const std::lock_guard<std::mutex> lock(config_mutex);
    launch_log.push_back({kernel, static_cast<int>(blocks), threads});
  }

  std::vector<int64_t> block_order(blocks);
  std::iota(block_order.begin(), block_order.end(), 0);
  std::mt19937_64 order_rng(mix(launch_config.seed, sequence, ~0ull));
  std::shuffle(block_order.begin(), block_order.end(), order_rng);

  std::atomic<int64_t> next{0};
  std::mutex failure_mutex;
  std::string failure;
  const auto work = [&] {
    char* stacks = stack_pool.acquire(threads);
    for (int64_t i = next++; i < blocks; i = next++) {
      const int64_t b = block_order[i];
      const dim3 index(static_cast<unsigned>(b % grid.x),
                       static_cast<unsigned>((b / grid.x) % grid.y),
                       static_cast<unsigned>(b / (static_cast<int64_t>(grid.x) * grid.y)));
      // Per block, so a block's thread order does not depend on which worker runs it.
      std::mt19937_64 thread_rng(mix(launch_config.seed, sequence, static_cast<uint64_t>(b)));
      std::string error = run_block(body, closure, grid, block, index, thread_rng, stacks);
      if (!error.empty()) {
        const std::lock_guard<std::mutex> lock(failure_mutex);
        if (failure.empty()) failure = "block " + std::to_string(b) + ": " + error;
      }
    }
    stack_pool.release(stacks);
  };
  const int workers = static_cast<int>(std::clamp<int64_t>(launch_config.workers, 1, blocks));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& thread : pool) thread.join();
  if (!failure.empty()) {
    return fail_launch(cudaErrorLaunchFailure, "kernel (" + kernel + "): " + failure);
  }
  return cudaSuccess;
}

void configure(const Config& new_config) {
  if (new_config.workers < 1) throw std::invalid_argument("simt: workers must be >= 1");
  const std::lock_guard<std::mutex> lock(config_mutex);
  config = new_config;
}

Config current_config() {
  const std::lock_guard<std::mutex> lock(config_mutex);
  return config;
}

std::vector<LaunchRecord> take_launch_log() {
  const std::lock_guard<std::mutex> lock(config_mutex);
  return std::exchange(launch_log, {});
}

void fail_occupancy_query_after(int queries) {
  const std::lock_guard<std::mutex> lock(config_mutex);
  occupancy_queries_until_failure = queries;
}

void set_pending_error(cudaError_t status) {
  const std::lock_guard<std::mutex> lock(config_mutex);
  pending_error = status;
}

cudaError_t peek_pending_error() {
  const std::lock_guard<std::mutex> lock(config_mutex);
  return pending_error;
}

}  // namespace fused_opt::simt

// ------------------------------------------------------------------------------------------------
// The CUDA runtime calls of the kernels' host code.

using fused_opt::simt::config;
using fused_opt::simt::config_mutex;

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  const std::lock_guard<std::mutex> lock(config_mutex);
  *device = config.device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (attribute != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = device + 1;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  const std::lock_guard<std::mutex> lock(config_mutex);
  int& left = fused_opt::simt::occupancy_queries_until_failure;
  if (left == 0) {
    left = -1;
    fused_opt::simt::error_text = "the emulated device has no kernel image for this kernel";
    fused_opt::simt::error_status = cudaErrorNoKernelImageForDevice;
    return cudaErrorNoKernelImageForDevice;
  }
  if (left > 0) --left;
  *blocks = 1;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const std::lock_guard<std::mutex> lock(config_mutex);
  return std::exchange(fused_opt::simt::pending_error, cudaSuccess);
}

// torch's C shim function for the current CUDA stream, renamed by the build (tests/simt.py) so
// that the glue finds this one: the emulation has a single, implicit stream.
int32_t fused_opt_simt_current_stream(int32_t /*device_index*/, void** stream) {
  *stream = nullptr;
  return 0;
}

const char* cudaGetErrorString(cudaError_t status) {
  thread_local std::string text;
  text = "emulated CUDA error " + std::to_string(static_cast<int>(status));
  if (status == fused_opt::simt::error_status) text += ": " + fused_opt::simt::error_text;
  return text.c_str();
}

// -fsanitize=alignment's report of a misaligned access. Inside a kernel it fails the launch (a
// GPU faults on a misaligned vector access, x86 would not); anywhere else it is a bug of the
// host code, reported and fatal.
struct UbsanSourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct UbsanTypeMismatch {
  UbsanSourceLocation location;
  const void* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};

void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* data, uintptr_t address) {
  const std::string message = "misaligned access at " + std::string(data->location.file) + ":" +
                              std::to_string(data->location.line) + ": address " +
                              std::to_string(address) + " is not " +
                              std::to_string(1u << data->log_alignment) + "-byte aligned";
  if (fused_opt::simt::current_block != nullptr) {
    fused_opt::simt::current_block->fail(message);
    return;
  }
  std::fprintf(stderr, "fused_opt simt: %s\n", message.c_str());
  std::abort();
}

void __ubsan_handle_type_mismatch_v1_abort(UbsanTypeMismatch* data, uintptr_t address) {
  __ubsan_handle_type_mismatch_v1(data, address);
}

}  // extern "C"

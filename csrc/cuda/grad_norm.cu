// The global gradient norm and inf/NaN flag (launch.h: grad_norm) in one pass over the grads and,
// for up to a kernel's table of grads, one launch: every block reduces its chunks, the last block
// to finish reduces the blocks' partials. No float atomics, so the sums always add up in the same
// order: per thread in chunk order, then a fixed tree per block, then the blocks' partials by
// the last block the same way (thread i takes partials i, i + block size, ..., then the tree).
#include <cmath>

#include "cuda/launch.h"
#include "cuda/multi_tensor.cuh"
#include "fused_opt/math/grad_scaling.h"

namespace fused_opt::cuda {
namespace {

// As the update kernels: 256 threads, at most 128 registers, two blocks per SM. Each thread
// keeps four 16-byte loads in flight (a read-only pass needs more bytes in flight per thread than
// an update) and widens them to double, which is what takes the registers: held to three blocks
// per SM (80 registers), it spills. An H100's grid is 264 blocks, well below kMaxNormBlocks.
constexpr int kNormBlockSize = 256;
constexpr int kMinNormBlocksPerSm = 2;
constexpr int kNormVectorsInFlight = 4;
constexpr int kNormScalarsInFlight = 4;
constexpr int kWarps = kNormBlockSize / 32;
// Kernel parameter space kept for NormLaunch; the grad table takes the rest.
constexpr size_t kNormParamBytes = 256;

struct GradTable {
  static constexpr size_t kHeaderBytes = sizeof(int64_t) + sizeof(int64_t);
  static constexpr size_t kBytesPerTensor = sizeof(void*) + 2 * sizeof(int64_t) + 2;
  static constexpr int kCapacity =
      static_cast<int>((kKernelParamBytes - kNormParamBytes - kHeaderBytes) / kBytesPerTensor);

  int64_t total_chunks;
  int count;
  const void* data[kCapacity];
  int64_t first_chunk[kCapacity];  // strictly increasing: empty grads are never entered
  int64_t numel[kCapacity];
  DType dtype[kCapacity];
  bool aligned[kCapacity];

  void clear() {
    total_chunks = 0;
    count = 0;
  }

  // Host side; the caller keeps count < kCapacity and numel > 0.
  void add(const GradArgs& grad) {
    const int t = count++;
    data[t] = grad.data;
    first_chunk[t] = total_chunks;
    total_chunks += chunks_of(grad.numel);
    numel[t] = grad.numel;
    dtype[t] = grad.dtype;
    aligned[t] = is_aligned(grad.data, kVectorBytes);
  }
};

// The workspace, float32 elements reinterpreted: squares[kMaxNormBlocks] and
// nonfinite[kMaxNormBlocks] as doubles, then the count of blocks that have added their partials.
struct NormWorkspace {
  double* squares;
  double* nonfinite;
  unsigned* arrivals;
};

struct NormLaunch {
  NormWorkspace workspace;
  float* norm;
  float* found_inf;
  const float* grad_scale;
  bool first;  // of the call's launches: the partials are written, not added to
  bool last;   // of the call's launches: the partials are reduced into the outputs
};

struct Sums {
  double squares;
  double nonfinite;  // NaN once an inf or NaN was added, else zero
};

// In double: squares of 16- and 32-bit values cannot overflow it. x * 0 is NaN exactly for inf
// and NaN, so the flag costs no compare per element (as in the CPU kernel).
__device__ __forceinline__ void add_element(Sums& sums, double v) {
  sums.squares += v * v;
  sums.nonfinite += v * 0.0;
}

// Adds the first n / kWidth * kWidth elements of x, aligned to kWidth elements, to this thread's
// sums: packs threadIdx.x, threadIdx.x + kNormBlockSize, ... in that order.
template <typename S, int kWidth, int kInFlight>
__device__ __forceinline__ void add_packs(const S* x, int n, Sums& sums) {
  using P = Pack<S, kWidth>;
  const P* next = reinterpret_cast<const P*>(x) + threadIdx.x;
  const int packs = n / kWidth;
#pragma unroll 1
  for (int first = threadIdx.x; first < packs; first += kNormBlockSize * kInFlight) {
    P data[kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      if (first + j * kNormBlockSize < packs) data[j] = next[j * kNormBlockSize];
    }
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      if (first + j * kNormBlockSize >= packs) break;
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        add_element(sums, static_cast<double>(to_opmath(data[j].v[e])));
      }
    }
    next += kNormBlockSize * kInFlight;
  }
}

template <typename S>
__device__ __forceinline__ void add_chunk(const S* x, int n, bool aligned, Sums& sums) {
  constexpr int kWidth = kVectorBytes / sizeof(S);
  const int vectorized = aligned ? n / kWidth * kWidth : 0;
  add_packs<S, kWidth, kNormVectorsInFlight>(x, vectorized, sums);
  if (vectorized < n) add_packs<S, 1, kNormScalarsInFlight>(x + vectorized, n - vectorized, sums);
}

// The sums of the whole block, in thread 0; a fixed pattern of shuffles, then the warps in order.
__device__ __forceinline__ Sums block_sum(Sums sums) {
  __shared__ Sums warp_sums[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    sums.squares += __shfl_down_sync(0xffffffffu, sums.squares, offset);
    sums.nonfinite += __shfl_down_sync(0xffffffffu, sums.nonfinite, offset);
  }
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sums;
  __syncthreads();
  Sums total{0.0, 0.0};
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      total.squares += warp_sums[w].squares;
      total.nonfinite += warp_sums[w].nonfinite;
    }
  }
  // warp_sums is free again for a later call once thread 0 has read it.
  __syncthreads();
  return total;
}

// Block b takes chunks b, b + gridDim.x, ... of the table and keeps its partial in slot b; the
// grid has the same size in every launch of a call, so slot b adds up block b's share of all of
// them. The last block of the last launch to arrive sums the slots in index order, writes the
// outputs and rewinds the arrival counter, so the workspace is ready for the next call or graph
// replay.
__global__ void __launch_bounds__(kNormBlockSize, kMinNormBlocksPerSm)
    grad_norm_kernel(const __grid_constant__ GradTable table,
                     const __grid_constant__ NormLaunch launch) {
  Sums sums{0.0, 0.0};
  for (int64_t chunk = blockIdx.x; chunk < table.total_chunks; chunk += gridDim.x) {
    const int t = find_tensor(table.first_chunk, table.count, chunk);
    const int64_t begin = (chunk - table.first_chunk[t]) * kChunkElems;
    const int n = static_cast<int>(
        table.numel[t] - begin < kChunkElems ? table.numel[t] - begin : kChunkElems);
    with_storage(table.dtype[t], [&](auto tag) {
      using S = typename decltype(tag)::type;
      add_chunk(static_cast<const S*>(table.data[t]) + begin, n, table.aligned[t], sums);
    });
  }
  sums = block_sum(sums);

  const NormWorkspace& workspace = launch.workspace;
  __shared__ bool last_block;
  if (threadIdx.x == 0) {
    if (launch.first) {
      workspace.squares[blockIdx.x] = sums.squares;
      workspace.nonfinite[blockIdx.x] = sums.nonfinite;
    } else {
      workspace.squares[blockIdx.x] += sums.squares;
      workspace.nonfinite[blockIdx.x] += sums.nonfinite;
    }
    last_block = false;
    if (launch.last) {
      // The partial reaches every block before the arrival that counts it; the last block's
      // fence orders its reads of the partials after every arrival.
      __threadfence();
      last_block = atomicAdd(workspace.arrivals, 1u) == gridDim.x - 1;
      if (last_block) __threadfence();
    }
  }
  __syncthreads();
  if (!last_block) return;

  Sums total{0.0, 0.0};
  for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += kNormBlockSize) {
    // Through L2: other blocks wrote these during this kernel.
    total.squares += __ldcg(&workspace.squares[b]);
    total.nonfinite += __ldcg(&workspace.nonfinite[b]);
  }
  total = block_sum(total);
  if (threadIdx.x == 0) {
    const float inverse_scale =
        launch.grad_scale != nullptr ? math::inverse_loss_scale(*launch.grad_scale) : 1.0f;
    *launch.norm = static_cast<float>(sqrt(total.squares) * inverse_scale);
    *launch.found_inf = isnan(total.nonfinite) ? 1.0f : 0.0f;
    *workspace.arrivals = 0;
  }
}

}  // namespace

void grad_norm(const GradArgs* grads, size_t count, float* norm, float* found_inf,
               float* workspace, const float* grad_scale, void* stream) {
  static_assert(sizeof(GradTable) + sizeof(NormLaunch) <= kKernelParamBytes,
                "the grad table exceeds the kernel parameter space");
  static_assert(sizeof(NormLaunch) <= kNormParamBytes, "NormLaunch outgrew its reserve");
  static_assert(4 * kMaxNormBlocks + 1 == kGradNormWorkspaceNumel,
                "the workspace holds two doubles per block and the arrival counter");

  constexpr int kCachedDevices = 64;
  static std::atomic<int> cached_blocks[kCachedDevices];
  const int resident = resident_blocks(reinterpret_cast<const void*>(&grad_norm_kernel),
                                       kNormBlockSize, cached_blocks, kCachedDevices);
  int64_t total_chunks = 0;
  for (size_t i = 0; i < count; ++i) total_chunks += chunks_of(grads[i].numel);
  // A function of the device and the grads' sizes only, so that the order of the sums, and with
  // it every bit of the result, is too. At least one block: no grads still write the outputs.
  const auto blocks = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(total_chunks, std::min(resident, kMaxNormBlocks))));

  auto* partials = reinterpret_cast<double*>(workspace);
  NormLaunch launch{{partials, partials + kMaxNormBlocks,
                     reinterpret_cast<unsigned*>(workspace + 4 * kMaxNormBlocks)},
                    norm, found_inf, grad_scale, true, false};
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  GradTable table;
  table.clear();
  const auto run = [&](bool last) {
    launch.last = last;
    throw_on_launch_error(
        launch_kernel(&grad_norm_kernel, blocks, kNormBlockSize, cuda_stream, table, launch),
        "fused_opt::cuda::grad_norm_kernel");
    launch.first = false;
    table.clear();
  };
  for (size_t i = 0; i < count; ++i) {
    if (grads[i].numel == 0) continue;
    if (table.count == GradTable::kCapacity) run(false);
    table.add(grads[i]);
  }
  run(true);
}

}  // namespace fused_opt::cuda

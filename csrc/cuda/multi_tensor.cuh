// Generic CUDA plumbing, torch-free and optimizer-agnostic: walks every element of every tensor of
// one op call with a persistent grid and applies an optimizer's element functor (from
// csrc/include/fused_opt/math) to each.
//
// An optimizer plugs in through an "Op" struct, passed to the kernel by value:
//   static constexpr int kNumStates;    // state tensors per param, as the element functor's
//   static constexpr bool kReadsStep;   // whether with_element reads TensorInfo::step
//   template <typename T, typename Run>
//   __device__ void with_element(const TensorInfo& tensor, const Run& run) const;
// with_element builds the element functor for opmath type T and one tensor (its step, its flags)
// and calls run(functor). Passing the functor to a continuation lets a per-tensor fact (SGD's
// first step) pick a different compiled loop, as on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cuda/launch.h"
#include "fused_opt/math/macros.h"

namespace fused_opt::cuda {

// 256 threads, at most 128 registers each, so that two blocks share an SM: ptxas gets the
// registers that the element math (IEEE division and square root, fp64 included) needs without
// spilling, and each SM still keeps 512 threads' loads in flight.
constexpr int kBlockSize = 256;
constexpr int kMinBlocksPerSm = 2;
// The unit of work a block takes at a time. A multiple of every vector width, so that every chunk
// of an aligned tensor starts aligned; small against the work of a launch, so that the blocks of a
// persistent grid finish close together whatever the mix of tensor sizes (GPT-2 small: ~3800
// chunks over 264 blocks on an H100). Offsets inside a chunk therefore fit in int; offsets of
// chunks inside a tensor are int64.
constexpr int kChunkElems = 1 << 15;
constexpr int kVectorBytes = 16;
// Loads in flight per thread and per tensor: one 16-byte vector (4 to 8 elements) on the aligned
// path, two elements on the scalar path. More of either costs registers beyond the 128 and spills.
constexpr int kVectorsInFlight = 1;
constexpr int kScalarsInFlight = 2;
// Kernel parameter space since CUDA 12.1 (Volta and newer). The table of tensors fills all of it
// but what the Op (hyperparameters, the lr pointer) may take, so that a whole model usually goes
// in one launch.
constexpr size_t kKernelParamBytes = 32764;
constexpr size_t kOpParamBytes = 256;

// What an Op may know about the tensor whose chunk it is about to update.
struct TensorInfo {
  const float* step;  // null unless the Op reads steps
  bool first_step;
};

// ------------------------------------------------------------------------------------------------
// Storage types and their conversions to opmath. Explicit intrinsics: torch's extension builds
// define __CUDA_NO_HALF_CONVERSIONS__ and friends, which remove the implicit ones.

__device__ __forceinline__ float to_opmath(float v) { return v; }
__device__ __forceinline__ double to_opmath(double v) { return v; }
__device__ __forceinline__ float to_opmath(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_opmath(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Storage>
struct FromOpmath;
template <>
struct FromOpmath<float> {
  __device__ __forceinline__ static float convert(float v) { return v; }
};
template <>
struct FromOpmath<double> {
  __device__ __forceinline__ static double convert(double v) { return v; }
};
template <>
struct FromOpmath<__half> {
  __device__ __forceinline__ static __half convert(float v) { return __float2half_rn(v); }
};
template <>
struct FromOpmath<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 convert(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename Storage>
struct StorageTag {
  using type = Storage;
};

// Calls fn(StorageTag<S>{}) for the storage type S of `dtype`; one branch per chunk, never per
// element.
template <typename Fn>
__device__ __forceinline__ void with_storage(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(StorageTag<float>{}); break;
    case DType::kFloat64: fn(StorageTag<double>{}); break;
    case DType::kFloat16: fn(StorageTag<__half>{}); break;
    case DType::kBFloat16: fn(StorageTag<__nv_bfloat16>{}); break;
  }
}

__device__ __forceinline__ double value_or(const DeviceScalar& scalar, double host_value) {
  if (scalar.ptr == nullptr) return host_value;
  double value = host_value;
  with_storage(scalar.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    value = static_cast<double>(to_opmath(*static_cast<const S*>(scalar.ptr)));
  });
  return value;
}

// ------------------------------------------------------------------------------------------------
// The tensor table: everything a launch needs to know about its tensors, passed by value in the
// kernel parameters (no device allocation, no host-to-device copy, nothing to keep alive for a
// captured graph). Struct of arrays, with only the pointer lists the optimizer uses, so that as
// many tensors as possible fit in one launch.

constexpr uint8_t kAligned = 1;    // every pointer of the tensor is 16-byte aligned
constexpr uint8_t kFirstStep = 2;  // TensorArgs::first_step

template <int kListCount, bool kWithSteps>
struct TensorTable {
  static constexpr int kLists = kListCount;  // param, grad, states
  static constexpr size_t kHeaderBytes = sizeof(int64_t) + sizeof(int64_t);  // count, padded
  static constexpr size_t kBytesPerTensor = kLists * sizeof(void*) + 2 * sizeof(int64_t) +
                                            (kWithSteps ? sizeof(float*) : 0) + 2;
  static constexpr int kCapacity = static_cast<int>(
      (kKernelParamBytes - kOpParamBytes - kHeaderBytes) / kBytesPerTensor);

  int64_t total_chunks;
  int count;
  void* lists[kLists][kCapacity];  // the grad (list 1) is never written through
  int64_t first_chunk[kCapacity];  // strictly increasing: empty tensors are never entered
  int64_t numel[kCapacity];
  const float* steps[kWithSteps ? kCapacity : 1];
  DType dtype[kCapacity];
  uint8_t flags[kCapacity];

  void clear() {
    total_chunks = 0;
    count = 0;
  }

  // Host side; the caller keeps count < kCapacity and numel > 0.
  void add(const TensorArgs& tensor) {
    const int t = count++;
    lists[0][t] = tensor.param;
    lists[1][t] = const_cast<void*>(tensor.grad);
    bool aligned = is_aligned(tensor.param) && is_aligned(tensor.grad);
    for (int s = 0; s < kLists - 2; ++s) {
      lists[2 + s][t] = tensor.states[s];
      aligned = aligned && is_aligned(tensor.states[s]);
    }
    first_chunk[t] = total_chunks;
    total_chunks += (tensor.numel + kChunkElems - 1) / kChunkElems;
    numel[t] = tensor.numel;
    if constexpr (kWithSteps) steps[t] = tensor.step;
    dtype[t] = tensor.dtype;
    flags[t] = (aligned ? kAligned : 0) | (tensor.first_step ? kFirstStep : 0);
  }

  // The tensor holding `chunk`: the last t with first_chunk[t] <= chunk.
  __device__ __forceinline__ int find_tensor(int64_t chunk) const {
    int lo = 0;
    int hi = count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (first_chunk[mid] <= chunk) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }

  __device__ __forceinline__ TensorInfo info(int t) const {
    if constexpr (kWithSteps) {
      return {steps[t], (flags[t] & kFirstStep) != 0};
    } else {
      return {nullptr, (flags[t] & kFirstStep) != 0};
    }
  }

 private:
  static bool is_aligned(const void* p) {
    return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0;
  }
};

// ------------------------------------------------------------------------------------------------
// The generic element functor: loads a pack of each tensor, runs the optimizer's element math in
// opmath, stores param and states back (never the grad).

template <typename S, int kWidth>
struct alignas(sizeof(S) * kWidth) Pack {
  S v[kWidth];
};

// Updates the first n / kWidth * kWidth elements behind `lists`, which must be aligned to
// kWidth * sizeof(S) bytes. Thread i takes packs i, i + kBlockSize, ...: each warp reads whole
// contiguous segments, and kInFlight packs per list are loaded before any is used.
template <typename S, int kWidth, int kInFlight, int kLists, typename Element>
__device__ __forceinline__ void update_packs(S* const (&lists)[kLists], int n,
                                             const Element& element) {
  using T = typename Element::opmath;
  constexpr int kStates = Element::kNumStates;
  constexpr int kUsed = 2 + kStates;
  static_assert(kUsed <= kLists, "the table carries fewer lists than the element functor uses");
  using P = Pack<S, kWidth>;

  // One pointer per list, advanced per iteration; the packs in flight sit at constant offsets
  // from it, which the loads and stores encode as immediates.
  P* next[kUsed];
#pragma unroll
  for (int l = 0; l < kUsed; ++l) next[l] = reinterpret_cast<P*>(lists[l]) + threadIdx.x;
  const int packs = n / kWidth;
#pragma unroll 1
  for (int first = threadIdx.x; first < packs; first += kBlockSize * kInFlight) {
    P data[kUsed][kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      if (first + j * kBlockSize < packs) {
#pragma unroll
        for (int l = 0; l < kUsed; ++l) data[l][j] = next[l][j * kBlockSize];
      }
    }
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      if (first + j * kBlockSize >= packs) break;
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        T param = to_opmath(data[0][j].v[e]);
        T states[kStates > 0 ? kStates : 1];
#pragma unroll
        for (int s = 0; s < kStates; ++s) states[s] = to_opmath(data[2 + s][j].v[e]);
        element(param, to_opmath(data[1][j].v[e]), states);
        data[0][j].v[e] = FromOpmath<S>::convert(param);
#pragma unroll
        for (int s = 0; s < kStates; ++s) data[2 + s][j].v[e] = FromOpmath<S>::convert(states[s]);
      }
      next[0][j * kBlockSize] = data[0][j];
#pragma unroll
      for (int s = 0; s < kStates; ++s) next[2 + s][j * kBlockSize] = data[2 + s][j];
    }
#pragma unroll
    for (int l = 0; l < kUsed; ++l) next[l] += kBlockSize * kInFlight;
  }
}

// Updates elements [begin, begin + n) of table tensor t, stored as S.
template <typename S, typename Op, typename Table>
__device__ __forceinline__ void update_chunk(const Table& table, const Op& op, int t,
                                             int64_t begin, int n) {
  constexpr int kLists = Table::kLists;
  constexpr int kWidth = kVectorBytes / sizeof(S);
  S* lists[kLists];
#pragma unroll
  for (int l = 0; l < kLists; ++l) lists[l] = static_cast<S*>(table.lists[l][t]) + begin;
  // Aligned tensors take vectors up to their last whole vector; the scalar loop takes the rest:
  // all of a misaligned tensor, the few trailing elements of an aligned one (only a tensor's last
  // chunk can end inside a vector).
  const int vectorized = (table.flags[t] & kAligned) ? n / kWidth * kWidth : 0;

  op.template with_element<math::opmath_t<S>>(table.info(t), [&](const auto& element) {
    update_packs<S, kWidth, kVectorsInFlight>(lists, vectorized, element);
    if (vectorized < n) {
      S* rest[kLists];
#pragma unroll
      for (int l = 0; l < kLists; ++l) rest[l] = lists[l] + vectorized;
      update_packs<S, 1, kScalarsInFlight>(rest, n - vectorized, element);
    }
  });
}

// A persistent grid: each block strides over the chunks of all tensors of the table, so a launch
// is sized to the GPU, not to the work. __grid_constant__ keeps the table in parameter space
// while it is indexed at run time (no copy to local memory).
template <typename Op, typename Table>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    multi_tensor_kernel(const __grid_constant__ Table table, const __grid_constant__ Op op) {
  for (int64_t chunk = blockIdx.x; chunk < table.total_chunks; chunk += gridDim.x) {
    const int t = table.find_tensor(chunk);
    const int64_t begin = (chunk - table.first_chunk[t]) * kChunkElems;
    const int n = static_cast<int>(
        table.numel[t] - begin < kChunkElems ? table.numel[t] - begin : kChunkElems);
    with_storage(table.dtype[t], [&](auto tag) {
      update_chunk<typename decltype(tag)::type>(table, op, t, begin, n);
    });
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: filling tables and launching.

void throw_on_launch_error(const char* kernel);

// Adds one to the step counter of every tensor that has one, zero-element tensors included, in
// launches ordered on `stream` before the multi-tensor kernels that read the counters.
void increment_steps(const TensorArgs* tensors, size_t count, cudaStream_t stream);

// Blocks of `kernel` the current device keeps resident at once (SM count times blocks per SM of
// kBlockSize threads), queried on the first launch on each device and kept in cache[device].
int resident_blocks(const void* kernel, std::atomic<int>* cache, int cache_size);

// Runs op over every element of every tensor, in as few launches as the table capacity allows
// (one for typical models: hundreds of tensors per launch).
template <typename Op>
void launch_multi_tensor(const TensorArgs* tensors, size_t count, const Op& op,
                         cudaStream_t stream) {
  using Table = TensorTable<2 + Op::kNumStates, Op::kReadsStep>;
  static_assert(sizeof(Op) <= kOpParamBytes, "the Op outgrew its share of the kernel parameters");
  static_assert(sizeof(Table) + sizeof(Op) <= kKernelParamBytes,
                "the tensor table exceeds the kernel parameter space");

  constexpr int kCachedDevices = 64;
  static std::atomic<int> cached_blocks[kCachedDevices];
  const int max_blocks =
      resident_blocks(reinterpret_cast<const void*>(&multi_tensor_kernel<Op, Table>),
                      cached_blocks, kCachedDevices);

  Table table;
  table.clear();
  const auto flush = [&] {
    if (table.count == 0) return;
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(table.total_chunks, max_blocks));
    multi_tensor_kernel<Op, Table><<<blocks, kBlockSize, 0, stream>>>(table, op);
    throw_on_launch_error("fused_opt::cuda::multi_tensor_kernel");
    table.clear();
  };
  for (size_t i = 0; i < count; ++i) {
    if (tensors[i].numel == 0) continue;
    if (table.count == Table::kCapacity) flush();
    table.add(tensors[i]);
  }
  flush();
}

}  // namespace fused_opt::cuda

// Generic CUDA plumbing, torch-free and optimizer-agnostic: walks every element of every tensor of
// one op call with a persistent grid and applies an optimizer's element functor (from
// csrc/include/fused_opt/math) to each.
//
// An optimizer plugs in through an "Op" type, whose template arguments are its compiled modes:
//   using Group = ...;                   // one param group's hyperparameters (launch.h)
//   static constexpr int kNumStates;     // state tensors per param, as the element functor's
//   static constexpr bool kCountsSteps;  // whether its tensors have step counters
//   template <typename T, typename Run>
//   static __device__ void with_element(const Group& group, const TensorInfo& tensor,
//                                       const Run& run);
// with_element builds the element functor for opmath type T, one group and one tensor (its step)
// and calls run(functor). Passing the functor to a continuation lets a per-tensor fact (SGD's
// first step, read from the tensor's counter) pick a different compiled loop, as on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/launch.h"
#include "fused_opt/math/grad_scaling.h"
#include "fused_opt/math/macros.h"
#include "fused_opt/math/quantize.h"
#include "fused_opt/math/rounding.h"

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
// With master weights a vector holds this many elements of every tensor: 16 bytes of the float32
// master and states, 8 of the 16-bit grad and param, so that one aligned load or store covers the
// same elements of each.
constexpr int kMasterVectorElems = 4;
// Loads in flight per thread and per tensor: one vector (2 to 8 elements) on the aligned path;
// on the scalar path two elements for float32 with up to two states, else one. More costs
// registers beyond the 128 and spills: the group's hyperparameters sit at an offset known only
// at run time, so the element math keeps them in registers instead of reading them as constant
// operands, and two elements of each of five tensors no longer fit beside them (float64; and
// Adam's AMSGrad in float32 on sm_100 and sm_120 since its lerp became two-sided).
constexpr int kVectorsInFlight = 1;
template <typename M, int kStates>
constexpr int kScalarsInFlight = sizeof(M) == 8 || kStates > 2 ? 1 : 2;
// Kernel parameter space since CUDA 12.1 (Volta and newer). The table of tensors fills all of it
// but what the groups' hyperparameters, the gradient scaling and the block counter take, so that
// a whole model usually goes in one launch.
constexpr size_t kKernelParamBytes = 32764;
constexpr size_t kGroupParamBytes = 1600;
// Param groups whose hyperparameters one launch carries: a model's usual two (with and without
// weight decay) and per-layer learning rates of small models; more groups take more launches.
constexpr int kMaxLaunchGroups = 16;

// Elements per vector for storage of `storage_bytes` bytes per element.
__host__ __device__ constexpr int vector_elems(int storage_bytes, bool master_weights) {
  return master_weights ? kMasterVectorElems : kVectorBytes / storage_bytes;
}

// What an Op may know about the tensor whose chunk it is about to update.
struct TensorInfo {
  // The step this update counts: the tensor's counter plus one, which the launch's last block
  // stores once every block has read the counter. Zero for Ops without counters.
  float step;
};

// The hyperparameters of the groups of one launch, indexed by TensorTable::group.
template <typename Group>
struct LaunchGroups {
  Group at[kMaxLaunchGroups];
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

// The gradient as the update math sees it. An explicitly rounded product, as the CPU kernels
// compute it: left to itself, nvcc would fuse it into the math's first multiply-add.
__device__ __forceinline__ float scale_grad(float grad, float factor) {
  return __fmul_rn(grad, factor);
}
__device__ __forceinline__ double scale_grad(double grad, double factor) {
  return __dmul_rn(grad, factor);
}

// How the element loop stores an updated param: rounded to nearest (every param but ...)
struct RoundToNearest {
  // Whether the loop's copy is the param's Kahan compensation (see CompensateRounding).
  static constexpr bool kCompensates = false;

  template <typename M, typename T>
  __device__ __forceinline__ M store(T value, int) const {
    return FromOpmath<M>::convert(value);
  }
};

// ... or, for bfloat16 params that round stochastically, with the random bits of the loop's
// element i (math/rounding.h): the tensor's element whose index has the low 32 bits
// first_low + i, in the block of block_key (a chunk never crosses blocks). The same bits as on
// the CPU.
struct RoundStochastically {
  static constexpr bool kCompensates = false;
  uint32_t block_key;
  uint32_t first_low;

  template <typename M, typename T>
  __device__ __forceinline__ M store(T value, int i) const {
    static_assert(std::is_same_v<M, __nv_bfloat16> && std::is_same_v<T, float>,
                  "stochastic rounding stores float32 values into bfloat16 params");
    __nv_bfloat16_raw raw;
    raw.x = math::bfloat16_bits_stochastic(
        value, math::rounding_bits(block_key, first_low + static_cast<uint32_t>(i)));
    return __nv_bfloat16(raw);
  }
};

// ... or, for a bfloat16 param with a compensation (ParamStore::kCompensated), to nearest, the
// loop's copy being the compensation, which the update reads and rewrites (math/rounding.h).
struct CompensateRounding : RoundToNearest {
  static constexpr bool kCompensates = true;
};

// Which launches a tensor goes in: each family has kernels of its own (see multi_tensor_kernel).
enum class TensorFamily { kPlain, kCompensated, kQuantized };

inline TensorFamily family_of(const TensorArgs& tensor) {
  if (tensor.param_store == ParamStore::kCompensated) return TensorFamily::kCompensated;
  if (tensor.state_store == StateStore::kBlockwise8) return TensorFamily::kQuantized;
  return TensorFamily::kPlain;
}

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

// As with_storage, for the params of a master-weight call: float16 and bfloat16 (with float32
// masters) and float32 (their own masters) only, so its kernels carry no float64 loops.
template <typename Fn>
__device__ __forceinline__ void with_master_call_storage(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kBFloat16: fn(StorageTag<__nv_bfloat16>{}); break;
    case DType::kFloat16: fn(StorageTag<__half>{}); break;
    default: fn(StorageTag<float>{}); break;
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

// The tensor holding `chunk`, given the first chunk of each of `count` tensors (non-decreasing,
// tensors without chunks sharing their start with the next one): the last t with
// first_chunk[t] <= chunk, which is the one tensor whose chunks include `chunk`.
__device__ __forceinline__ int find_tensor(const int64_t* first_chunk, int count, int64_t chunk) {
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

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int storage_bytes(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat32: break;
  }
  return 4;
}

// ------------------------------------------------------------------------------------------------
// The tensor table: everything a launch needs to know about its tensors, passed by value in the
// kernel parameters (no device allocation, no host-to-device copy, nothing to keep alive for a
// captured graph). Struct of arrays, with only the pointer lists the optimizer uses, so that as
// many tensors as possible fit in one launch.

template <int kStateCount, bool kStepCounters, bool kMasterWeights>
struct TensorTable {
  static constexpr int kStates = kStateCount;
  static constexpr bool kWithSteps = kStepCounters;
  static constexpr bool kMaster = kMasterWeights;
  // param (the master with master weights), grad, states, then the 16-bit param with master
  // weights.
  static constexpr int kLists = 2 + kStates + (kMaster ? 1 : 0);
  static constexpr int kCopyList = 2 + kStates;
  // total_chunks, count (padded), and the one-entry steps array of a table without counters.
  static constexpr size_t kHeaderBytes =
      sizeof(int64_t) + sizeof(int64_t) + (kWithSteps ? 0 : sizeof(float*));
  static constexpr size_t kBytesPerTensor = kLists * sizeof(void*) + 2 * sizeof(int64_t) +
                                            (kWithSteps ? sizeof(float*) : 0) +
                                            sizeof(uint32_t) + 5;
  // Less the padding that rounds the struct up to its 8-byte alignment.
  static constexpr int kCapacity = static_cast<int>(
      (kKernelParamBytes - kGroupParamBytes - kHeaderBytes - alignof(int64_t)) / kBytesPerTensor);

  int64_t total_chunks;
  int count;
  void* lists[kLists][kCapacity];  // the grad (list 1) is never written through
  // Non-decreasing; an empty tensor (entered only for its step counter) shares its first chunk
  // with the next tensor, or is past the last chunk, so find_tensor never lands on it.
  int64_t first_chunk[kCapacity];
  int64_t numel[kCapacity];
  float* steps[kWithSteps ? kCapacity : 1];
  DType dtype[kCapacity];
  uint8_t group[kCapacity];  // index into the launch's LaunchGroups
  bool aligned[kCapacity];   // every pointer of the tensor is aligned to its vector
  StateStore state_store[kCapacity];  // see TensorArgs
  ParamStore param_store[kCapacity];  // see TensorArgs
  uint32_t rounding_key[kCapacity];

  void clear() {
    total_chunks = 0;
    count = 0;
  }

  // Host side; the caller keeps count < kCapacity, and numel > 0 unless the tensor has a step
  // counter.
  void add(const TensorArgs& tensor, int launch_group) {
    const int t = count++;
    const int elems = vector_elems(storage_bytes(tensor.dtype), kMaster);
    const int storage_vector = elems * storage_bytes(tensor.dtype);
    // A compensated param is updated in its own storage, a master in float32.
    const bool compensated = tensor.param_store == ParamStore::kCompensated;
    const int update_vector =
        kMaster && !compensated ? elems * static_cast<int>(sizeof(float)) : storage_vector;
    const int state_vector =
        tensor.state_store == StateStore::kBFloat16 ? elems * 2 : update_vector;
    // Quantized states take their own loop, which needs no alignment.
    const bool vector_states = tensor.state_store != StateStore::kBlockwise8;
    lists[0][t] = tensor.param;
    lists[1][t] = const_cast<void*>(tensor.grad);
    bool all_aligned =
        is_aligned(tensor.param, update_vector) && is_aligned(tensor.grad, storage_vector);
    for (int s = 0; s < kStates; ++s) {
      lists[2 + s][t] = tensor.states[s];
      all_aligned =
          all_aligned && (!vector_states || is_aligned(tensor.states[s], state_vector));
    }
    if constexpr (kMaster) {
      lists[kCopyList][t] = tensor.param_copy;
      all_aligned = all_aligned && is_aligned(tensor.param_copy, storage_vector);
    }
    first_chunk[t] = total_chunks;
    total_chunks += chunks_of(tensor.numel);
    numel[t] = tensor.numel;
    if constexpr (kWithSteps) steps[t] = tensor.step;
    dtype[t] = tensor.dtype;
    group[t] = static_cast<uint8_t>(launch_group);
    aligned[t] = all_aligned;
    state_store[t] = tensor.state_store;
    param_store[t] = tensor.param_store;
    rounding_key[t] = tensor.rounding_key;
  }

  __device__ __forceinline__ TensorInfo info(int t) const {
    if constexpr (kWithSteps) {
      return {*steps[t] + 1.0f};
    } else {
      return {0.0f};
    }
  }
};

// ------------------------------------------------------------------------------------------------
// The generic element loop: loads a pack of each tensor, runs the optimizer's element math in
// opmath on the scaled gradient, stores param and states back (never the grad) and, with master
// weights, the rounded param.

template <typename S, int kWidth>
struct alignas(sizeof(S) * kWidth) Pack {
  S v[kWidth];
};

// Updates the first n / kWidth * kWidth elements behind the pointers, each aligned to kWidth of
// its elements. M is the storage of param (the float32 master with master weights), SM that of
// the states (M, or bfloat16 beside float32), S that of the grad and of `copy`, which with kCopy
// receives the param rounded to S, or with CompensateRounding is the param's compensation;
// `rounding` stores param (RoundToNearest, RoundStochastically, whose element 0 is param[0], or
// CompensateRounding).
// Thread i takes packs i, i + kBlockSize, ...: each warp reads whole contiguous segments, and
// kInFlight packs per tensor are loaded before any is used.
template <typename M, typename SM, typename S, int kWidth, int kInFlight, bool kCopy,
          typename Element, typename Rounding>
__device__ __forceinline__ void update_packs(M* param, const S* grad,
                                             SM* const (&states)[kMaxStates], S* copy, int n,
                                             typename Element::opmath grad_factor,
                                             const Element& element, const Rounding& rounding) {
  using T = typename Element::opmath;
  constexpr int kStates = Element::kNumStates;
  constexpr int kStateSlots = kStates > 0 ? kStates : 1;
  using UpdatePack = Pack<M, kWidth>;
  using StatePack = Pack<SM, kWidth>;
  using StoragePack = Pack<S, kWidth>;

  // One pointer per tensor, advanced per iteration; the packs in flight sit at constant offsets
  // from it, which the loads and stores encode as immediates.
  UpdatePack* next_param = reinterpret_cast<UpdatePack*>(param) + threadIdx.x;
  const StoragePack* next_grad = reinterpret_cast<const StoragePack*>(grad) + threadIdx.x;
  StatePack* next_state[kStateSlots];
#pragma unroll
  for (int s = 0; s < kStates; ++s) {
    next_state[s] = reinterpret_cast<StatePack*>(states[s]) + threadIdx.x;
  }
  StoragePack* next_copy = nullptr;
  if constexpr (kCopy) next_copy = reinterpret_cast<StoragePack*>(copy) + threadIdx.x;
  const int packs = n / kWidth;
#pragma unroll 1
  for (int first = threadIdx.x; first < packs; first += kBlockSize * kInFlight) {
    UpdatePack p[kInFlight];
    StoragePack g[kInFlight];
    StoragePack compensation[Rounding::kCompensates ? kInFlight : 1];
    StatePack st[kStateSlots][kInFlight];
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      if (first + j * kBlockSize < packs) {
        p[j] = next_param[j * kBlockSize];
        g[j] = next_grad[j * kBlockSize];
        if constexpr (Rounding::kCompensates) compensation[j] = next_copy[j * kBlockSize];
#pragma unroll
        for (int s = 0; s < kStates; ++s) st[s][j] = next_state[s][j * kBlockSize];
      }
    }
#pragma unroll
    for (int j = 0; j < kInFlight; ++j) {
      if (first + j * kBlockSize >= packs) break;
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        T value = to_opmath(p[j].v[e]);
        if constexpr (Rounding::kCompensates) {
          value = math::compensated_value(value, to_opmath(compensation[j].v[e]));
        }
        T state_values[kStateSlots];
#pragma unroll
        for (int s = 0; s < kStates; ++s) state_values[s] = to_opmath(st[s][j].v[e]);
        element(value, scale_grad(to_opmath(g[j].v[e]), grad_factor), state_values);
        p[j].v[e] = rounding.template store<M>(value, (first + j * kBlockSize) * kWidth + e);
        if constexpr (Rounding::kCompensates) {
          compensation[j].v[e] = FromOpmath<S>::convert(
              math::compensation_after(value, to_opmath(p[j].v[e])));
        }
#pragma unroll
        for (int s = 0; s < kStates; ++s) st[s][j].v[e] = FromOpmath<SM>::convert(state_values[s]);
      }
      next_param[j * kBlockSize] = p[j];
#pragma unroll
      for (int s = 0; s < kStates; ++s) next_state[s][j * kBlockSize] = st[s][j];
      if constexpr (Rounding::kCompensates) {
        next_copy[j * kBlockSize] = compensation[j];
      } else if constexpr (kCopy) {
        // The master is float32, so p holds the updated values exactly.
        StoragePack rounded;
#pragma unroll
        for (int e = 0; e < kWidth; ++e) rounded.v[e] = FromOpmath<S>::convert(p[j].v[e]);
        next_copy[j * kBlockSize] = rounded;
      }
    }
    next_param += kBlockSize * kInFlight;
    next_grad += kBlockSize * kInFlight;
#pragma unroll
    for (int s = 0; s < kStates; ++s) next_state[s] += kBlockSize * kInFlight;
    if constexpr (kCopy) next_copy += kBlockSize * kInFlight;
  }
}

// Updates elements [begin, begin + n) of table tensor t, whose grad is stored as S, whose param
// as M (S itself, or float32 with master weights) and whose states as SM (M, or bfloat16 beside
// float32). kStore: how the param is stored; kStochastic and kCompensated params are bfloat16.
template <typename M, typename SM, typename S, typename Op,
          ParamStore kStore = ParamStore::kNearest, typename Table>
__device__ __forceinline__ void update_chunk(const Table& table, const typename Op::Group& group,
                                             int t, int64_t begin, int n, float grad_factor) {
  // A float16/bfloat16 param receives the rounding of its master, a compensated param's copy is
  // its compensation; a float32 param in a master-weight call is its own master.
  constexpr bool kCopy = !std::is_same_v<M, S> || kStore == ParamStore::kCompensated;
  constexpr int kWidth = vector_elems(sizeof(S), kCopy);
  M* param = static_cast<M*>(table.lists[0][t]) + begin;
  const S* grad = static_cast<const S*>(table.lists[1][t]) + begin;
  SM* states[kMaxStates] = {};
#pragma unroll
  for (int s = 0; s < Table::kStates; ++s) {
    states[s] = static_cast<SM*>(table.lists[2 + s][t]) + begin;
  }
  S* copy = nullptr;
  if constexpr (kCopy) copy = static_cast<S*>(table.lists[Table::kCopyList][t]) + begin;
  // Aligned tensors take vectors up to their last whole vector; the scalar loop takes the rest:
  // all of a misaligned tensor, the few trailing elements of an aligned one (only a tensor's last
  // chunk can end inside a vector).
  const int vectorized = table.aligned[t] ? n / kWidth * kWidth : 0;

  using T = math::opmath_t<M>;
  const TensorInfo info = table.info(t);
  // The rounding of the elements from `first` (of this chunk) on. Chunks start at multiples of
  // kChunkElems, which divides 2^32, so no chunk crosses a block of the random bits.
  static_assert(math::kRoundingBlock % kChunkElems == 0, "a chunk must lie in one block");
  const auto rounding_from = [&](int first) {
    if constexpr (kStore == ParamStore::kStochastic) {
      const uint32_t step_key = math::rounding_step_key(table.rounding_key[t], info.step);
      return RoundStochastically{math::rounding_block_key(step_key, begin),
                                 static_cast<uint32_t>(begin + first)};
    } else if constexpr (kStore == ParamStore::kCompensated) {
      return CompensateRounding{};
    } else {
      return RoundToNearest{};
    }
  };
  Op::template with_element<T>(group, info, [&](const auto& element) {
    static_assert(std::decay_t<decltype(element)>::kNumStates == Table::kStates,
                  "the table carries other state lists than the element functor uses");
    const T factor = static_cast<T>(grad_factor);
    update_packs<M, SM, S, kWidth, kVectorsInFlight, kCopy>(
        param, grad, states, copy, vectorized, factor, element, rounding_from(0));
    if (vectorized < n) {
      SM* rest_states[kMaxStates] = {};
#pragma unroll
      for (int s = 0; s < Table::kStates; ++s) rest_states[s] = states[s] + vectorized;
      update_packs<M, SM, S, 1, kScalarsInFlight<M, Table::kStates>, kCopy>(
          param + vectorized, grad + vectorized, rest_states,
          kCopy ? copy + vectorized : nullptr, n - vectorized, factor, element,
          rounding_from(vectorized));
    }
  });
}

// Updates elements [begin, begin + n) of table tensor t, whose states are blockwise 8-bit
// (StateStore::kBlockwise8, math/quantize.h) beside a float32 param or master, and whose grad
// (and, with a master, param) is stored as S. Chunks start at multiples of kChunkElems, so a
// quantization block never spans two chunks. Warp w takes the chunk's blocks w, w + 8, ...; lane l
// a block's elements l, l + 32, ..., so that each access of the warp covers 32 consecutive
// elements. A lane's updated states wait in shared memory (`staged`, the kernel's, which only
// that lane reads) while the warp reduces the block's new maximum (over the magnitudes' bits, as
// on the CPU), which every code needs; each lane then encodes its own elements. Every lane reads
// the old maximum before the reduction, which no lane leaves before all have entered it, and
// lane 0 stores the new one after.
constexpr int kWarpSize = 32;
constexpr int kWarps = kBlockSize / kWarpSize;
constexpr int kQuantBlock = static_cast<int>(math::kQuantBlock);

template <typename S, typename Op, typename Table>
__device__ __forceinline__ void update_quantized_chunk(
    const Table& table, const typename Op::Group& group, int t, int64_t begin, int n,
    float grad_factor, float (&staged)[kWarps][Table::kStates][kQuantBlock]) {
  constexpr int kStates = Table::kStates;
  constexpr int kBlock = kQuantBlock;
  constexpr bool kCopy = !std::is_same_v<S, float>;
  static_assert(kChunkElems % math::kQuantBlock == 0, "a chunk must hold whole blocks");
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  float* param = static_cast<float*>(table.lists[0][t]) + begin;
  const S* grad = static_cast<const S*>(table.lists[1][t]) + begin;
  uint8_t* codes[kStates];
  float* maxima[kStates];
#pragma unroll
  for (int s = 0; s < kStates; ++s) {
    uint8_t* state = static_cast<uint8_t*>(table.lists[2 + s][t]);
    codes[s] = state + begin;
    maxima[s] = reinterpret_cast<float*>(state + math::quantized_scales_offset(table.numel[t])) +
                begin / math::kQuantBlock;
  }
  S* copy = nullptr;
  if constexpr (kCopy) copy = static_cast<S*>(table.lists[Table::kCopyList][t]) + begin;
  const int blocks = (n + kBlock - 1) / kBlock;
  Op::template with_element<float>(group, table.info(t), [&](const auto& element) {
    using Element = std::decay_t<decltype(element)>;
    static_assert(Element::kNumStates == kStates,
                  "the table carries other state lists than the element functor uses");
#pragma unroll 1
    for (int block = warp; block < blocks; block += kWarps) {
      const int first = block * kBlock;
      float scale[kStates];
      uint32_t max_bits[kStates];
#pragma unroll
      for (int s = 0; s < kStates; ++s) {
        scale[s] = math::signed_state<Element>(s)
                       ? math::StateCode<true>::scale(maxima[s][block])
                       : math::StateCode<false>::scale(maxima[s][block]);
        max_bits[s] = 0;
      }
#pragma unroll 1
      for (int j = lane; j < kBlock && first + j < n; j += kWarpSize) {
        const int i = first + j;
        float values[kStates];
#pragma unroll
        for (int s = 0; s < kStates; ++s) {
          values[s] = math::signed_state<Element>(s)
                          ? math::StateCode<true>::decode(codes[s][i], scale[s])
                          : math::StateCode<false>::decode(codes[s][i], scale[s]);
        }
        float value = param[i];
        element(value, scale_grad(to_opmath(grad[i]), grad_factor), values);
        param[i] = value;
        if constexpr (kCopy) copy[i] = FromOpmath<S>::convert(value);
#pragma unroll
        for (int s = 0; s < kStates; ++s) {
          staged[warp][s][j] = values[s];
          const uint32_t bits = math::float_bits(values[s]) & 0x7fffffffu;
          max_bits[s] = bits > max_bits[s] ? bits : max_bits[s];
        }
      }
#pragma unroll
      for (int s = 0; s < kStates; ++s) {
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
          const uint32_t other = __shfl_xor_sync(0xffffffffu, max_bits[s], offset);
          max_bits[s] = other > max_bits[s] ? other : max_bits[s];
        }
        const float absmax = math::float_from_bits(max_bits[s]);
        const bool is_signed = math::signed_state<Element>(s);
        const float inverse = is_signed ? math::StateCode<true>::inverse_scale(absmax)
                                        : math::StateCode<false>::inverse_scale(absmax);
        for (int j = lane; j < kBlock && first + j < n; j += kWarpSize) {
          codes[s][first + j] = is_signed
                                    ? math::StateCode<true>::encode(staged[warp][s][j], inverse)
                                    : math::StateCode<false>::encode(staged[warp][s][j], inverse);
        }
        if (lane == 0) maxima[s][block] = absmax;
      }
    }
  });
}

// Called by every block once it has updated its chunks: the last block to finish stores every
// tensor's counter plus one, after all blocks have read the counters, and resets the counter of
// finished blocks for the next launch. The fence publishes each block's reads and writes before
// its ticket; the ticket orders them before the last block's stores.
template <typename Table>
__device__ __forceinline__ void advance_steps_after_last_block(const Table& table,
                                                               unsigned* finished_blocks) {
  __shared__ bool last_block;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last_block = atomicAdd(finished_blocks, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for (int t = threadIdx.x; t < table.count; t += kBlockSize) *table.steps[t] += 1.0f;
  if (threadIdx.x == 0) *finished_blocks = 0;
}

// A persistent grid: each block strides over the chunks of all tensors of the table, so a launch
// is sized to the GPU, not to the work. __grid_constant__ keeps the table in parameter space
// while it is indexed at run time (no copy to local memory). Every block reads found_inf and the
// scale itself: a skipped step is decided on the device, with no host sync, and then changes
// nothing, the counters and finished_blocks included. kFamily: which tensors the table holds
// (TensorFamily); compensated params and quantized states get kernels of their own, since a
// branch for compensated params made the master-weight kernels spill registers on sm_100 and
// sm_120, and the quantized loop's shared memory would cost every launch.
template <typename Op, typename Table, TensorFamily kFamily>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    multi_tensor_kernel(const __grid_constant__ Table table,
                        const __grid_constant__ LaunchGroups<typename Op::Group> groups,
                        const __grid_constant__ math::GradScaling scaling,
                        unsigned* finished_blocks) {
  if (math::skips_step(scaling)) return;
  const float grad_factor = math::grad_factor(scaling);
  for (int64_t chunk = blockIdx.x; chunk < table.total_chunks; chunk += gridDim.x) {
    const int t = find_tensor(table.first_chunk, table.count, chunk);
    const int64_t begin = (chunk - table.first_chunk[t]) * kChunkElems;
    const int n = static_cast<int>(
        table.numel[t] - begin < kChunkElems ? table.numel[t] - begin : kChunkElems);
    const typename Op::Group group = groups.at[table.group[t]];
    // States stored as bfloat16 or 8-bit exist only beside float32 (a float32 param, or a
    // master).
    if constexpr (kFamily == TensorFamily::kQuantized) {
      // One array for every storage type's loop: static shared memory adds up per kernel.
      __shared__ float staged[kWarps][Table::kStates][kQuantBlock];
      if constexpr (Table::kMaster) {
        with_master_call_storage(table.dtype[t], [&](auto tag) {
          using S = typename decltype(tag)::type;
          update_quantized_chunk<S, Op>(table, group, t, begin, n, grad_factor, staged);
        });
      } else {
        update_quantized_chunk<float, Op>(table, group, t, begin, n, grad_factor, staged);
      }
    } else if constexpr (kFamily == TensorFamily::kCompensated) {
      using S = __nv_bfloat16;
      update_chunk<S, S, S, Op, ParamStore::kCompensated>(table, group, t, begin, n,
                                                           grad_factor);
    } else if constexpr (Table::kMaster) {
      with_master_call_storage(table.dtype[t], [&](auto tag) {
        using S = typename decltype(tag)::type;
        if (table.state_store[t] == StateStore::kBFloat16) {
          update_chunk<float, __nv_bfloat16, S, Op>(table, group, t, begin, n, grad_factor);
        } else {
          update_chunk<float, float, S, Op>(table, group, t, begin, n, grad_factor);
        }
      });
    } else {
      with_storage(table.dtype[t], [&](auto tag) {
        using S = typename decltype(tag)::type;
        if constexpr (std::is_same_v<S, float>) {
          if (table.state_store[t] == StateStore::kBFloat16) {
            update_chunk<float, __nv_bfloat16, float, Op>(table, group, t, begin, n,
                                                          grad_factor);
            return;
          }
        }
        if constexpr (std::is_same_v<S, __nv_bfloat16> && Table::kWithSteps) {
          if (table.param_store[t] == ParamStore::kStochastic) {
            update_chunk<S, S, S, Op, ParamStore::kStochastic>(table, group, t, begin, n,
                                                               grad_factor);
            return;
          }
        }
        update_chunk<S, S, S, Op>(table, group, t, begin, n, grad_factor);
      });
    }
  }
  if constexpr (Table::kWithSteps) advance_steps_after_last_block(table, finished_blocks);
}

// ------------------------------------------------------------------------------------------------
// Host side: filling tables and launching.

// Launches kernel<<<blocks, threads, 0, stream>>>(args...) and returns the status of this launch
// alone: cudaGetLastError after a launch would also report, and blame on fused_opt, an error
// that earlier CUDA calls of other code left behind. The emulation tier (csrc/simt/simt.h)
// executes kernels by overloading cudaLaunchKernel.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), unsigned blocks, unsigned threads,
                          cudaStream_t stream, Args&&... args) {
  std::tuple<Params...> values(std::forward<Args>(args)...);
  return std::apply(
      [&](auto&... value) {
        void* pointers[] = {static_cast<void*>(&value)...};
        return cudaLaunchKernel(kernel, dim3(blocks), dim3(threads), pointers, 0, stream);
      },
      values);
}

// Throws for a failed launch, after clearing the runtime's record of it, which belongs to this
// launch and must not surface at the next error check of other code.
void throw_on_launch_error(cudaError_t status, const char* kernel);

// Blocks of `kernel` the current device keeps resident at once (SM count times blocks per SM of
// block_size threads), queried on the first launch on each device and kept in cache[device].
// Fails (throws) for a kernel the device has no image of.
int resident_blocks(const void* kernel, int block_size, std::atomic<int>* cache, int cache_size);

// A call runs in two passes over its launches, so that it changes all or nothing: the first
// asks the runtime about every kernel the call needs (what fails for a device without that
// kernel's image), the second launches.
enum class LaunchPhase { kPrepare, kLaunch };

// Runs Op over every element of every tensor of the call whose group in_launch(group) selects and
// which is of kFamily, in as few launches as the table and group capacities allow (one for
// typical models: hundreds of tensors and up to kMaxLaunchGroups groups per launch). `groups` is
// indexed by TensorArgs::group.
template <typename Op, bool kMaster, TensorFamily kFamily, typename InLaunch>
void launch_tables(const StepCall& call, const typename Op::Group* groups,
                   const InLaunch& in_launch, LaunchPhase phase) {
  static_assert(kMaster || kFamily != TensorFamily::kCompensated,
                "compensations come in master-weight calls");
  using Table = TensorTable<Op::kNumStates, Op::kCountsSteps, kMaster>;
  constexpr auto kernel = &multi_tensor_kernel<Op, Table, kFamily>;
  using Groups = LaunchGroups<typename Op::Group>;
  static_assert(sizeof(Groups) + sizeof(math::GradScaling) + sizeof(unsigned*) <=
                    kGroupParamBytes,
                "the groups' hyperparameters outgrew their share of the kernel parameters");
  static_assert(sizeof(Table) + kGroupParamBytes <= kKernelParamBytes,
                "the tensor table exceeds the kernel parameter space");

  constexpr int kCachedDevices = 64;
  static std::atomic<int> cached_blocks[kCachedDevices];
  const int max_blocks =
      resident_blocks(reinterpret_cast<const void*>(kernel), kBlockSize, cached_blocks,
                      kCachedDevices);
  if (phase == LaunchPhase::kPrepare) return;
  const auto stream = static_cast<cudaStream_t>(call.stream);

  Table table;
  Groups launch_groups;
  int launch_group_count = 0;
  size_t current_group = call.group_count;  // none yet
  const auto reset = [&] {
    table.clear();
    launch_group_count = 0;
    current_group = call.group_count;
  };
  // A table of empty tensors still takes one block, which advances their counters.
  const auto flush = [&] {
    if (table.count == 0) return;
    const auto blocks =
        static_cast<unsigned>(std::clamp<int64_t>(table.total_chunks, 1, max_blocks));
    throw_on_launch_error(launch_kernel(kernel, blocks, kBlockSize, stream, table, launch_groups,
                                        call.scaling, call.finished_blocks),
                          "fused_opt::cuda::multi_tensor_kernel");
    reset();
  };
  reset();
  for (size_t i = 0; i < call.count; ++i) {
    const TensorArgs& tensor = call.tensors[i];
    if (!in_launch(tensor.group) || (tensor.numel == 0 && !Op::kCountsSteps) ||
        family_of(tensor) != kFamily) {
      continue;
    }
    if (table.count == Table::kCapacity) flush();
    if (tensor.group != current_group) {
      if (launch_group_count == kMaxLaunchGroups) flush();
      launch_groups.at[launch_group_count++] = groups[tensor.group];
      current_group = tensor.group;
    }
    table.add(tensor, launch_group_count - 1);
  }
  flush();
}

template <typename Op, typename InLaunch>
void launch_multi_tensor(const StepCall& call, const typename Op::Group* groups,
                         const InLaunch& in_launch, LaunchPhase phase) {
  constexpr bool kMayQuantize = Op::kNumStates > 0;
  if (call.master_weights) {
    launch_tables<Op, true, TensorFamily::kPlain>(call, groups, in_launch, phase);
    if (call.compensated) {
      launch_tables<Op, true, TensorFamily::kCompensated>(call, groups, in_launch, phase);
    }
    if constexpr (kMayQuantize) {
      if (call.quantized) {
        launch_tables<Op, true, TensorFamily::kQuantized>(call, groups, in_launch, phase);
      }
    }
  } else {
    launch_tables<Op, false, TensorFamily::kPlain>(call, groups, in_launch, phase);
    if constexpr (kMayQuantize) {
      if (call.quantized) {
        launch_tables<Op, false, TensorFamily::kQuantized>(call, groups, in_launch, phase);
      }
    }
  }
}

// Calls launch(mode, in_mode, phase) once for each distinct mode_of(g) among the call's groups
// and each phase (every mode prepared before any is launched), where in_mode(g) says whether
// group g has that mode: groups of one compiled mode share launches.
template <typename ModeOf, typename Launch>
void for_each_group_mode(const StepCall& call, const ModeOf& mode_of, const Launch& launch) {
  for (const LaunchPhase phase : {LaunchPhase::kPrepare, LaunchPhase::kLaunch}) {
    for (size_t g = 0; g < call.group_count; ++g) {
      const auto mode = mode_of(g);
      bool seen = false;
      for (size_t earlier = 0; earlier < g && !seen; ++earlier) seen = mode_of(earlier) == mode;
      if (!seen) launch(mode, [&](size_t group) { return mode_of(group) == mode; }, phase);
    }
  }
}

}  // namespace fused_opt::cuda

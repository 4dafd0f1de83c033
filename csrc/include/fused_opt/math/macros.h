// Shared by g++ (CPU kernels) and nvcc (CUDA kernels): nothing here may depend on torch.
#pragma once

#if defined(__CUDACC__)
#define FUSED_OPT_HD __host__ __device__ __forceinline__
#else
// always_inline keeps the math inside each ISA clone of the CPU loops: an out-of-line copy
// compiled for one ISA must never be shared with the loop of another.
#define FUSED_OPT_HD inline __attribute__((always_inline))
#endif

namespace fused_opt::math {

// Arithmetic type for a storage type: fp32 for 16- and 32-bit storage, double for fp64.
template <typename Storage>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename Storage>
using opmath_t = typename OpMath<Storage>::type;

// Every element functor below exposes the same shape so that one generic CPU loop and one
// generic CUDA functor can drive any optimizer:
//   using opmath = T;  static constexpr int kNumStates;
//   void operator()(T& param, T grad, T* states) const;
// `states` holds kNumStates values in the order the op's state lists are passed.

}  // namespace fused_opt::math

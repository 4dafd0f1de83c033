// How an updated float32 value is stored into a bfloat16 param without a master.
//
// Stochastic rounding (param_rounding="stochastic"): the value rounds up in magnitude with
// probability equal to its distance from the bfloat16 below it, in units of the gap, so that the
// rounding is unbiased and an update smaller than half a bfloat16 ulp still moves the param on
// average, where rounding to nearest would drop it every step (Gupta et al., "Deep Learning with
// Limited Numerical Precision", ICML 2015; Zamirai et al., "Revisiting BFloat16 Training", 2020).
//
// The random bits come from a counter-based hash, not a generator with state: a function of
// (seed, the tensor's index in the op call, the step, the element's index in the tensor). So a
// run is reproducible for a given seed, the same on every thread count and launch geometry, and
// the CPU and CUDA kernels round alike. The step makes an element's bits differ from step to
// step, which is what keeps the rounding unbiased over time.
#pragma once

#include <cstdint>

#include "fused_opt/math/bits.h"
#include "fused_opt/math/macros.h"

namespace fused_opt::math {

// A bijection of 32-bit words with good avalanche: every input bit flips each output bit with
// probability close to 1/2 (Wellons' "lowbias32", from his hash-prospector search).
FUSED_OPT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Folds v into the hash h; different sequences of words give unrelated results.
FUSED_OPT_HD uint32_t hash_combine(uint32_t h, uint32_t v) {
  return mix32(h ^ (v + 0x9e3779b9u + (h << 6) + (h >> 2)));
}

// The key of one tensor in one op call, made once per tensor on the host.
FUSED_OPT_HD uint32_t rounding_tensor_key(uint64_t seed, uint64_t tensor_index) {
  uint32_t h = hash_combine(0u, static_cast<uint32_t>(seed));
  h = hash_combine(h, static_cast<uint32_t>(seed >> 32));
  h = hash_combine(h, static_cast<uint32_t>(tensor_index));
  return hash_combine(h, static_cast<uint32_t>(tensor_index >> 32));
}

// The key of one tensor's step: `step` is the count this update makes (1 on the first step),
// exact in the float32 counters up to 2^24 steps.
FUSED_OPT_HD uint32_t rounding_step_key(uint32_t tensor_key, float step) {
  return hash_combine(tensor_key, static_cast<uint32_t>(step));
}

// Elements come in blocks of 2^32; a block's key is made once per loop, not per element: a loop's
// range lies inside one block (CUDA chunks always do; the CPU splits its ranges at the blocks).
constexpr int64_t kRoundingBlock = int64_t{1} << 32;

FUSED_OPT_HD uint32_t rounding_block_key(uint32_t step_key, int64_t index) {
  return hash_combine(step_key, static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32));
}

// 32 random bits for the element whose index has these low 32 bits, in the block of block_key:
// one mix32 per element, which an element loop computes lane by lane with 32-bit integer
// vectors. The elements of one block and step hash distinct words (mix32 is a bijection); on
// another step the same element hashes a word made unrelated by the step key.
FUSED_OPT_HD uint32_t rounding_bits(uint32_t block_key, uint32_t index_low) {
  return mix32(index_low ^ block_key);
}

// The bfloat16 (as its bits) of `value` rounded stochastically with 32 random bits: adding 16 of
// them below bfloat16's last bit and truncating carries into that bit with probability equal to
// the dropped fraction. Sign and magnitude are separate bits, so negative values round alike in
// magnitude; a finite value carries into infinity only from within one ulp of the largest
// bfloat16, with the probability of its distance to it. NaN keeps its sign and becomes the quiet
// NaN whose payload survives truncation: adding to a NaN's bits could reach infinity or, from
// 0xffffffff, zero.
FUSED_OPT_HD uint16_t bfloat16_bits_stochastic(float value, uint32_t random) {
  const uint32_t bits = float_bits(value);
  const uint32_t rounded = (bits + (random >> 16)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x0040u;
  return static_cast<uint16_t>(value != value ? quiet_nan : rounded);
}

// Kahan-compensated storage (param_rounding="kahan", as optimi does it, after Kahan's summation):
// beside each bfloat16 param a bfloat16 buffer keeps what rounding the param to nearest dropped,
// so param + compensation carries about 16 significant bits. The update runs on that sum, which
// float32 holds exactly (the compensation is at most half the param's ulp), and the next
// compensation is what the stored param lacks of the result: an update too small to move the
// param accumulates there until it does.
template <typename T>
FUSED_OPT_HD T compensated_value(T param, T compensation) {
  return param + compensation;
}

template <typename T>
FUSED_OPT_HD T compensation_after(T value, T stored_param) {
  return value - stored_param;
}

}  // namespace fused_opt::math

#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/multi_tensor.h"
#include "fused_opt/validate.h"

namespace fused_opt::cpu {
namespace {

// Gradients are cut into chunks of this many elements, each tensor on its own; a chunk's partial
// sum depends only on its elements, and the partials are added in chunk order. The result is
// therefore the same whatever the number of threads.
constexpr int64_t kNormChunk = 1 << 15;
constexpr int kLanes = 8;
constexpr int kStreams = 4;

struct ChunkSums {
  double squares;
  double nonfinite;  // NaN when the chunk holds an inf or NaN, else zero
};

template <typename S>
FUSED_OPT_HD double widen(S x) {
  if constexpr (std::is_same_v<S, double>) {
    return x;
  } else {
    return static_cast<double>(static_cast<float>(x));
  }
}

// Sums in kLanes independent accumulators, in double (squares of 16- and 32-bit values cannot
// overflow it); x * 0 is NaN exactly for inf and NaN, so the flag needs no compare per element.
// The chunk is read as kStreams parts side by side: one core reading one stream with this much
// arithmetic per element kept too few loads in flight (fp32, one thread of this project's CPU
// machine: 5.5 GB/s in one stream, 12.4 GB/s in four, torch's own sum 12.3 GB/s).
template <typename S>
FUSED_OPT_CPU_CLONES_WIDE ChunkSums sum_chunk(const S* __restrict x, int64_t n) {
  double squares[kStreams][kLanes] = {};
  double nonfinite[kStreams][kLanes] = {};
  const int64_t part = n / (kStreams * kLanes) * kLanes;
  for (int64_t i = 0; i < part; i += kLanes) {
    for (int s = 0; s < kStreams; ++s) {
      for (int l = 0; l < kLanes; ++l) {
        const double v = widen(x[s * part + i + l]);
        squares[s][l] += v * v;
        nonfinite[s][l] += v * 0.0;
      }
    }
  }
  int lane = 0;
  for (int64_t i = kStreams * part; i < n; ++i, lane = (lane + 1) % kLanes) {
    const double v = widen(x[i]);
    squares[0][lane] += v * v;
    nonfinite[0][lane] += v * 0.0;
  }
  ChunkSums sums{0.0, 0.0};
  for (int s = 0; s < kStreams; ++s) {
    for (int l = 0; l < kLanes; ++l) {
      sums.squares += squares[s][l];
      sums.nonfinite += nonfinite[s][l];
    }
  }
  return sums;
}

// A chunk too short for one pass of sum_chunk's accumulators (a bias, a norm's scale, a
// one-element param): one accumulator each, inline. Clearing and reducing sum_chunk's 64 of them,
// and its call through the clone resolver, cost more than the elements (over 148 one-element
// grads: half of a 19 us pass).
template <typename S>
ChunkSums sum_short_chunk(const S* __restrict x, int64_t n) {
  ChunkSums sums{0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) {
    const double v = widen(x[i]);
    sums.squares += v * v;
    sums.nonfinite += v * 0.0;
  }
  return sums;
}

constexpr int64_t kShortChunk = kStreams * kLanes;

struct Chunk {
  size_t tensor;
  int64_t begin;
};

void grad_norm_cpu(at::TensorList grads, const at::Tensor& norm, const at::Tensor& found_inf,
                   const at::Tensor& workspace, const std::optional<at::Tensor>& grad_scale) {
  check_grad_norm_args(grads, norm, found_inf, workspace, grad_scale, 0);

  // Reused across calls: after the first step no host memory is allocated here. The worker
  // threads below reach them through these references: the names alone would name each
  // worker's own (empty) thread_local copies.
  thread_local std::vector<Chunk> reused_chunks;
  thread_local std::vector<ChunkSums> reused_partials;
  std::vector<Chunk>& chunks = reused_chunks;
  std::vector<ChunkSums>& partials = reused_partials;
  chunks.clear();
  int64_t total_elements = 0;
  for (size_t t = 0; t < grads.size(); ++t) {
    total_elements += grads[t].numel();
    for (int64_t begin = 0; begin < grads[t].numel(); begin += kNormChunk) {
      chunks.push_back({t, begin});
    }
  }
  const auto num_chunks = static_cast<int64_t>(chunks.size());
  partials.resize(chunks.size());

  // Few elements in many small grads are summed on this thread, as the step's own loop does
  // (kParallelGrain): waking the pool costs more than the sums, and on a loaded machine a
  // descheduled worker stalled every step (measured over 148 one-element params with clipping,
  // the other core busy: 7.5 ms a step, against 48 us without clipping).
  const int64_t grain = total_elements < kParallelGrain ? num_chunks + 1 : 1;
  at::parallel_for(0, num_chunks, grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const at::Tensor& grad = grads[chunks[c].tensor];
      const int64_t begin = chunks[c].begin;
      const int64_t n = std::min(kNormChunk, grad.numel() - begin);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                      "fused_opt_grad_norm", [&] {
                                        const scalar_t* x =
                                            elements<const scalar_t>(grad) + begin;
                                        partials[c] = n < kShortChunk ? sum_short_chunk(x, n)
                                                                      : sum_chunk(x, n);
                                      });
    }
  });

  ChunkSums total{0.0, 0.0};
  for (const ChunkSums& p : partials) {
    total.squares += p.squares;
    total.nonfinite += p.nonfinite;
  }
  const float inv_scale =
      grad_scale ? math::inverse_loss_scale(*grad_scale->const_data_ptr<float>()) : 1.0f;
  *norm.data_ptr<float>() = static_cast<float>(std::sqrt(total.squares) * inv_scale);
  *found_inf.data_ptr<float>() = std::isnan(total.nonfinite) ? 1.0f : 0.0f;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CPU, m) { m.impl("grad_norm_", &grad_norm_cpu); }

}  // namespace fused_opt::cpu

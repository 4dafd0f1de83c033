// The emulation tier's Python module: the CUDA kernels' glue (csrc/cuda/ops_cuda.cpp) registered
// for CPU tensors under the library fused_opt_simt, whose ops have fused_opt's schemas, and the
// controls of the emulated device (runtime.h).
#include <torch/extension.h>

#include "cuda/ops_cuda.h"
#include "schemas.h"
#include "simt/runtime.h"

TORCH_LIBRARY(fused_opt_simt, m) { fused_opt::define_ops(m); }

TORCH_LIBRARY_IMPL(fused_opt_simt, CPU, m) { fused_opt::cuda::register_cuda_kernels(m); }

TORCH_LIBRARY_IMPL(fused_opt_simt, Autograd, m) { fused_opt::skip_autograd(m); }

namespace {

namespace simt = fused_opt::simt;

void configure(int device, int workers, uint64_t seed) {
  TORCH_CHECK(device >= 0 && device < 64, "simt: device must be in [0, 64), got ", device);
  simt::configure({device, workers, seed});
}

pybind11::dict config() {
  const simt::Config c = simt::current_config();
  pybind11::dict out;
  out["device"] = c.device;
  out["workers"] = c.workers;
  out["seed"] = c.seed;
  return out;
}

pybind11::list take_launch_log() {
  pybind11::list out;
  for (const simt::LaunchRecord& record : simt::take_launch_log()) {
    out.append(pybind11::make_tuple(record.kernel, record.blocks, record.threads));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_opt's CUDA kernels executed on the CPU (tests only)";
  m.def("configure", &configure, pybind11::arg("device"), pybind11::arg("workers"),
        pybind11::arg("seed"),
        "Sets the emulated device (device d has d + 1 SMs: the grid of a persistent launch), "
        "the OS threads that run blocks at once, and the seed of the block and thread orders.");
  m.def("config", &config);
  m.def("take_launch_log", &take_launch_log,
        "The launches since the last call: (kernel parameter types, blocks, threads) each.");
  m.def("fail_occupancy_query_after", &simt::fail_occupancy_query_after,
        "Makes the occupancy query after this many more fail once, as for a missing kernel image.");
  m.def(
      "set_pending_error",
      [](int status) { simt::set_pending_error(static_cast<cudaError_t>(status)); },
      "Leaves an error for cudaGetLastError, as other code's failed CUDA call would.");
  m.def("pending_error", [] { return static_cast<int>(simt::peek_pending_error()); });
  m.def(
      "run_fault_kernel",
      [](const std::string& name, const torch::Tensor& buffer) {
        TORCH_CHECK(buffer.scalar_type() == torch::kInt32 && buffer.is_contiguous() &&
                        buffer.numel() >= 512 && buffer.is_cpu(),
                    "simt: the buffer must be a contiguous CPU int32 tensor of >= 512 elements");
        return simt::run_fault_kernel(name, static_cast<unsigned*>(buffer.data_ptr()));
      },
      "Runs a self-test kernel; returns its launch error, empty when it succeeded.");
}

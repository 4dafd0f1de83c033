// The fused_opt library: its ops (csrc/schemas.h). Its Python module, fused_opt._C, is made in
// csrc/step_plan.cpp.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(fused_opt, m) { fused_opt::define_ops(m); }
TORCH_LIBRARY_IMPL(fused_opt, Autograd, m) { fused_opt::skip_autograd(m); }

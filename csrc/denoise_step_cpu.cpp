// denoise_step on the CPU: the final denoising x0 = x_bar - gamma_next eps.
// The formula is DenoiseStep (step_common.h), run by CpuLoop there.
#include <torch/library.h>

#include "step_common.h"

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("denoise_step", &genie_fast::denoise_step<genie_fast::CpuLoop>);
  m.impl("denoise_step_out", &genie_fast::denoise_step_out<genie_fast::CpuLoop>);
}

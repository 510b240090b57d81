// denoise_step on the CPU: the final denoising x0 = x_bar - gamma_next eps.
// The formula is DenoiseStep (step_formulas.h), run by CpuLoop (step_cpu.h).
#include <torch/library.h>

#include "step_cpu.h"

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("denoise_step_out", &genie_fast::denoise_step_out<genie_fast::CpuLoop>);
}

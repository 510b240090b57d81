// genie_step on the CPU: one GENIE step (the head combined at gamma_n, then the second-order
// Taylor step on x_bar).
// The formula is GenieStep (step_formulas.h), run by CpuLoop (step_cpu.h).
#include <torch/library.h>

#include "step_cpu.h"

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("genie_step_out", &genie_fast::genie_step_out<genie_fast::CpuLoop>);
}

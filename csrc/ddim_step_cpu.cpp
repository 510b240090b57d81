// ddim_step on the CPU: one DDIM step (Euler in gamma; the AFS first step with eps = x_T).
// The formula is DdimStep (step_formulas.h), run by CpuLoop (step_cpu.h).
#include <torch/library.h>

#include "step_cpu.h"

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("ddim_step_out", &genie_fast::ddim_step_out<genie_fast::CpuLoop>);
}

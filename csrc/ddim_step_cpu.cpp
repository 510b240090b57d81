// ddim_step on the CPU: one DDIM step (Euler in gamma; the AFS first step with eps = x_T).
// The formula is DdimStep (step_common.h), run by CpuLoop there.
#include <torch/library.h>

#include "step_common.h"

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("ddim_step", &genie_fast::ddim_step<genie_fast::CpuLoop>);
  m.impl("ddim_step_out", &genie_fast::ddim_step_out<genie_fast::CpuLoop>);
}

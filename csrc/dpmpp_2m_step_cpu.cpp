// dpmpp_2m_step on the CPU: one DPM-Solver++(2M) step in x_bar.
// The formula is Dpmpp2mStep (step_formulas.h), run by CpuLoop (step_cpu.h).
#include <torch/library.h>

#include "step_cpu.h"

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("dpmpp_2m_step_out", &genie_fast::dpmpp_2m_step_out<genie_fast::CpuLoop>);
}

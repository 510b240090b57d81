// dpmpp_2m_step on the CPU: one DPM-Solver++(2M) step in x_bar.
// The formula is Dpmpp2mStep (step_common.h), run by CpuLoop there.
#include <torch/library.h>

#include "step_common.h"

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("dpmpp_2m_step", &genie_fast::dpmpp_2m_step<genie_fast::CpuLoop>);
  m.impl("dpmpp_2m_step_out", &genie_fast::dpmpp_2m_step_out<genie_fast::CpuLoop>);
}

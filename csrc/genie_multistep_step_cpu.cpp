// genie_multistep_step on the CPU: genie_multistep's corrector and the next step's predictor at
// one network evaluation (data prediction and its log-SNR derivative from the head, then two
// weighted sums over the history slots).
// The formula is GenieMultistepStep (step_formulas.h), run by CpuLoop (step_cpu.h).
#include <torch/library.h>

#include "step_cpu.h"

TORCH_LIBRARY_IMPL(genie_fast, CPU, m) {
  m.impl("genie_multistep_step_out", &genie_fast::genie_multistep_step_out<genie_fast::CpuLoop>);
}
